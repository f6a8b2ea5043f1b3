"""Captured forwards whose gradients the user drops before the step are not the step's
samples (``curvature/dropped_gradients.py``): a GAN's discriminator reached by the
generator step's backward, an adversarial attack's ``autograd.grad`` with respect to the
input. Forwards of one backward, and of backwards accumulated without a ``zero_grad``
between them, all stay."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import step_change

OPTIONS: dict[str, Any] = {"lr": 0.1, "damping": 0.01, "ema_decay": 0.0, "kl_clip": None}
OPTIONS.update(cov_interval=1, inv_interval=1)


def gan_run(
    freeze_d: bool, fisher: str, steps: int = 3, set_to_none: bool = True, clip: str = ""
) -> tuple[nn.Module, torch.optim.Optimizer, Tensor]:
    """A DCGAN-style loop (``D.zero_grad()`` at its step); ``freeze_d``: the generator's step
    runs with ``D``'s parameters frozen, so that its backward never reaches ``D``'s layers.
    Returns ``D``, its optimizer and the rows of its last step (real, then fake)."""
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    disc = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    opt_g = tk.KFAC(gen, fisher="empirical", likelihood="gaussian", **OPTIONS)
    opt_d = tk.KFAC(disc, fisher=fisher, likelihood="bernoulli", **OPTIONS)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        real = torch.randn(8, 3, generator=data, dtype=torch.float64)
        fake = gen(torch.randn(8, 2, generator=data, dtype=torch.float64))
        rows = torch.cat([real, fake.detach()])
        disc.zero_grad(set_to_none=set_to_none)
        ones, zeros = torch.ones(8, 1, dtype=torch.float64), torch.zeros(8, 1, dtype=torch.float64)
        F.binary_cross_entropy_with_logits(disc(real), ones).backward()
        F.binary_cross_entropy_with_logits(disc(fake.detach()), zeros).backward()
        if clip == "norm":
            torch.nn.utils.clip_grad_norm_(disc.parameters(), 0.05)
        elif clip == "value":
            torch.nn.utils.clip_grad_value_(disc.parameters(), 0.01)
        opt_d.step()
        gen.zero_grad()
        disc.requires_grad_(not freeze_d)
        F.binary_cross_entropy_with_logits(disc(fake), ones).backward()
        disc.requires_grad_(True)
        opt_g.step()
    return disc, opt_d, rows


@pytest.mark.filterwarnings("ignore:2 forward passes ran before one step")
@pytest.mark.parametrize("set_to_none", [True, False])
def test_the_generator_steps_backward_through_d_is_not_ds_sample(set_to_none: bool) -> None:
    """``D``'s steps are those of a twin whose generator step never reaches ``D`` (its
    first layer's step was 0.79 off, its factors holding the fakes' forward of the
    generator step), bit for bit under the empirical Fisher, also where ``D.zero_grad``
    zeroes in place (kept before 2026-12-06)."""
    plain = gan_run(freeze_d=False, fisher="empirical", set_to_none=set_to_none)[0]
    frozen = gan_run(freeze_d=True, fisher="empirical", set_to_none=set_to_none)[0]
    for p, q in zip(plain.parameters(), frozen.parameters(), strict=True):
        assert torch.equal(p, q)


def test_under_mc_d_s_factors_hold_its_own_forwards_alone() -> None:
    """Under ``fisher="mc"`` the draws differ from the twin's (the generator step's forward
    of ``D`` drew its targets), so the check is ``A`` of ``D``'s first layer at its second
    step: that of the 16 rows of that step (the generator step's 8 fakes were in it)."""
    _, opt, rows = gan_run(freeze_d=False, fisher="mc", steps=2)
    rows = torch.cat([rows, torch.ones(16, 1, dtype=torch.float64)], dim=1)
    factor = opt.preconditioner.factors["0"].A
    torch.testing.assert_close(factor, rows.T @ rows / 16, rtol=1e-12, atol=1e-14)


def attack_run(in_train_mode: bool, fisher: str) -> nn.Module:
    """Adversarial training: three steps of an input-gradient attack, then the step; the
    attack's forwards are captured (``in_train_mode``) or run by an inert copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = tk.KFAC(model, fisher=fisher, **OPTIONS)
    data = torch.Generator().manual_seed(2)
    for _ in range(2):
        x = torch.randn(8, 4, generator=data, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=data)
        attacked = model if in_train_mode else copy.deepcopy(model)  # (a copy's hooks are inert)
        delta = torch.zeros_like(x, requires_grad=True)
        for _ in range(3):
            (grad,) = torch.autograd.grad(F.cross_entropy(attacked(x + delta), y), delta)
            delta = (delta + 0.1 * grad.sign()).detach().requires_grad_(True)
        opt.zero_grad()
        F.cross_entropy(model(x + delta.detach()), y).backward()
        opt.step()
    return model


def test_an_attacks_input_gradients_are_not_samples() -> None:
    """The attack's forwards, reached by ``autograd.grad`` of the input alone, were samples
    (a step 0.29 to 0.70 off); now the steps are those of a loop whose attack runs on an
    inert copy, bit for bit."""
    for p, q in zip(
        attack_run(True, "empirical").parameters(),
        attack_run(False, "empirical").parameters(),
        strict=True,
    ):
        assert torch.equal(p, q)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_forwards_of_one_backward_and_of_accumulated_backwards_stay(fisher: str) -> None:
    """Two views under one loss (one backward, before any gradient exists) and a second
    micro-batch accumulated without ``zero_grad``: every forward's rows are in ``A``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = tk.KFAC(model, fisher=fisher, accumulation_steps=3, **OPTIONS)
    xs = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    y = torch.randint(0, 2, (4,))
    opt.zero_grad()
    (F.cross_entropy(model(xs[0]), y) + F.cross_entropy(model(xs[1]), y)).backward()
    F.cross_entropy(model(xs[2]), y).backward()
    opt.step()
    rows = torch.cat([torch.cat(xs), torch.ones(12, 1, dtype=torch.float64)], dim=1)
    factor: Tensor = opt.preconditioner.factors["0"].A
    torch.testing.assert_close(factor, rows.T @ rows / 12, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_gradient_the_user_composes_keeps_every_forward(fisher: str) -> None:
    """Micro-batches each backwarded after ``zero_grad()``, their gradients kept and summed
    into ``p.grad`` before the step (PCGrad over separate forwards, per-micro-batch
    clipping): the step's gradient holds every forward, and so does ``A`` (the reset
    dropped all but the last: a step 0.63 off)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = tk.KFAC(model, fisher=fisher, accumulation_steps=2, **OPTIONS)
    xs = [torch.randn(6, 4, dtype=torch.float64) for _ in range(2)]
    y = torch.randint(0, 3, (6,))
    kept = []
    for x in xs:
        opt.zero_grad()
        F.cross_entropy(model(x), y).div(2).backward()
        kept.append([p.grad.clone() for p in model.parameters()])
    for p, *grads in zip(model.parameters(), *kept, strict=True):
        p.grad = sum(grads)
    opt.step()
    rows = torch.cat([torch.cat(xs), torch.ones(12, 1, dtype=torch.float64)], 1)
    factor = opt.preconditioner.factors["0"].A
    torch.testing.assert_close(factor, rows.T @ rows / 12, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_an_attack_between_two_training_backwards_is_not_a_sample(fisher: str) -> None:
    """A clean loss's backward, then an attack's input gradient, then the adversarial
    loss's backward: ``A`` holds the clean and the adversarial rows alone (the attack's
    rows were in it: its backward wrote no gradient, judged at the next backward)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = tk.KFAC(model, fisher=fisher, accumulation_steps=2, **OPTIONS)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).div(2).backward()
    probe = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(probe), y), probe)
    adversarial = (x + 0.5 * grad.sign()).detach()
    F.cross_entropy(model(adversarial), y).div(2).backward()
    opt.step()
    rows = torch.cat([torch.cat([x, adversarial]), torch.ones(12, 1, dtype=torch.float64)], 1)
    factor = opt.preconditioner.factors["0"].A
    torch.testing.assert_close(factor, rows.T @ rows / 12, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("touch", ["clip", "clone"])
def test_an_attack_after_the_backward_stays_out_whatever_touches_the_gradient(
    touch: str,
) -> None:
    """The training backward, an attack's input gradient, then the gradient clipped (or
    reassigned) before the step: ``A`` holds the training rows alone (a write was judged
    by the ``.grad`` tensors, which clipping changes: the attack was back, ``A`` 1.58 off;
    the writes are counted per parameter now)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = tk.KFAC(model, fisher="empirical", **OPTIONS)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    probe = (x + 0.3).requires_grad_(True)
    torch.autograd.grad(F.cross_entropy(model(probe), y), probe)
    if touch == "clip":
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    else:
        for p in model.parameters():
            p.grad = p.grad.clone()
    opt.step()
    rows = torch.cat([x, torch.ones(6, 1, dtype=torch.float64)], 1)
    factor = opt.preconditioner.factors["0"].A
    torch.testing.assert_close(factor, rows.T @ rows / 6, rtol=1e-12, atol=1e-14)


def test_a_discriminator_layer_unfrozen_after_construction_is_watched_too() -> None:
    """A layer frozen when ``D``'s optimizer was built and unfrozen later: its gradient
    writes are counted from its first backward on (it had no hook, every step looked
    composed, and the generator step's forward was back in ``D``'s factors: 0.81 off)."""

    def run(freeze_d: bool) -> nn.Module:
        torch.manual_seed(0)
        gen, disc = (
            nn.Linear(2, 3).double(),
            nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)),
        )
        disc = disc.double()
        disc[0].requires_grad_(False)
        opt_d = tk.KFAC(
            disc, params=disc.parameters(), fisher="empirical", likelihood="bernoulli", **OPTIONS
        )
        disc[0].requires_grad_(True)
        data = torch.Generator().manual_seed(1)
        for _ in range(3):
            real = torch.randn(8, 3, generator=data, dtype=torch.float64)
            fake = gen(torch.randn(8, 2, generator=data, dtype=torch.float64))
            disc.zero_grad()
            ones = torch.ones(8, 1, dtype=torch.float64)
            loss = F.binary_cross_entropy_with_logits(
                disc(torch.cat([real, fake.detach()])), torch.cat([ones, 0 * ones])
            )
            loss.backward()
            opt_d.step()
            disc.requires_grad_(not freeze_d)
            F.binary_cross_entropy_with_logits(disc(fake), ones).backward()
            disc.requires_grad_(True)
        return disc

    for p, q in zip(run(False).parameters(), run(True).parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_gradients_of_autograd_grad_assigned_by_the_user_keep_their_forward(fisher: str) -> None:
    """``grads = torch.autograd.grad(loss, params)`` assigned to ``.grad`` before the step
    (a functional loop): the backward computed the layers' gradients without writing them,
    so its forward is the step's sample (it was taken for an attack's and the step refused
    for want of statistics, since 2026-12-05 (evening)); bit for bit ``loss.backward()``."""

    def run(functional: bool) -> list[Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        opt = tk.KFAC(model, fisher=fisher, **OPTIONS)
        data = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(8, 4, generator=data, dtype=torch.float64)
            y = torch.randint(0, 3, (8,), generator=data)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if functional:
                grads = torch.autograd.grad(loss, list(model.parameters()))
                for p, grad in zip(model.parameters(), grads, strict=True):
                    p.grad = grad
            else:
                loss.backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for p, q in zip(run(True), run(False), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("write", ["assign"])
def test_micro_batches_clipped_and_written_back_in_place_keep_every_forward(write: str) -> None:
    """Each micro-batch's gradient clipped and summed by hand, ``zero_grad(set_to_none=
    False)`` between them, the sum assigned (``p.grad = acc``): every micro-batch is a
    sample. Written back with ``copy_`` it is not recognised (documented: it cannot be told
    from a clip or DDP's average in place, which must keep the dropped forwards out)."""
    k = 4
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    opt = tk.KFAC(model, fisher="empirical", accumulation_steps=k, **OPTIONS)
    xs = torch.randn(k, 8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ys = torch.randint(0, 3, (k, 8), generator=torch.Generator().manual_seed(2))
    params = list(model.parameters())
    acc = [torch.zeros_like(p) for p in params]
    opt.zero_grad(set_to_none=False)
    for i in range(k):
        (F.cross_entropy(model(xs[i]), ys[i]) / k).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.05)
        for a, p in zip(acc, params, strict=True):
            a += p.grad
        opt.zero_grad(set_to_none=False)
    for a, p in zip(acc, params, strict=True):
        if write == "copy_":
            p.grad.copy_(a)
        else:
            p.grad = a.clone()
    opt.step()
    rows = torch.cat([xs.reshape(-1, 5), torch.ones(k * 8, 1, dtype=torch.float64)], dim=1)
    factor: Tensor = opt.preconditioner.factors["0"].A
    torch.testing.assert_close(factor, rows.T @ rows / (k * 8), rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:2 forward passes ran before one step")
@pytest.mark.parametrize("clip", ["norm", "value"])
def test_a_clipped_discriminator_zeroed_in_place_is_still_its_own(clip: str) -> None:
    """``D.zero_grad(set_to_none=False)`` and ``D``'s gradient clipped in place before its
    step (by norm or by value): the generator step's forward stays out (bit for bit the
    twin that freezes ``D``; a fingerprint tried for ``copy_`` write-backs took the value
    clip for a composition, 22 % off)."""
    plain = gan_run(freeze_d=False, fisher="empirical", set_to_none=False, clip=clip)[0]
    frozen = gan_run(freeze_d=True, fisher="empirical", set_to_none=False, clip=clip)[0]
    for p, q in zip(plain.parameters(), frozen.parameters(), strict=True):
        assert torch.equal(p, q)


def one_forward_run(how: str, fisher: str = "empirical") -> nn.Module:
    """One step of an MLP after one forward and the backwards ``how`` says: ``sum`` one
    backward of ``l1 + l2``; ``two`` ``l1.backward(retain_graph=True)`` then ``l2``'s; ``last``
    ``l2``'s alone; ``dropped`` ``l1``'s, ``zero_grad()``, then ``l2``'s; ``attack`` an
    ``autograd.grad`` of ``l1`` with respect to the input, then ``l2``'s."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    opt = tk.KFAC(model, fisher=fisher, **OPTIONS)
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=how in ("attack", "saliency"))
    y = torch.randint(0, 4, (8,))
    opt.zero_grad()
    out = model(x)
    l1, l2 = F.cross_entropy(out, y), 0.3 * F.cross_entropy(out, (y + 1) % 4)
    params = list(model.parameters())
    if how in ("sum", "sum_assigned"):
        (l1 + l2).backward()
    elif how == "last":
        l2.backward()
    elif how == "attack":
        torch.autograd.grad(l1, x, retain_graph=True)
        l2.backward()
    elif how in ("probe", "saliency"):  # a gradient-norm probe or a saliency map after it
        l2.backward(retain_graph=True)
        torch.autograd.grad(l1, params if how == "probe" else [x])
    elif how == "grads_then_sum":  # per-task autograd.grad, then one backward of the sum
        torch.autograd.grad(l1, params, retain_graph=True)
        torch.autograd.grad(l2, params, retain_graph=True)
        (l1 + l2).backward()
    elif how == "pcgrad":  # per-task gradients through the one forward, then composed
        tasks = []
        for loss in (l1, l2):
            opt.zero_grad()
            loss.backward(retain_graph=True)
            tasks.append([p.grad.clone() for p in params])
    else:
        l1.backward(retain_graph=True)
        if how == "dropped":
            opt.zero_grad()
        l2.backward()
    if how in ("pcgrad", "sum_assigned", "grads_then_sum"):  # (a composed gradient, from a twin)
        twin = copy.deepcopy(model)  # (its hooks are inert)
        twin_out, twin_params = twin(x), list(twin.parameters())
        g1 = torch.autograd.grad(F.cross_entropy(twin_out, y), twin_params, retain_graph=True)
        g2 = torch.autograd.grad(0.3 * F.cross_entropy(twin_out, (y + 1) % 4), twin_params)
        for p, a, b in zip(params, g1, g2, strict=True):
            p.grad = a + 0.5 * b
    opt.step()
    return model


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_two_backwards_through_one_forward_take_the_step_of_their_sum(fisher: str) -> None:
    """``l1.backward(retain_graph=True); l2.backward()`` leaves the gradient of ``l1 + l2``
    in ``.grad``: its ``δ`` are the sums of both backwards' (the last backward's alone were
    kept before 2026-12-06 (evening): steps 0.9–2.0 off in a trial). A first backward whose
    gradient was dropped, or that computed none (an attack's of the input), adds nothing,
    nor does an ``autograd.grad`` after the training backward (a gradient-norm probe, a
    saliency map: 0.4–0.98 off); per-task gradients through the one forward, composed
    and assigned (PCGrad), count every task (the last alone: 2.8 off)."""
    pairs = [("two", "sum"), ("dropped", "last"), ("attack", "last"), ("probe", "last")]
    pairs += [("saliency", "last"), ("pcgrad", "sum_assigned"), ("grads_then_sum", "sum_assigned")]
    for how, same in pairs:
        for a, b in zip(
            one_forward_run(how, fisher).parameters(),
            one_forward_run(same, fisher).parameters(),
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def sam_ascent(params: list[Tensor], grads: Sequence[Tensor], rho: float = 0.5) -> list[Tensor]:
    """SAM's ascent: each parameter moved by ``ρ g/‖g‖``; returns the moves (to undo)."""
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    moves = [rho * g / norm for g in grads]
    with torch.no_grad():
        for p, e in zip(params, moves, strict=True):
            p.add_(e)
    return moves


def test_sam_by_autograd_grad_assigned_takes_the_second_forward() -> None:
    """SAM with both gradients from ``torch.autograd.grad`` and ``p.grad = g2``: ``.grad`` is
    the very tensor the second pass computed, so that pass alone counts (both forwards
    did before 2026-12-06 (evening): 0.73–0.86 off the usual loop's step)."""
    results = []
    for by_grad in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
        opt = tk.KFAC(model, fisher="empirical", **OPTIONS)
        params = list(model.parameters())
        gen = torch.Generator().manual_seed(2)
        for _ in range(2):
            x = torch.randn(8, 3, dtype=torch.float64, generator=gen)
            y = torch.randint(0, 4, (8,), generator=gen)
            opt.zero_grad()
            if by_grad:
                first = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            else:
                F.cross_entropy(model(x), y).backward()
                first = tuple(p.grad.clone() for p in params)
            moves = sam_ascent(params, first)
            opt.zero_grad()
            if by_grad:
                second = torch.autograd.grad(F.cross_entropy(model(x), y), params)
                for p, g in zip(params, second, strict=True):
                    p.grad = g
            else:
                F.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for p, e in zip(params, moves, strict=True):
                    p.sub_(e)
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in params]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-14)


def test_a_head_whose_backward_was_dropped_folds_nothing() -> None:
    """``l1.backward(retain_graph=True); zero_grad(); l2.backward()``: the head only ``l1``
    reaches has no gradient at the step, and its factors keep what they were (they took
    ``l1``'s statistics before 2026-12-06 (evening): its next step 0.2 off)."""

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 4), nn.Linear(6, 4)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            h = torch.tanh(self.trunk(x))
            return self.a(h), self.b(h)

    torch.manual_seed(0)
    model = TwoHeads().double()
    opt = tk.KFAC(model, fisher="empirical", **OPTIONS)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 4, (8,))
    for drop in (False, True):
        opt.zero_grad()
        out_a, out_b = model(x)
        F.cross_entropy(out_a, y).backward(retain_graph=True)
        if drop:
            before = opt.preconditioner.factors["a"].G.clone()
            opt.zero_grad()
        F.cross_entropy(out_b, y).backward()
        opt.step()
    assert torch.equal(opt.preconditioner.factors["a"].G, before)


class Monitored(nn.Module):
    """A layer called once more with gradients on, its output read by no loss: a norm kept
    for monitoring (``monitor``), or a deep equilibrium model's ``f(z0)`` read only by a
    gradient hook's ``autograd.grad`` (``hook``: the implicit gradient's pattern; ``lazy``
    calls it inside the hook, in the backward, which adds no location)."""

    def __init__(self, extra: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.extra = extra
        self.a, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        z = torch.tanh(self.a(x))
        if self.extra == "monitor":
            self.norm = self.a(z.detach()).norm()
        elif self.extra in ("hook", "lazy"):
            z0 = z.detach().requires_grad_()
            eager = self.a(z0) if self.extra == "hook" else None

            def adjoint(grad: Tensor) -> Tensor:  # (one step of y = Jᵀy + g)
                with torch.enable_grad():  # (lazy: called in the backward)
                    f0 = eager if eager is not None else self.a(z0)
                    return grad + 0.1 * torch.autograd.grad(f0, z0, grad, retain_graph=True)[0]

            z.register_hook(adjoint)
        return self.head(z)


@pytest.mark.parametrize("make", [tk.KFAC, tk.TwoLevelKFAC])
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("pair", [("monitor", "none"), ("hook", "lazy")])
def test_a_call_whose_output_no_loss_reads_is_not_a_location(
    make: type, fisher: str, pair: tuple[str, str]
) -> None:
    """A call the backward never reached was a location with ``δ = 0``: it took a share of
    ``A`` and of the location count (0.27 off a step for a monitoring call, 0.31–0.46 for a
    deep equilibrium model's implicit gradient, in a trial). It is left out (2026-12-11):
    the steps are the model's without it (the hook's, whose gradient differs, against the
    same hook with ``f0`` built inside it)."""
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    moved = []
    for extra in pair:
        torch.manual_seed(3)
        model = Monitored(extra).double()
        opt = make(model, fisher=fisher, **OPTIONS)
        moved.append(step_change(opt, model.a.weight, F.cross_entropy(model(x), y)))
    assert moved[1].abs().max() > 1e-3
    torch.testing.assert_close(moved[0], moved[1], rtol=0, atol=1e-13)
