"""The layer-type registry: N-d convolution patches equal explicit slicing, every
registered type is preconditioned, and a user's own module type can be registered."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import conv_patches as reference_patches
from twolevel_kfac.curvature.discovery import is_supported, unsupported_reason
from twolevel_kfac.curvature.layer_types import (
    conv_patches,
    layer_type,
    register_layer_type,
    unregister_layer_type,
)
from twolevel_kfac.curvature.shared_indices import check_unbatched_embedding

CONVS = [
    (nn.Conv1d(3, 2, 3), (2, 3, 9)),
    (nn.Conv1d(3, 2, 4, stride=2, padding=2, dilation=2), (2, 3, 11)),
    (nn.Conv1d(2, 2, 3, padding="same"), (2, 2, 7)),
    (nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2)), (2, 2, 7, 6)),
    (nn.Conv3d(2, 2, 2), (2, 2, 3, 4, 3)),
    (nn.Conv3d(1, 2, (3, 2, 2), stride=(2, 1, 2), padding=(1, 0, 1), dilation=(1, 2, 1)),
     (2, 1, 5, 5, 4)),
    (nn.Conv1d(2, 2, 3, padding=2, padding_mode="reflect"), (2, 2, 7)),
    (nn.Conv2d(2, 3, 3, padding=(1, 2), stride=2, padding_mode="circular"), (2, 2, 6, 7)),
    (nn.Conv2d(2, 2, 4, padding="same", padding_mode="replicate"), (2, 2, 5, 6)),
    (nn.Conv3d(2, 2, 3, padding=1, padding_mode="circular"), (2, 2, 4, 3, 4)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("module", "shape"), CONVS, ids=lambda c: getattr(c, "__class__", c).__name__
)
def test_conv_patches_are_im2col(module: nn.Module, shape: tuple[int, ...]) -> None:
    """The patches times the weight matrix give the convolution's output at every location,
    and (numeric padding) equal the oracle's explicit slicing."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    patches = conv_patches(module, x)
    out = module(x)
    weight = module.weight.detach().reshape(module.out_channels, -1)
    conv = patches @ weight.T + module.bias.detach()
    torch.testing.assert_close(conv, out.detach().flatten(2).transpose(1, 2))
    if not isinstance(module.padding, str) and module.padding_mode == "zeros":
        torch.testing.assert_close(patches, reference_patches(module, x))


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (nn.ConvTranspose2d(2, 2, 3), "ConvTranspose2d is not supported"),
    ],
)
def test_unsupported_convolutions_are_named(module: nn.Module, reason: str) -> None:
    found = unsupported_reason(module)
    assert found is not None and reason in found and not is_supported(module)


class Scale(nn.Module):
    """A user's layer: ``y = x ⊙ w`` per feature is not a Kronecker block, but
    ``y = x Wᵀ`` written by hand is (a ``Linear`` under another name)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * 0.3)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T + self.bias


def test_a_users_module_type_can_be_registered(float64: None) -> None:
    """Registered with the Linear features, a hand-written linear layer takes exactly the
    steps of ``nn.Linear`` with the same weights."""
    features = layer_type(nn.Linear(1, 1))
    assert features is not None
    register_layer_type(Scale, features.features, features.gradients)
    try:
        torch.manual_seed(0)
        mine = nn.Sequential(Scale(4, 5), nn.Tanh(), nn.Linear(5, 3))
        plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        plain.load_state_dict(mine.state_dict())
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        for model in (mine, plain):
            opt = tk.KFAC(model, lr=0.1)
            assert "0" in opt.preconditioner.layers
            for _ in range(2):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        for a, b in zip(mine.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    finally:
        unregister_layer_type(Scale)
    assert layer_type(Scale(1, 1)) is None


def test_register_refuses_a_non_module() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        register_layer_type(int, lambda m, x: x, lambda m, g: g)  # type: ignore[arg-type]


def test_an_embedding_called_without_the_batch_is_refused_by_name() -> None:
    """nanoGPT's ``pos(torch.arange(T))`` broadcast over a batch of ``B``: every output row
    holds the gradient summed over the samples, so KFAC refuses it, naming the layer and
    the batched call (``pos(arange(T).expand(B, T))``), which trains; so is GPT-2's
    ``pos(arange(T)[None])``, whatever ``T`` is; flattened tokens (``B·T`` indices) and
    ``T`` packed tokens are rows of samples and train."""
    import twolevel_kfac as tk

    class Net(torch.nn.Module):
        def __init__(self, batched: str) -> None:
            super().__init__()
            self.tok, self.pos = torch.nn.Embedding(10, 4), torch.nn.Embedding(6, 4)
            self.bag = torch.nn.Embedding(10, 4)
            self.head, self.batched = torch.nn.Linear(4, 10), batched

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            b, t = idx.shape
            positions = torch.arange(t)
            if self.batched == "expand":
                pos = self.pos(positions.expand(b, t))
            elif self.batched == "row":  # GPT-2's position_ids [1, T]: shared too
                pos = self.pos(positions[None])
            elif self.batched == "offset":  # positions after a cached prefix: shared too
                pos = torch.nn.functional.pad(self.pos(positions[: t - 1] + 1), (0, 0, 1, 0))
            elif self.batched == "packed":  # the first T tokens of the batch: rows of samples
                packed = torch.zeros(b * t, 4)
                packed[:t] = self.bag(idx.flatten()[:t])  # each row one sample's token
                pos = packed.view(b, t, 4)
            elif self.batched == "flat":
                pos = self.pos(positions.repeat(b)).view(b, t, -1)
            else:
                pos = self.pos(positions)
            return self.head(self.tok(idx) + pos)

    for idx, batched in itertools.product(
        (torch.randint(0, 10, (3, 5)), torch.randint(0, 10, (2, 6))),
        ("none", "row", "offset", "expand", "flat", "packed"),
    ):  # T = 6 a multiple of B = 2 is refused too (it reads the model input's T)
        torch.manual_seed(0)
        model = Net(batched)
        opt = tk.KFAC(model, lr=0.1, class_dim=-1)
        loss = (
            torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
            if batched not in ("none", "row", "offset")
            else None
        )
        if batched in ("none", "row", "offset"):
            with pytest.raises(RuntimeError, match=r"layer 'pos' \(an embedding\) was called with"):
                model(idx)
            continue
        assert loss is not None
        loss.backward()
        opt.step()
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


class _ScaledLinear(nn.Linear):
    """``F.linear(x, 3W, b)``: its weight's curvature is ``9·G``, not ``Linear``'s ``G``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, 3.0 * self.weight, self.bias)


class _LoggedConv(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)


class _ScaledConv(nn.Conv2d):
    """A weight scale in ``_conv_forward`` (equalized learning rate): took ``Conv2d``'s block,
    a step 0.92 off, silently, before 2026-12-06 (night)."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super()._conv_forward(x, 0.25 * weight, bias)


@pytest.mark.parametrize(
    "module", [_ScaledLinear(4, 3), _LoggedConv(2, 3, 3), _ScaledConv(2, 3, 3)]
)
def test_a_subclass_that_overrides_forward_falls_back_until_registered(module: nn.Module) -> None:
    """A subclass of a layer type that overrides ``forward`` (weight standardisation, fake
    quantisation, a scale) is not given its base's block (``_ScaledLinear`` got ``Linear``'s
    block: a step 2.6 off on a step of 1.4); registered with its base's entry, it is."""
    reason = unsupported_reason(module)
    assert reason is not None and "overrides" in reason and type(module).__name__ in reason
    model = nn.ModuleDict({"odd": module, "plain": nn.Linear(2, 2)})
    with pytest.warns(UserWarning, match="overrides"):
        opt = tk.KFAC(model)
    assert list(opt.preconditioner.layers) == ["plain"]
    base = layer_type(module)
    assert base is not None
    register_layer_type(type(module), base.features, base.gradients, base.reason)
    try:
        assert is_supported(module)
    finally:
        unregister_layer_type(type(module))


class _Latents(nn.Module):
    """Learned queries projected by ``to_q`` then attending over the input (Perceiver,
    Q-Former): ``form`` ``shared`` projects the ``[1, L, D]`` latents once and broadcasts
    the result, ``parameter`` projects the ``[L, D]`` parameter itself, ``batched`` projects
    the latents expanded to the batch."""

    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.latents = nn.Parameter(torch.randn(1, 3, 4))
        self.table = nn.Parameter(self.latents.detach()[0].clone())
        self.to_q, self.head, self.form = nn.Linear(4, 4), nn.Linear(4, 3), form

    def forward(self, x: Tensor) -> Tensor:
        n = len(x)
        if self.form == "batched":
            q = self.to_q(self.latents.expand(n, 3, 4))
        elif self.form == "shared":
            q = self.to_q(self.latents).expand(n, 3, 4)
        else:
            q = self.to_q(self.table).expand(n, 3, 4)
        return self.head(torch.softmax(q @ x.transpose(1, 2), -1) @ x).mean(1)


@pytest.mark.parametrize("form", ["shared", "parameter"])
def test_a_layer_called_on_an_input_shared_by_the_batch_is_refused(form: str) -> None:
    """A ``Linear`` on latents shared by the batch (``[1, L, D]`` or the ``[L, D]``
    parameter) gets rows whose gradients are summed over the samples: refused by name
    (a step 0.42 off on one of 0.76); the batched call trains."""
    x, y = torch.randn(8, 5, 4), torch.arange(8) % 3
    for variant in (form, "batched"):
        model = _Latents(variant)
        opt = tk.KFAC(model, fisher="empirical")
        opt.zero_grad()
        if variant == form:
            with pytest.raises(RuntimeError, match="layer 'to_q' was called on an input"):
                F.cross_entropy(model(x), y)
        else:
            F.cross_entropy(model(x), y).backward()
            opt.step()


def test_a_parametrized_bias_is_said_to_take_the_fallback_step() -> None:
    """A ``Linear`` whose bias is parametrized keeps its weight's block; its bias (whose
    original is a parameter of no block) takes the fallback step, now with a warning."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, b: Tensor) -> Tensor:
            return 2.0 * b

    model = nn.Sequential(nn.Linear(4, 3))
    parametrize.register_parametrization(model[0], "bias", Double())
    with pytest.warns(UserWarning, match="layer '0': its bias is parametrized"):
        opt = tk.KFAC(model)
    assert list(opt.preconditioner.layers) == ["0"]


def test_a_torch_type_registered_by_the_user_is_probed() -> None:
    """The probe skipped every type from a ``torch.`` module, also one the user registered
    (``nn.Bilinear`` with Linear's functions: a bare shape error at the step, where a
    subclass of the user's own was refused by name)."""
    tk.register_layer_type(nn.Bilinear, tk.layer_type(nn.Linear).features,
                           tk.layer_type(nn.Linear).gradients)  # fmt: skip
    try:

        class Two(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.b = nn.Bilinear(4, 4, 6)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.b(x, x)

        model = Two()
        opt = tk.KFAC(model, fisher="empirical")  # noqa: F841  (its hooks live with it)
        with pytest.raises(ValueError, match=r"layer 'b': the features and gradients registered"):
            model(torch.randn(5, 4))
    finally:
        tk.unregister_layer_type(nn.Bilinear)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_a_convolution_padded_by_another_mode_has_its_block(mode: str) -> None:
    """``padding_mode`` other than zeros (a fallback step with a warning before 2026-12-05
    (night)): the block's patches are the input padded as torch's forward pads it, so
    ``Σ δ āᵀ`` is autograd's weight gradient (the registration probe checks it at the first
    capture) and ``A`` is the mean of those patches' outer products."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    opt = tk.KFAC(model, fisher="empirical", ema_decay=0.0, cov_interval=1)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    F.cross_entropy(model(x), torch.tensor([0, 1, 1, 0, 1])).backward()
    opt.step()
    padded = F.pad(x, (1, 1, 1, 1), mode=mode)
    rows = F.unfold(padded, 3).transpose(1, 2).reshape(-1, 18)
    rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=torch.float64)], dim=1)
    factor = opt.preconditioner.factors["0"]
    assert factor.A is not None
    torch.testing.assert_close(factor.A, rows.T @ rows / len(rows), rtol=1e-12, atol=1e-14)


def test_relative_position_buckets_shared_by_the_batch_are_refused() -> None:
    """T5's ``relative_attention_bias(buckets)`` on ``[T, T]`` buckets of ``j − i``,
    broadcast over the batch: its rows hold the gradients summed over the samples (a step
    15× too large in a trial, before 2026-12-06 (day)). Refused by name; the buckets
    expanded per sample (``[B, T, T]``) and token types of zeros ``[B, T]`` train."""

    class RelBias(nn.Module):
        def __init__(self, form: str) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.rel, self.types = nn.Linear(4, 8), nn.Embedding(9, 2), nn.Embedding(2, 8)
            self.out, self.form = nn.Linear(8, 3), form

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            h = self.emb(x) + self.types(torch.zeros(b, t, dtype=torch.long))
            pos = torch.arange(t)
            buckets = (pos[None, :] - pos[:, None]).clamp(-4, 4) + 4  # [T, T], by j − i
            if self.form == "per sample":
                bias = self.rel(buckets.expand(b, t, t)).permute(0, 3, 1, 2)  # [B, H, T, T]
            else:
                bias = self.rel(buckets).permute(2, 0, 1)[None]  # [1, H, T, T]
            scores = torch.einsum("btd,bsd->bts", h, h)[:, None] + bias
            return self.out((scores.softmax(-1).mean(1) @ h).mean(1))

    x, y = torch.randn(5, 6, 4), torch.randint(0, 3, (5,))
    with pytest.raises(RuntimeError, match=r"layer 'rel' \(an embedding\).*relative_attention"):
        _step(RelBias("shared"), x, y)
    _step(RelBias("per sample"), x, y)


def test_constant_or_windowed_indices_of_other_rows_than_the_batch_pass() -> None:
    """Token types of zeros flattened with a multiple-choice model's choices (``[B·k, T]``)
    are Toeplitz too, but constant: they pass (refused for a while on 2026-12-06 (day)), as
    do sliding windows of a sequence (Hankel) and positions expanded per row."""
    table = nn.Embedding(9, 2)
    stream = torch.randint(0, 9, (12,))
    for ids in (
        torch.zeros(6, 5, dtype=torch.long),
        torch.stack([stream[i : i + 4] for i in range(7)]),
        torch.arange(6).expand(6, 6),
    ):
        check_unbatched_embedding("types", table, ids, 2)
    buckets = torch.arange(6)[None, :] - torch.arange(6)[:, None] + 5
    with pytest.raises(RuntimeError, match="not one row per sample"):
        check_unbatched_embedding("rel", table, buckets.clamp(0, 8), 2)


class RelativeBias(nn.Module):
    """T5's relative-position bias: a table looked up once with ``[T, T]`` buckets and
    broadcast over the batch's attention scores."""

    def __init__(self) -> None:
        super().__init__()
        self.bias, self.head = nn.Embedding(9, 1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        buckets = (torch.arange(length)[None, :] - torch.arange(length)[:, None] + 4).clamp(0, 8)
        scores = x @ x.transpose(1, 2) + self.bias(buckets)[..., 0]  # [B, T, T]
        return self.head((scores.softmax(-1) @ x).mean(1))


@pytest.mark.parametrize("batch", [4, 5])
def test_buckets_shared_by_a_batch_of_as_many_samples_are_warned_of(batch: int) -> None:
    """T5 at a batch size equal to its sequence lengths passed without a word, its
    relative-position tables 2.3–6.8 off in a trial (other sizes are refused). The
    indices might be a batch's (left padding's position ids): warned of, once; the
    message no longer says a table left out of ``params`` takes the fallback step (it
    takes none)."""
    torch.manual_seed(0)
    model, x, y = RelativeBias(), torch.randn(batch, 4, 4), torch.randint(0, 3, (batch,))
    opt = tk.KFAC(model, fisher="empirical")
    if batch != 4:
        with pytest.raises(RuntimeError, match="not one row per sample") as refused:
            F.cross_entropy(model(x), y).backward()
        assert "takes no step from this optimizer" in str(refused.value)
        return
    with pytest.warns(RuntimeWarning, match=r"look shared by the whole batch .* as many rows"):
        F.cross_entropy(model(x), y).backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()  # (once per layer)
    table = nn.Embedding(9, 2)
    with pytest.warns(RuntimeWarning, match="look shared"):
        check_unbatched_embedding("pos", table, torch.arange(6), 6)  # pos(arange(T)), T = B


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = tk.KFAC(model, fisher="empirical")
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_a_time_step_of_shape_nothing_is_refused_with_the_expand_fix() -> None:
    """A diffusion time step drawn as a 0-d tensor gives its time MLP a ``[E]`` input: the
    refusal said ``x[None]`` for one sample; it names ``t.expand(B)`` for a value shared
    by the batch too (a generative-model trial)."""

    class Denoiser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.time, self.net = nn.Linear(4, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            freqs = torch.arange(1, 3, dtype=x.dtype)
            embedded = torch.cat([torch.sin(t * freqs), torch.cos(t * freqs)])  # [4]
            return self.net(x) + self.time(embedded)

    model = Denoiser()
    opt = tk.KFAC(model, fisher="empirical")
    with pytest.raises(RuntimeError, match=r"one unbatched sample .* t\.expand\(B\)"):
        model(torch.randn(5, 3), torch.tensor(0.3)).pow(2).mean().backward()
        opt.step()
