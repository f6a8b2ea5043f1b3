"""A registered module type is probed at its first captured forward
(``curvature/registration_check.py``): ``features`` and ``gradients`` that do not give its
weight's gradient are refused, naming the layer (they took wrong steps silently, or failed
with a bare shape error); a registration that does runs, and a new registration of a type is
probed again."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk

LINEAR = tk.layer_type(nn.Linear)
assert LINEAR is not None


class Conv1D(nn.Module):
    """transformers' GPT-2 ``Conv1D``: the weight stored ``[in, out]``."""

    def __init__(self, n_out: int, n_in: int) -> None:
        super().__init__()
        self.n_out = n_out
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        flat = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return flat.view(*x.shape[:-1], self.n_out)


class Scaled(nn.Module):
    """``c · (W x + b)``, a weight stored ``[out, in]``."""

    def __init__(self, n_out: int, n_in: int, scale: float = 3.0) -> None:
        super().__init__()
        self.linear, self.scale = nn.Linear(n_in, n_out), scale
        self.weight, self.bias = self.linear.weight, self.linear.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.linear(x)


@pytest.fixture
def registered() -> Iterator[Callable[..., None]]:
    """Register types for one test and remove them afterwards (the registry is global)."""
    types: list[type[nn.Module]] = []

    def register(kind: type[nn.Module], gradients: Callable[..., Tensor]) -> None:
        tk.register_layer_type(kind, LINEAR.features, gradients)
        types.append(kind)

    yield register
    for kind in types:
        tk.unregister_layer_type(kind)


def one_step(layer: Callable[[int, int], nn.Module], widths: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(layer(widths[1], widths[0]), nn.Tanh(), layer(widths[2], widths[1]))
    opt = tk.KFAC(model, fisher="empirical", class_dim=-1)
    x, y = torch.randn(6, 3, widths[0]), torch.randint(0, widths[2], (6, 3))
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    opt.step()


@pytest.mark.parametrize("widths", [(4, 4, 4), (4, 5, 3)], ids=["square", "non-square"])
def test_a_weight_stored_in_out_is_refused(registered: Callable[..., None], widths: tuple) -> None:
    """``Conv1D`` with ``Linear``'s functions: square layers took steps 55 off on a step of
    19 without a word, others failed in ``step()`` with a bare shape error."""
    registered(Conv1D, LINEAR.gradients)
    with pytest.raises(ValueError, match=r"layer '0'.*registered for Conv1D do not reproduce"):
        one_step(Conv1D, widths)


def test_a_scaled_output_needs_a_scaled_gradient(registered: Callable[..., None]) -> None:
    """``c · Linear`` registered with ``Linear``'s ``δ`` is refused (214 off on 119); with
    ``δ = c · ∂L/∂output`` it runs, and the new registration is probed again."""
    registered(Scaled, LINEAR.gradients)
    with pytest.raises(ValueError, match="registered for Scaled do not reproduce"):
        one_step(Scaled, (4, 5, 3))
    registered(Scaled, lambda m, grad: m.scale * LINEAR.gradients(m, grad))
    one_step(Scaled, (4, 5, 3))


def test_the_fallback_warning_names_a_working_registration() -> None:
    """A ``Linear`` subclass overriding ``forward`` is warned about with a registration call
    that runs as written (``tk.layer_type(nn.Linear).features``; it said
    ``*layer_type(Linear)'s features``)."""

    class Custom(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x)

    with pytest.warns(UserWarning, match=r"tk\.layer_type\(nn\.Linear\)\.features"):
        tk.KFAC(nn.Sequential(Custom(2, 2), nn.Linear(2, 2)))


class Plain(nn.Module):
    """``F.linear`` with a weight stored ``[out, in]``: ``Linear``'s functions are right."""

    def __init__(self, n_out: int, n_in: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) * 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def test_a_correct_registration_runs_where_the_probe_is_loose(
    registered: Callable[..., None],
) -> None:
    """A correct registration under bf16 autocast with a hook on its weight: not refused
    (the probe took the weight's dtype's tolerance, below bf16's rounding), and the user's
    hook fires once per backward (the probe's gradient fired it too)."""
    registered(Plain, LINEAR.gradients)

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(7, 4), Plain(7, 4)

        def forward(self, tokens: Tensor) -> Tensor:
            return self.head(torch.tanh(self.embed(tokens)))

    torch.manual_seed(0)
    model = Tagger()
    fired: list[int] = []
    model.head.weight.register_hook(lambda grad: fired.append(1))
    opt = tk.KFAC(model, fisher="empirical", class_dim=-1)
    tokens = torch.randint(0, 7, (4, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()
    opt.step()
    assert fired == [1]


class ScaledByArgument(Plain):
    """``scale · (W x + b)``, the scale given with each call (``layer(x, scale=c)``)."""

    def __init__(self, n_out: int, n_in: int) -> None:
        super().__init__(n_out, n_in)
        self.dropout = nn.Dropout(0.5)  # draws from torch's stream in the forward

    def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:
        return scale * F.linear(self.dropout(x) * 0 + x, self.weight, self.bias)


def test_the_probe_reruns_the_call_and_leaves_the_random_stream(
    registered: Callable[..., None],
) -> None:
    """A module called with an extra argument is probed with it (the rerun on the input
    alone failed and the probe was skipped: a step 4× too large went through), and the
    probe's rerun draws nothing from torch's random stream (its dropout did)."""
    registered(ScaledByArgument, LINEAR.gradients)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), ScaledByArgument(3, 5)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(torch.tanh(self.a(x)), scale=2.0)

    torch.manual_seed(0)
    model = Net()
    opt = tk.KFAC(model, fisher="empirical")  # noqa: F841 (kept: its hooks)
    torch.manual_seed(5)
    with pytest.raises(ValueError, match="registered for ScaledByArgument do not reproduce"):
        model(torch.randn(6, 4))
    after_probe = torch.rand(())
    torch.manual_seed(5)
    model.eval()  # no capture below: the stream as a plain forward leaves it
    with torch.no_grad():
        model.train()(torch.randn(6, 4))
    assert torch.equal(after_probe, torch.rand(()))


class RectifiedInPlace(Plain):
    """``F.linear(relu_(x))``: an in-place op on the module's input."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.relu_(), self.weight, self.bias)


def test_the_probe_leaves_the_inputs_alone(registered: Callable[..., None]) -> None:
    """A registered module that modifies its input in place: the probe reruns it on a copy
    (on an alias, its in-place op bumped the version counter of a tensor your backward
    saved, and the backward failed)."""
    registered(RectifiedInPlace, LINEAR.gradients)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), RectifiedInPlace(3, 5))
    opt = tk.KFAC(model, fisher="empirical")
    F.cross_entropy(model(torch.randn(6, 4)), torch.randint(0, 3, (6,))).backward()
    opt.step()


def _cylindrical(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv._conv_forward`` replaced on the instance: circular padding along the width,
    zeros along the height (climate and panorama models)."""
    pad = conv._reversed_padding_repeated_twice

    def conv_forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x = F.pad(F.pad(x, (pad[0], pad[1], 0, 0), mode="circular"), (0, 0, pad[2], pad[3]))
        return F.conv2d(x, weight, bias, conv.stride, 0, conv.dilation, conv.groups)

    conv._conv_forward = conv_forward  # type: ignore[method-assign]
    return conv


def _scaled_forward(layer: nn.Module) -> nn.Module:
    """``layer.forward`` replaced on the instance by a scaled one."""
    original = layer.forward
    layer.forward = lambda x: 2.0 * original(x)  # type: ignore[method-assign]
    return layer


def _wrapped_forward(layer: nn.Module) -> nn.Module:
    """accelerate's device hooks: the instance's ``forward`` runs the class's on the same
    (here: moved to the layer's device) inputs."""
    original = layer.forward

    def forward(*args: Tensor) -> Tensor:
        return original(*(a.to(layer.weight.device) for a in args))

    layer.forward = forward  # type: ignore[method-assign]
    return layer


def _conv_net(first: nn.Module) -> nn.Sequential:
    return nn.Sequential(first, nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))


def _kfac_step(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    opt = tk.KFAC(model, lr=1.0, momentum=0.0, damping=1e-3, fisher="empirical",
                  cov_interval=1, inv_interval=1, ema_decay=0.0, kl_clip=None)  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]


@pytest.mark.parametrize(
    ("patch", "method"),
    [(_cylindrical, "_conv_forward"), (_scaled_forward, "forward")],
)
def test_a_forward_replaced_on_the_instance_is_probed(
    patch: Callable[[nn.Conv2d], nn.Module], method: str
) -> None:
    """A torch layer whose ``forward`` or ``_conv_forward`` was replaced on the instance got
    the block of the padding and output the class computes: steps 0.13–0.92 off KFC of what
    the layer computed, without a word. The probe runs for such a module and refuses it."""
    torch.manual_seed(0)
    model = _conv_net(patch(nn.Conv2d(2, 3, 3, padding=1).double()).double()).double()
    opt = tk.KFAC(model, fisher="empirical")
    x = torch.randn(4, 2, 5, 6, dtype=torch.float64)
    for _ in range(2):  # refused again when the first error is caught
        with pytest.raises(ValueError, match=rf"layer '0': its {method} was replaced on the"):
            model(x)
    assert opt.preconditioner.steps == 0


def test_a_wrapper_that_runs_the_class_forward_takes_the_plain_step() -> None:
    """A wrapper that computes what the class does (accelerate's device hooks) passes the
    probe and takes the step of the same layer unwrapped, bit for bit."""
    torch.manual_seed(0)
    plain = _conv_net(nn.Conv2d(2, 3, 3, padding=1)).double()
    wrapped = _conv_net(_wrapped_forward(nn.Conv2d(2, 3, 3, padding=1))).double()
    wrapped.load_state_dict(plain.state_dict())
    x, y = torch.randn(4, 2, 5, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    for got, want in zip(_kfac_step(wrapped, x, y), _kfac_step(plain, x, y), strict=True):
        assert torch.equal(got, want)


class _LoRA(nn.Module):
    """``l1.forward`` patched to add a branch ``B(A(x))`` of two layers the parent holds."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 4), nn.Linear(4, 3)
        self.A, self.B = nn.Linear(5, 2), nn.Linear(2, 4)
        original, branch_in, branch_out = self.l1.forward, self.A, self.B
        self.l1.forward = lambda x: original(x) + branch_out(branch_in(x))  # type: ignore[method-assign]

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x)))


class _Unpatched(_LoRA):
    def __init__(self) -> None:
        super().__init__()
        del self.l1.forward

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x) + self.B(self.A(x))))


def test_the_probe_rerun_records_nothing_in_other_layers() -> None:
    """The probe's rerun of a patched forward that calls other layers went through their
    capture hooks: a second call without a gradient, their first blocks 0.45–0.48 off. The
    rerun runs without any of the model's hooks: the steps are the unpatched model's."""
    steps = []
    for kind in (_LoRA, _Unpatched):
        torch.manual_seed(0)
        model = kind().double()
        steps.append(_kfac_step(model, torch.randn(8, 5).double(), torch.randint(0, 3, (8,))))
    for got, want in zip(*steps, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_the_probe_leaves_unchanged_buffers_alone() -> None:
    """It copied every buffer back, bumping the version of one the user's graph saved (a
    patched ``orig(x) * lin.scale``): the user's backward failed with torch's in-place error."""
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    layer, original = model[0], model[0].forward
    layer.register_buffer("scale", torch.ones(6))
    layer.forward = lambda x: original(x) * layer.scale  # type: ignore[method-assign]
    opt = tk.KFAC(model)
    F.cross_entropy(model(torch.randn(8, 5)), torch.randint(0, 3, (8,))).backward()
    opt.step()


@pytest.mark.parametrize("kind", ["closure", "embedding"])
def test_a_patch_the_probe_cannot_read_is_warned_of(kind: str) -> None:
    """A forward holding the layer's parameters in a closure was refused as "1.2e+31 off";
    an embedding table's patch went unchecked without a word. Both are warned of now."""
    if kind == "closure":
        layer: nn.Module = nn.Linear(5, 6)
        layer.forward = functools.partial(F.linear, weight=layer.weight, bias=layer.bias)  # type: ignore[method-assign]
        model, x = nn.Sequential(layer, nn.Tanh(), nn.Linear(6, 3)), torch.randn(8, 5)
    else:
        layer = nn.Embedding(7, 6)
        original = layer.forward
        layer.forward = lambda t: 2.0 * original(t)  # type: ignore[method-assign]
        model, x = nn.Sequential(layer, nn.Flatten(), nn.Linear(12, 3)), torch.randint(0, 7, (8, 2))
    opt = tk.KFAC(model)
    with pytest.warns(RuntimeWarning, match=r"layer '0'.*: its forward could not be checked"):
        F.cross_entropy(model(x), torch.randint(0, 3, (8,))).backward()
    opt.step()


def test_a_users_hook_on_the_patched_path_is_kept_in_the_rerun() -> None:
    """A patch routing the layer's output through a module whose hook doubles it: a rerun
    without any of the model's hooks passed it (a step 1.39 off); the rerun drops only the
    captures' hooks there, so it is refused."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    gate = nn.Identity()
    gate.register_forward_hook(lambda module, args, out: 2 * out)
    model.add_module("gate", gate)
    original = model[0].forward
    model[0].forward = lambda x: gate(original(x))  # type: ignore[method-assign]
    opt = tk.KFAC(model)
    with pytest.raises(ValueError, match=r"layer '0': its forward was replaced on the instance"):
        model(torch.randn(8, 5))
    assert opt.preconditioner.steps == 0


class _SideNorm(nn.Module):
    """``l1.forward`` patched to also normalise its input with a train-mode batch norm the
    parent holds, a side output the loss reads (``patched=False``: the same, unpatched)."""

    def __init__(self, patched: bool) -> None:
        super().__init__()
        self.l1, self.l2, self.norm = nn.Linear(5, 4), nn.Linear(4, 3), nn.BatchNorm1d(5)
        self.side: Tensor | None = None
        if patched:
            original = self.l1.forward

            def forward(x: Tensor) -> Tensor:
                self.side = self.norm(x)
                return original(x)

            self.l1.forward = forward  # type: ignore[method-assign]

    def forward(self, x: Tensor) -> Tensor:
        if "forward" not in vars(self.l1):
            self.side = self.norm(x)
        out = self.l2(torch.tanh(self.l1(x)))
        assert self.side is not None
        return out + self.side[:, :3]


def test_the_probe_leaves_the_running_statistics_of_a_norm_it_calls() -> None:
    """A patch calling a train-mode batch norm: the probe's rerun updated its running
    statistics a second time, in place, and the user's backward failed with torch's
    in-place error. The rerun updates none: the steps and the running statistics are the
    unpatched model's."""
    runs = []
    for patched in (True, False):
        torch.manual_seed(0)
        model = _SideNorm(patched).double()
        step = _kfac_step(model, torch.randn(8, 5).double(), torch.randint(0, 3, (8,)))
        runs.append((step, [b.clone() for b in model.norm.buffers()]))
    (got, got_stats), (want, want_stats) = runs
    for a, b in zip([*got, *got_stats], [*want, *want_stats], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_a_patch_through_a_norm_child_is_refused_not_crashed() -> None:
    """``l1.forward = lambda x: l1.bn(orig(x))`` with a train-mode batch norm child: the
    probe's own gradient failed with torch's in-place error inside the forward (the rerun
    updated the child's running statistics the forward's graph saved). The rerun runs
    the child on copies of its buffers: the patch is refused by name, the child's running
    statistics are those of the user's forward alone."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    layer, original = model[0], model[0].forward
    layer.bn = nn.BatchNorm1d(4)
    layer.forward = lambda x: layer.bn(original(x))  # type: ignore[method-assign]
    opt = tk.KFAC(model)
    x = torch.randn(8, 5)
    with torch.no_grad():
        expected = 0.1 * original(x).mean(0)  # one update of the zero running mean
    with pytest.raises(ValueError, match=r"layer '0': its forward was replaced on the instance"):
        model(x)
    torch.testing.assert_close(layer.bn.running_mean, expected)
    assert opt.preconditioner.steps == 0


def test_a_forward_patched_again_is_probed_again() -> None:
    """A layer probed with a wrapper that computes the class's forward, then patched again
    to scale its output: the second patch was never probed (the module was marked probed),
    so its steps took the unscaled block. Each new patch is probed at its first captured
    forward."""
    torch.manual_seed(0)
    model = _conv_net(_wrapped_forward(nn.Conv2d(2, 3, 3, padding=1))).double()
    opt = tk.KFAC(model, fisher="empirical", cov_interval=1)
    x, y = torch.randn(4, 2, 5, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    _scaled_forward(model[0])
    with pytest.raises(ValueError, match=r"layer '0': its forward was replaced on the"):
        model(x)
    assert opt.preconditioner.steps == 1
