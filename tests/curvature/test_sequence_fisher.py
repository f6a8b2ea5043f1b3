"""The Fisher of sequence outputs: categorical logits with positions (``[N, T, C]``, and
torch's ``[N, C, T]`` layout), ``ignore_index`` targets through a loss mask, and the two
reductions over positions (``sum``; ``mean``, ``CrossEntropyLoss()``'s token mean).

Dense oracles in float64: the exact expectation of the MC ``G`` (with positions that mix,
so a layer's ``δ`` at one position collects the losses of later ones), the exact
``sum``↔``mean`` mapping, and the empirical ``G`` of the loss as written."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk

N, T, V, C = 4, 3, 5, 4  # batch, positions, input features, classes
IGNORE = -100


class CausalMean(nn.Module):
    """``h_t ← (1/t) Σ_{u ≤ t} h_u``: positions mix, as attention makes them."""

    def forward(self, x: Tensor) -> Tensor:
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        return torch.cumsum(x, dim=1) / steps


class ClassesFirst(nn.Module):
    """``[N, T, C] → [N, C, T]``: torch's ``CrossEntropyLoss`` layout."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


def sequence_model(classes_first: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(V, 6), nn.Tanh(), CausalMean(), nn.Linear(6, C)]
    return nn.Sequential(*layers, *([ClassesFirst()] if classes_first else []))


def batch() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, T, V, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N, T), generator=gen)
    y[0, 1:] = IGNORE  # a short sequence
    y[2, 2] = IGNORE
    return x, y, y != IGNORE


def token_mean_loss(logits: Tensor, y: Tensor) -> Tensor:
    """``nn.CrossEntropyLoss(ignore_index=…)`` on ``[N, T, C]`` logits."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)


def position_sum_loss(logits: Tensor, y: Tensor) -> Tensor:
    """The ``sum`` convention: the positions' losses summed, averaged over samples."""
    flat = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
    return flat / logits.shape[0]


def exact_g(model: nn.Module, x: Tensor, layer: nn.Module, mask: Tensor, s: float) -> Tensor:
    """``E[G] = (1/M) Σ_n Σ_{t'} Σ_t m_{nt} s² J_{n,t,t'}ᵀ H_{nt} J_{n,t,t'}``: one
    independent categorical per position, ``J_{n,t,t'} = ∂f_{nt}/∂s_{nt'}`` the Jacobian of
    position ``t``'s logits with respect to the layer's output at ``t'``, and ``M`` the
    layer positions ``(n, t')`` that reach a counted position's loss (the others have
    ``δ = 0`` and are left out of the factors)."""
    store: dict[str, Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: store.update(s=out.detach()))
    with torch.no_grad():
        logits = model(x)
    handle.remove()

    def shifted(eps: Tensor) -> Tensor:
        h = layer.register_forward_hook(lambda _m, _i, out: out + eps)
        try:
            return model(x)
        finally:
            h.remove()

    jac = torch.autograd.functional.jacobian(shifted, torch.zeros_like(store["s"]))
    jac = torch.diagonal(jac, dim1=0, dim2=3).permute(4, 0, 1, 2, 3)  # [N, T, C, T', d]
    p = torch.softmax(logits, dim=-1)
    hess = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # [N, T, C, C]
    weights = mask.to(hess.dtype) * s**2
    g = torch.einsum("nt,ntcsd,ntce,ntesf->df", weights, jac, hess, jac)
    reach = torch.einsum("nt,ntcsd->ns", mask.to(jac.dtype), jac.abs()) > 0  # [N, T']
    return g / int(reach.sum())


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_mc_g_converges_to_the_exact_fisher_of_the_masked_loss(
    float64: None, reduction: str
) -> None:
    """Averaged over many refreshes, the MC ``G`` of both layers is the exact expectation
    over per-position categoricals at the counted positions, scaled by ``s²``
    (``mean``: ``s = N / N_tok``)."""
    model = sequence_model()
    x, y, mask = batch()
    pre = tk.KFACPreconditioner(
        model, class_dim=-1, loss_reduction=reduction, ema_decay=0.9999, cov_interval=1, seed=2
    )
    loss_fn = token_mean_loss if reduction == "mean" else position_sum_loss
    for _ in range(1500):
        pre.set_loss_mask(mask)
        loss_fn(model(x), y).backward()
        pre.step()
        model.zero_grad()
    pre.remove_hooks()
    s = N / int(mask.sum()) if reduction == "mean" else 1.0
    for name in ("0", "3"):
        expected = exact_g(model, x, model.get_submodule(name), mask, s)
        got = pre.factors[name].G
        assert got is not None
        scale = expected.abs().max()
        torch.testing.assert_close(got / scale, expected / scale, rtol=0.1, atol=0.03)
    # the masked positions matter: without the mask the sum over positions is another
    # matrix (the head's positions are the logits': G sums over the counted ones)
    unmasked = exact_g(model, x, model.get_submodule("3"), torch.ones_like(mask), s) * N * T
    counted = pre.factors["3"].G * int(mask.sum())
    assert not torch.allclose(counted / scale, unmasked / scale, atol=0.05)


@pytest.mark.parametrize("fisher_batch", [1.0, 0.5])
def test_mean_is_the_position_sum_rescaled(float64: None, fisher_batch: float) -> None:
    """Same samples, ``G_mean = s² G_sum`` with ``s = N / N_tok`` of the whole batch
    (also when the Fisher mini-batch is half of it), and ``mean`` with ``s·lr`` and
    ``s²λ`` takes ``sum``'s steps."""
    x, y, mask = batch()
    s = N / int(mask.sum())
    runs = []
    for reduction, loss_fn, scale in (
        ("sum", position_sum_loss, 1.0),
        ("mean", token_mean_loss, s),
    ):
        model = sequence_model()
        opt = tk.KFAC(
            model,
            lr=0.1 * scale,
            damping=1e-2 * scale**2,
            damping_mode="pi",
            class_dim=-1,
            loss_reduction=reduction,
            fisher_batch=fisher_batch,
            cov_interval=1,
        )
        for _ in range(3):
            opt.zero_grad()
            opt.set_loss_mask(mask)
            loss_fn(model(x), y).backward()
            opt.step()
        runs.append((model, opt.preconditioner))
    (sum_model, sum_pre), (mean_model, mean_pre) = runs
    for name, factors in sum_pre.factors.items():
        torch.testing.assert_close(mean_pre.factors[name].G / s**2, factors.G, rtol=1e-10, atol=0)
    for p, q in zip(sum_model.parameters(), mean_model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12)


def test_torchs_class_first_layout_is_the_same_fisher(float64: None) -> None:
    """``[N, C, T]`` logits with ``class_dim=1`` draw the same targets at the same
    positions as ``[N, T, C]`` with ``class_dim=-1``: the factors agree bit for bit."""
    x, y, mask = batch()
    factors = []
    for classes_first, class_dim in ((False, -1), (True, 1)):
        model = sequence_model(classes_first)
        pre = tk.KFACPreconditioner(model, class_dim=class_dim, cov_interval=1)
        pre.set_loss_mask(mask)
        out = model(x)
        logits = out.transpose(1, 2) if classes_first else out
        position_sum_loss(logits, y).backward()
        pre.step()
        factors.append({n: pre.factors[n].G for n in pre.layers})
    for name, g in factors[0].items():
        assert torch.equal(factors[1][name], g)


def test_empirical_g_is_that_of_the_token_mean_loss(float64: None) -> None:
    """``fisher="empirical"`` reads the loss's own gradients: ``δ_n = N ∂L/∂s_n`` of
    ``CrossEntropyLoss(ignore_index)``, zero at ignored positions whose output does not
    feed a counted one (no mask needed)."""
    model = sequence_model()
    x, y, mask = batch()
    pre = tk.KFACPreconditioner(model, fisher="empirical", cov_interval=1)
    token_mean_loss(model(x), y).backward()
    pre.step()
    pre.remove_hooks()
    last = model.get_submodule("3")
    store: dict[str, Tensor] = {}
    handle = last.register_forward_hook(lambda _m, _i, out: store.update(s=out))
    out = model(x)
    handle.remove()
    (grad,) = torch.autograd.grad(token_mean_loss(out, y), store["s"])
    delta = N * grad  # [N, T, C]
    assert bool((delta[~mask] == 0).all())  # left out of G: it averages over the counted
    expected = torch.einsum("ntc,nte->ce", delta, delta) / int(mask.sum())
    got = pre.factors["3"].G
    assert got is not None
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_sequence_logits_need_a_class_dim() -> None:
    """``[N, T, C]`` and ``[N, C, T]`` are both common: without ``class_dim`` the MC Fisher
    refuses instead of guessing, and names the likelihoods of outputs that are not logits (a
    denoiser's image under the default ``categorical``: named since 2026-12-06 (evening))."""
    model = sequence_model().float()
    opt = tk.KFAC(model)
    with pytest.raises(ValueError, match=r"class_dim=-1 for \[N, T, C\].*'gaussian'"):
        model(torch.randn(N, T, V))
    assert opt.preconditioner.steps == 0
    for bad in (0, True, 1.0):
        with pytest.raises(ValueError, match="class_dim"):
            tk.KFAC(sequence_model(), class_dim=bad)


def _warnings_of_one_step(mask: Tensor | None, y: Tensor) -> list[str]:
    model = sequence_model().float()
    opt = tk.KFAC(model, class_dim=-1)
    x = batch()[0].float()
    opt.set_loss_mask(mask)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        token_mean_loss(model(x), y).backward()
        opt.step()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_a_forgotten_or_wrong_mask_is_reported() -> None:
    """The user's loss gradient is exactly zero at ignored positions: a loss that ignores
    positions the MC Fisher sampled, or counts positions the mask left out, warns."""
    _, y, mask = batch()
    assert _warnings_of_one_step(mask, y) == []
    (forgotten,) = _warnings_of_one_step(None, y)
    assert "no loss mask was given" in forgotten and "set_loss_mask" in forgotten
    wrong = mask.clone()
    wrong[1, 0] = False
    (mismatch,) = _warnings_of_one_step(wrong, y)
    assert "does not match" in mismatch
    (too_many,) = _warnings_of_one_step(torch.ones_like(mask), y)  # e.g. built from inputs
    assert "counts 3 position(s) where the training loss has no gradient" in too_many


def test_each_kind_of_mask_problem_warns_once() -> None:
    """One optimizer: a forgotten mask, then a mask that drops counted positions, then
    the forgotten one again: two warnings."""
    _, y, mask = batch()
    model = sequence_model().float()
    opt = tk.KFAC(model, class_dim=-1, cov_interval=1)
    x = batch()[0].float()
    wrong = mask.clone()
    wrong[1, 0] = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for given in (None, wrong, None, wrong):
            opt.zero_grad()
            opt.set_loss_mask(given)
            token_mean_loss(model(x), y).backward()
            opt.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2 and "no loss mask" in messages[0] and "does not match" in messages[1]


def test_bad_masks_are_refused() -> None:
    model = sequence_model().float()
    x, _, mask = batch()
    opt = tk.KFAC(model, class_dim=-1)
    for bad, what in ((mask[:, :2], "positions of shape"), (mask.long(), "boolean")):
        opt.set_loss_mask(bad)
        with pytest.raises(ValueError, match=what):
            model(x.float())
    gaussian = tk.KFAC(copy.deepcopy(model), likelihood="gaussian")
    with pytest.raises(ValueError, match="categorical"):
        gaussian.set_loss_mask(mask)
    tk.KFAC(copy.deepcopy(model), fisher="empirical").set_loss_mask(mask)  # read by nothing


def test_a_mask_is_used_by_the_next_forward_only(float64: None) -> None:
    """The mask belongs to one forward: the next one (another batch size) runs unmasked."""
    model = sequence_model()
    x, y, mask = batch()
    opt = tk.KFAC(model, class_dim=-1, cov_interval=1)
    opt.set_loss_mask(mask)
    position_sum_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    short = x[:2]
    position_sum_loss(model(short), torch.zeros(2, T, dtype=torch.long)).backward()
    opt.step()
    assert opt.preconditioner.steps == 2


@pytest.mark.parametrize("classes", [2, 3, 10])
@pytest.mark.parametrize(
    ("reduction", "loss", "steps", "warns"),
    [
        ("sum", "token_mean", 1, True),  # the usual LM loss under the default: said once
        ("mean", "token_mean", 1, False),
        ("sum", "position_sum", 1, False),
        ("sum", "position_sum", 2, False),  # micro-batches' losses divided by 2
        ("sum", "smoothed_sum", 1, False),  # label smoothing: a soft target
        ("sum", "smoothed_mean", 1, True),  # its token mean (with 5 or more classes)
        ("sum", "distilled_sum", 1, False),  # soft targets near the model's own output
        ("sum", "weighted_sum", 1, False),  # a per-sample sum weighted by 0.5
        ("sum", "focal_sum", 1, False),  # its slope p_c f(p_y) varies with the position
        ("sum", "scaled_token_mean", 1, True),  # under a GradScaler
        ("sum", "class_weighted_mean", 1, True),  # torch's mean over Σ w_y: one slope a class
        ("sum", "class_weighted_sum", 1, False),
        ("sum", "dice_like", 1, False),  # a loss of p alone near a uniform output
    ],
)
def test_a_token_mean_loss_under_sum_is_warned_of(
    reduction: str, loss: str, steps: int, warns: bool, classes: int
) -> None:
    """Under ``fisher="mc"`` with the default ``loss_reduction="sum"``, torch's token mean
    (``T̄ = 12`` counted positions per sample) makes the MC Fisher ``T̄²`` too large for the
    loss: a newcomer's language model reached a loss 45× higher after 100 steps, silently;
    so did, until 2026-12-06 (night), one of 2–4 classes (binary segmentation: a step
    40–70× too small) or with class weights (the check judged 5 or more classes with one
    slope for all).
    Its gradient at the logits, ``1/T̄`` of a per-sample sum's at the hard-target positions
    (``curvature/token_mean.py``), is warned of once; a loss weight, soft targets (a review
    found distillation near its teacher warned of by a first form of the check) and a
    ``GradScaler``'s scale (which hid a token mean) are not taken for it, nor a focal loss
    (a second form warned of one)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(V, 6), nn.Tanh(), CausalMean(), nn.Linear(6, classes))
    weight = torch.linspace(0.5, 2.0, classes)
    opt = tk.KFAC(
        model, class_dim=-1, cov_interval=1, loss_reduction=reduction, accumulation_steps=steps
    )

    def per_sample_sum(out: Tensor, y: Tensor, **kwargs: float) -> Tensor:
        flat = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum", **kwargs)
        return flat / len(out)

    def distilled(out: Tensor, _y: Tensor) -> Tensor:
        teacher = (out.detach() + 0.3 * torch.randn_like(out)).softmax(-1)
        return F.kl_div(out.log_softmax(-1), teacher, reduction="sum") / len(out)

    def focal(out: Tensor, y: Tensor) -> Tensor:  # a review's false warning, C = 3 to 30
        log_p = (3 * out).log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return -(((1 - log_p.exp()) ** 2) * log_p).sum() / len(out)

    def dice_like(out: Tensor, y: Tensor) -> Tensor:  # near uniform: p_y the same everywhere
        p, hot = (0.01 * out).softmax(-1), F.one_hot(y, classes).float()
        return 1 - 2 * (p * hot).sum() / (p.sum() + hot.sum())

    losses = {
        "token_mean": token_mean_loss,
        "scaled_token_mean": token_mean_loss,
        "position_sum": per_sample_sum,
        "smoothed_sum": lambda out, y: per_sample_sum(out, y, label_smoothing=0.1),
        "smoothed_mean": lambda out, y: F.cross_entropy(
            out.flatten(0, 1), y.flatten(), label_smoothing=0.1
        ),
        "distilled_sum": distilled,
        "weighted_sum": lambda out, y: 0.5 * per_sample_sum(out, y),
        "focal_sum": focal,
        "class_weighted_mean": lambda out, y: F.cross_entropy(
            out.flatten(0, 1), y.flatten(), weight=weight
        ),
        "class_weighted_sum": lambda out, y: per_sample_sum(out, y, weight=weight),
        "dice_like": dice_like,
    }
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=loss.startswith("scaled"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            for _ in range(steps):
                x, y = torch.randn(N, 12, V), torch.randint(0, classes, (N, 12))
                scaler.scale(losses[loss](model(x), y) / steps).backward()
            scaler.step(opt)
            scaler.update()
    said = [str(w.message) for w in caught if "loss_reduction='sum'" in str(w.message)]
    if loss == "smoothed_mean" and classes < 5:  # told or not, by how p_c varies (ε/(C p_c))
        assert len(said) <= 1, said
        return
    assert len(said) == (1 if warns else 0), said
    if warns:
        assert "the 12 counted positions per sample" in said[0] and "'mean'" in said[0]
