"""A checkpoint refused at load leaves the optimizer as it was (``optim/state.py``:
``all_or_nothing``), and a two-level checkpoint of another coarse space is refused even
where its basis was saved."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk

CASES = {  # (saved by, loaded into)
    "kfac_into_ekfac": (tk.KFAC, tk.EKFAC),
    "kpsvd_into_corrected": (
        tk.KPSVD,
        lambda m, **k: tk.KFACCorrected(m, inverse_method="eigen", **k),
    ),
    "fallback": (lambda m, **k: tk.KFAC(m, fallback="adamw", **k), tk.KFAC),
    "fine_level": (tk.TwoLevelKFAC, lambda m, **k: tk.TwoLevelKFAC(m, fine="ekfac", **k)),
    "coarse_space": (
        lambda m, **k: tk.TwoLevelKFAC(m, coarse_space="residual", **k),
        lambda m, **k: tk.TwoLevelKFAC(m, coarse_space="nicolaides", **k),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_refused_checkpoint_leaves_the_optimizer_as_it_was(case: str) -> None:
    """A checkpoint refused at load (another fine level, fallback or coarse space) changes
    nothing: the optimizer then takes the steps of a twin that never tried the load. It kept
    the checkpoint's factors, step counter and sampler before (0.04–1.96 off six steps on),
    and a residual basis loaded into a Nicolaides optimizer was taken without a word."""
    saved, target = CASES[case]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)

    def trained(build: Any, steps: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        opt = build(model, cov_interval=2, inv_interval=2)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return model, opt

    checkpoint = trained(saved, 5, seed=1)[1].state_dict()
    models, opts = zip(*(trained(target, 3, seed=0) for _ in range(2)), strict=True)
    with pytest.raises(ValueError):
        opts[0].load_state_dict(checkpoint)
    for model, opt in zip(models, opts, strict=True):
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [tk.KFAC, tk.EKFAC, tk.TwoLevelKFAC])
def test_a_checkpoint_in_another_dtype_is_refused(cls: Any) -> None:
    """Factors saved in float32 loaded by a float64 model: refused, naming both dtypes and
    the fix (KFAC kept float32 factors for the rest of the run; EKFAC and two-level raised a
    bare dtype mismatch steps later)."""
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = cls(model)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    wide = cls(model.double())
    with pytest.raises(
        ValueError, match=r"factors are torch.float32, this optimizer's are torch.float64"
    ):
        wide.load_state_dict(opt.state_dict())


def stepped(cls: Any) -> torch.optim.Optimizer:
    """An optimizer of ``cls`` (``inverse_method="eigen"``) after one step of a small MLP."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = cls(model, inverse_method="eigen")
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return opt


def test_a_checkpoint_of_another_method_is_told() -> None:
    """EKFAC's or a two-level optimizer's checkpoint loaded by KFAC: a warning names both
    methods (what the other keeps beyond the factors is not used); the same method: none."""
    told = {
        "fine level 'ekfac' with no coarse level": stepped(tk.EKFAC),
        "fine level 'kfac' with coarse space nicolaides": stepped(tk.TwoLevelKFAC),
    }
    for saved_by, opt in told.items():
        with pytest.warns(RuntimeWarning, match=f"saved by {saved_by} and is loaded by fine"):
            stepped(tk.KFAC).load_state_dict(opt.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stepped(tk.KFAC).load_state_dict(stepped(tk.KFAC).state_dict())


@pytest.mark.parametrize(
    ("target", "entry"),
    [(tk.EKFAC, "scalings"), (tk.TwoLevelKFAC, "coarse"), (tk.KFACCorrected, "corrections")],
)
def test_a_checkpoint_missing_the_methods_state_is_refused_without_a_warning(
    target: Any, entry: str
) -> None:
    """KFAC's checkpoint loaded into EKFAC, a two-level or a KFAC-corrected optimizer: one
    error naming the method that saved it and the missing entry, and no warning before it
    (a warning said the extra state 'starts afresh', then a bare 'not an EKFAC state')."""
    checkpoint = stepped(tk.KFAC).state_dict()
    told = f"saved by fine level 'kfac' with no coarse level and has no '{entry}'"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=told):
            stepped(target).load_state_dict(checkpoint)


def test_spectral_which_matters_to_the_spectral_space_alone() -> None:
    """A residual space's checkpoint loads whatever ``spectral_which`` (only the spectral
    space reads it: it was refused); a spectral one of the other ``which`` is refused."""
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def stepped(space: str, which: str) -> torch.optim.Optimizer:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        opt = tk.TwoLevelKFAC(model, coarse_space=space, spectral_which=which)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return opt

    stepped("residual", "largest").load_state_dict(stepped("residual", "smallest").state_dict())
    with pytest.raises(ValueError, match="spectral_which"):
        stepped("spectral", "largest").load_state_dict(stepped("spectral", "smallest").state_dict())


@pytest.mark.parametrize("cls", [tk.KFAC, tk.EKFAC, tk.TwoLevelKFAC])
@pytest.mark.parametrize("fisher", ["mc", "empirical"])
@pytest.mark.parametrize("refused", ["shapes", "groups"])
def test_a_load_refused_between_backward_and_step_keeps_the_steps_statistics(
    cls: Any, fisher: str, refused: str
) -> None:
    """A checkpoint refused after ``backward()`` and before ``step()`` (by the
    preconditioner: other shapes; or by torch after the preconditioner loaded: other param
    groups) leaves the statistics captured in that forward and backward: the step is the one
    of a twin that never tried the load (the restore dropped them: the first step raised,
    later ones were 0.16 off)."""
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    torch.manual_seed(3)
    width = 6 if refused == "shapes" else 5
    other_model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))
    params: Any = other_model.parameters()
    if refused == "groups":
        params = [{"params": other_model[0].parameters()}, {"params": other_model[2].parameters()}]
    other = cls(other_model, params=params, fisher=fisher)
    F.cross_entropy(other_model(x), y).backward()
    other.step()
    models, opts = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        models.append(model)
        opts.append(cls(model, fisher=fisher, cov_interval=2, inv_interval=2))
    for step in range(4):
        for i, (model, opt) in enumerate(zip(models, opts, strict=True)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if i == 0 and step in (0, 2):  # capturing steps, the first with no factors yet
                with pytest.raises(ValueError, match=r"shapes|parameter groups"):
                    opt.load_state_dict(other.state_dict())
            opt.step()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_tselepidis_checkpoint_from_before_the_location_counts_is_told() -> None:
    """A ``coarse_space="tselepidis"`` state saved before its coarse matrix counted each
    layer's locations (no ``tselepidis_locations`` entry) loads with a warning: its saved
    ``F_c`` is used until the next refresh. Today's loads without one."""
    x, y = torch.randn(8, 1, 5, 5), torch.randint(0, 3, (8,))

    def stepped() -> torch.optim.Optimizer:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))
        opt = tk.TwoLevelKFAC(model, coarse_space="tselepidis", cov_interval=2)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return opt

    state = stepped().state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stepped().load_state_dict(state)
    del state["preconditioner"]["coarse"]["tselepidis_locations"]
    with pytest.warns(RuntimeWarning, match="predates 2026-12-04"):
        stepped().load_state_dict(state)


@pytest.mark.parametrize("key", ["steps", "generator", "factors", "damping"])
def test_a_state_without_an_entry_is_named(key: str) -> None:
    """A state missing an entry (edited, another version) raised a bare ``KeyError``; it
    names the entry now, and nothing is loaded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = tk.KFAC(model)
    state = opt.state_dict()
    del state["preconditioner"][key]
    with pytest.raises(ValueError, match=rf"lacks an entry '{key}'.*nothing was loaded"):
        tk.KFAC(model).load_state_dict(state)
