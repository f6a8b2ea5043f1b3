"""Peers timed beside our KFAC: ASDL's KFAC and kfac-pytorch's ``KFACPreconditioner``.

* **ASDL** (``pip install asdfghjkl``, imported as ``asdl``; our ``bench`` extra):
  ``KfacGradientMaker`` with the empirical Fisher of the whole batch, π-damping and
  Cholesky inverses (what ASDL's ``Kron.update_inv`` does), factors and inverses refreshed
  every T steps, running average weight 1 − 0.95 (the same work as ours at 0.95, not the
  same steps: ASDL's average starts from zero, docs/migrating.md), BatchNorm layers left to
  SGD (as ours),
  then ``torch.optim.SGD`` with momentum 0.9. ASDL 0.1a5 calls ``torch.cuda.nvtx.range``
  unconditionally, which raises on CPU-only torch builds ("NVTX functions not installed");
  :func:`asdl_status` replaces ASDL's ``nvtx`` handle with a no-op on such builds. ASDL
  calls the loss with ``reduction="sum"`` and divides by the batch size itself, so our
  mean losses are wrapped (:func:`reducible`). Its hooks trigger torch's "non-full
  backward hook" ``FutureWarning`` on every refresh and its import torch's
  ``torch.jit.script`` ``DeprecationWarning``; both are silenced.
* **kfac-pytorch** (gpauloski/kfac-pytorch, not on PyPI): given ``--external PATH`` of a
  local checkout (installed with ``pip install --no-deps PATH``: its ``__init__`` reads the
  package's version from installed metadata), ``kfac.preconditioner.KFACPreconditioner``
  with its defaults (eigen
  method, damping added to the eigenvalue products, the empirical Fisher of the loss's own
  backward pass), ``factor_update_steps = inv_update_steps = T``; the step is
  ``loss.backward(); preconditioner.step(); sgd.step()``.

* **The authors' code** (Koroko et al., GitHub ``Abdoulaye-Koroko/natural-gradients``):
  given ``--authors PATH`` of a checkout, its ``optimizers.kfac.KFAC`` and
  ``optimizers.twolevel_kfac.TwolevelKFAC`` preconditioners driven as its README does (a
  forward pass of a Fisher mini-batch with targets sampled from the model, its backward,
  ``step(update_params=False)``, then the loss's backward and ``step(update_params=True)``,
  then ``torch.optim.SGD``), the sampled pass at every iteration as the README has it (its
  ``KFAC`` counts iterations only inside that pass, so it cannot be skipped; the factors
  and inverses are still refreshed every ``T_cov = T_inv = T`` iterations).

Nothing here is imported unless a peer is asked for.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from twolevel_kfac.bench.methods import MethodSpec, Runner
from twolevel_kfac.experiments.losses import LossFn

__all__ = ["asdl_status", "authors_status", "build_runner", "kfac_pytorch_status", "reducible"]

ASDL_MISSING = (
    "ASDL is not installed: `pip install asdfghjkl torch==2.13.0` "
    "(or the `bench` extra: pip install -e '.[bench]')"
)
_NVTX_MODULES = ("asdl.precondition.natural_gradient", "asdl.operations.operation", "asdl.utils")


def asdl_status() -> str | None:
    """``None`` when ASDL can be used (its NVTX calls patched on CPU builds), else why not."""
    try:
        with warnings.catch_warnings():  # its import decorates with torch.jit.script
            warnings.simplefilter("ignore", DeprecationWarning)
            importlib.import_module("asdl")
    except ImportError as error:
        return f"{ASDL_MISSING} ({error})"
    except Exception as error:  # an ASDL release broken against this torch
        return f"ASDL failed to import with torch {torch.__version__}: {error!r}"
    warnings.filterwarnings("ignore", "Using a non-full backward hook", FutureWarning)
    if not torch.cuda.is_available():
        shim = types.SimpleNamespace(range=lambda *args, **kwargs: contextlib.nullcontext())
        for name in _NVTX_MODULES:
            module = sys.modules.get(name)
            if module is not None and hasattr(module, "nvtx"):
                module.nvtx = shim  # type: ignore[attr-defined]
    return None


def _on_path(path: str) -> str:
    """The checkout's resolved root, put first on ``sys.path`` (once)."""
    root = str(Path(path).expanduser().resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    return root


def _require(reason: str | None) -> None:
    """Raise ``RuntimeError(reason)`` for a peer that is not available."""
    if reason is not None:
        raise RuntimeError(reason)


def kfac_pytorch_status(path: str | None) -> str | None:
    """``None`` when ``kfac.preconditioner`` imports from the checkout at ``path``."""
    if not path:
        return "kfac-pytorch is not on PyPI; pass --external PATH of a local checkout"
    root = _on_path(path)
    try:
        importlib.import_module("kfac.preconditioner")
    except importlib.metadata.PackageNotFoundError:
        return (
            f"kfac-pytorch at {root} reads its version from installed package metadata: "
            f"install the checkout first, `pip install --no-deps {root}` (torch stays as is)"
        )
    except Exception as error:
        return f"cannot import kfac.preconditioner from {root}: {error!r}"
    return None


def authors_status(path: str | None) -> str | None:
    """``None`` when the authors' ``optimizers`` package imports from the checkout at
    ``path``, else why not."""
    if not path:
        return "the authors' code is not on PyPI; pass --authors PATH of a local checkout"
    root = _on_path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module("optimizers.kfac")
            importlib.import_module("optimizers.twolevel_kfac")
    except Exception as error:
        return f"cannot import optimizers.kfac / optimizers.twolevel_kfac from {root}: {error!r}"
    warnings.filterwarnings("ignore", "Using a non-full backward hook", FutureWarning)
    return None


def reducible(loss_fn: LossFn) -> Any:
    """Our mean loss as ASDL wants it: a function with a ``reduction`` argument."""

    def loss(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        value = loss_fn(output, target)
        return value * output.shape[0] if reduction == "sum" else value

    return loss


def _asdl_runner(
    spec: MethodSpec,
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    interval: int,
) -> Runner:
    _require(asdl_status())
    from asdl import KfacGradientMaker, PreconditioningConfig

    kw = spec.kwargs
    x, y = batch
    config = PreconditioningConfig(
        data_size=x.shape[0],
        damping=kw["damping"],
        preconditioner_upd_interval=interval,
        curvature_upd_interval=interval,
        ema_decay=1.0 - kw.get("ema_decay", 0.95),
        ignore_modules=[nn.BatchNorm1d, nn.BatchNorm2d],
    )
    maker = KfacGradientMaker(model, config, fisher_type="fisher_emp", loss_type="mse")
    opt = torch.optim.SGD(model.parameters(), lr=kw["lr"], momentum=0.9)
    loss = reducible(loss_fn)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        dummy = maker.setup_model_call(model, x)
        maker.setup_loss_call(loss, dummy, y)
        maker.forward_and_backward()
        opt.step()

    return Runner(step, opt, model)


def _kfac_pytorch_runner(
    spec: MethodSpec,
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    interval: int,
) -> Runner:
    kw = spec.kwargs
    _require(kfac_pytorch_status(kw.get("path")))
    from kfac.preconditioner import KFACPreconditioner

    preconditioner = KFACPreconditioner(
        model,
        factor_update_steps=interval,
        inv_update_steps=interval,
        damping=kw["damping"],
        factor_decay=kw.get("ema_decay", 0.95),
        kl_clip=kw["kl_clip"],
        lr=kw["lr"],
    )
    opt = torch.optim.SGD(model.parameters(), lr=kw["lr"], momentum=0.9)
    x, y = batch

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        preconditioner.step()
        opt.step()

    return Runner(step, opt, model)


def _authors_runner(
    spec: MethodSpec,
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    interval: int,
    likelihood: str,
) -> Runner:
    kw = spec.kwargs
    _require(authors_status(kw.get("path")))
    from optimizers.kfac import KFAC as AuthorsKFAC
    from optimizers.twolevel_kfac import TwolevelKFAC as AuthorsTwolevelKFAC

    from twolevel_kfac.curvature.likelihoods import sample_targets

    x, y = batch
    fisher_rows = max(1, round(kw["fisher_batch"] * x.shape[0]))
    common = {
        "damping": kw["damping"],
        "T_cov": interval,
        "T_inv": interval,
        "alpha": kw.get("ema_decay", 0.95),
        "constraint_norm": kw["kl_clip"] is not None,
        "clipping": kw["kl_clip"] or 0.0,
        "batch_size": fisher_rows,
    }
    if kw["variant"] == "kfac":
        preconditioner = AuthorsKFAC(model, **common)
    else:
        preconditioner = AuthorsTwolevelKFAC(
            model, **common, coarse_space=kw["coarse_space"], krylov=kw.get("krylov", False)
        )
    opt = torch.optim.SGD(model.parameters(), lr=kw["lr"], momentum=0.9)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        preconditioner.update_stats = True
        rows = torch.randint(0, x.shape[0], (fisher_rows,), generator=generator)
        output = model(x[rows])
        sampled = sample_targets(output, likelihood, generator)
        loss_fn(output, sampled).backward(retain_graph=True)
        preconditioner.step(update_params=False)
        opt.zero_grad(set_to_none=True)
        preconditioner.update_stats = False
        loss.backward()
        preconditioner.step(update_params=True)
        opt.step()

    return Runner(step, opt, model)


def build_runner(
    spec: MethodSpec,
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    interval: int,
    likelihood: str = "categorical",
) -> Runner:
    """A peer's runner (``spec.kind`` ``asdl``, ``kfac_pytorch`` or ``authors``).

    Raises:
        RuntimeError: The peer is not available (the message says why).
    """
    if spec.kind == "asdl":
        return _asdl_runner(spec, model, batch, loss_fn, interval)
    if spec.kind == "authors":
        return _authors_runner(spec, model, batch, loss_fn, interval, likelihood)
    return _kfac_pytorch_runner(spec, model, batch, loss_fn, interval)
