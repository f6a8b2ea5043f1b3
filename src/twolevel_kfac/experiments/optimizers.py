"""The optimizers of the paper's figures by name, and the arguments each one accepts.

| method | optimizer |
|---|---|
| ``kfac`` | :class:`twolevel_kfac.KFAC` |
| ``ekfac``, ``kpsvd``, ``kfac_corrected`` | ``tk.EKFAC``, ``tk.KPSVD``, ``tk.KFACCorrected`` |
| ``nico``, ``spectral``, ``residu``, | :class:`twolevel_kfac.TwoLevelKFAC` with the |
| ``kry_nico``, ``kry_residu``, ``previous`` | ``coarse_space`` of ``TWO_LEVEL_METHODS`` |
| ``sgd`` | ``torch.optim.SGD``, momentum 0.9 and Nesterov unless overridden |
| ``adam`` | ``torch.optim.Adam`` |
| ``adamw`` | ``torch.optim.AdamW`` (``weight_decay``: the config's, default 0, not torch's 1e-2) |

The KFAC family also takes ``fallback`` (``sgd`` | ``adamw``: the step of the parameters
without a curvature block, e.g. LayerNorms and positional tables) and ``fallback_options``
(the ``torch.optim.AdamW`` arguments of ``fallback: adamw``).

``allowed_arguments`` is what a config may set for a method (the config checks keys
against it before anything is built); ``make_optimizer`` builds one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "FINE_METHODS",
    "KFAC_FAMILY",
    "METHODS",
    "TWO_LEVEL_METHODS",
    "allowed_arguments",
    "is_kfac_family",
    "make_optimizer",
]

# Figure label -> ``coarse_space`` argument of TwoLevelKFAC.
TWO_LEVEL_METHODS: dict[str, str] = {
    "nico": "nicolaides",
    "spectral": "spectral",
    "residu": "residual",
    "kry_nico": "krylov_nicolaides",
    "kry_residu": "krylov_residual",
    "previous": "tselepidis",
}
# Other fine levels (beyond the paper) -> class name in ``twolevel_kfac``.
FINE_METHODS: dict[str, str] = {
    "ekfac": "EKFAC",
    "kpsvd": "KPSVD",
    "kfac_corrected": "KFACCorrected",
}
KFAC_FAMILY = ("kfac", *FINE_METHODS, *TWO_LEVEL_METHODS)
METHODS = (*KFAC_FAMILY, "sgd", "adam", "adamw")

_KFAC_OWN = frozenset(
    {"lr", "momentum", "weight_decay", "nesterov", "nonfinite_policy"}
    | {"fallback", "fallback_options"}  # KFAC's step of the parameters without a block
)
_SGD_ARGS = frozenset({"lr", "momentum", "weight_decay", "nesterov", "dampening"})
_ADAM_ARGS = frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad"})


def is_kfac_family(method: str) -> bool:
    """Whether ``method`` is KFAC or one of its two-level variants."""
    return method in KFAC_FAMILY


def allowed_arguments(method: str) -> frozenset[str]:
    """Keyword arguments a config may give the optimizer of ``method``.

    Two-level methods take every KFAC argument plus the coarse options except
    ``coarse_space``, which the method name fixes.

    Args:
        method: One of ``METHODS``.

    Returns:
        The argument names.

    Raises:
        ValueError: Unknown method.
    """
    from twolevel_kfac.optim.damping import DAMPING_ARGUMENTS
    from twolevel_kfac.optim.kpsvd import KPSVDFine
    from twolevel_kfac.optim.options import COARSE_ARGUMENTS, CURVATURE_ARGUMENTS

    if method == "sgd":
        return _SGD_ARGS
    if method in ("adam", "adamw"):
        return _ADAM_ARGS
    kfac_args = _KFAC_OWN | CURVATURE_ARGUMENTS | DAMPING_ARGUMENTS
    if method == "kfac" or method == "ekfac":
        return kfac_args
    if method in ("kpsvd", "kfac_corrected"):
        return kfac_args | KPSVDFine.extra_arguments
    if method in TWO_LEVEL_METHODS:
        fine = {"fine", *KPSVDFine.extra_arguments}
        return kfac_args | fine | (COARSE_ARGUMENTS - {"coarse_space"})
    raise ValueError(f"unknown method {method!r}; allowed: {list(METHODS)}")


def _dtype(value: Any) -> Any:
    """``"float64"`` → ``torch.float64`` (configs spell dtypes as strings)."""
    if isinstance(value, str):
        dtype = getattr(torch, value, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"factor_dtype {value!r} is not a torch dtype name (e.g. 'float64')")
        return dtype
    return value


def make_optimizer(name: str, model: nn.Module, **hparams: Any) -> torch.optim.Optimizer:
    """Build the optimizer of a method of the paper's figures.

    Args:
        name: One of ``METHODS`` (case-insensitive).
        model: The model whose parameters are optimised.
        **hparams: Constructor arguments (``lr``, ``damping``, …); for SGD ``momentum``
            and ``nesterov`` override the defaults 0.9 and ``True`` (``False`` where the
            momentum is 0 or ``dampening`` is set: torch refuses Nesterov there, with a
            message that did not say the default was ours); ``factor_dtype`` may be a
            dtype name.

    Returns:
        The optimizer.

    Raises:
        ValueError: Unknown method name, or an argument value the optimizer rejects.
        TypeError: An argument the optimizer does not take.
    """
    import twolevel_kfac
    from twolevel_kfac import KFAC, TwoLevelKFAC

    key = name.lower()
    if key == "sgd":
        heavy = hparams.get("momentum", 0.9) > 0 and not hparams.get("dampening", 0)
        sgd_args: dict[str, Any] = {"momentum": 0.9, "nesterov": heavy, **hparams}
        return torch.optim.SGD(model.parameters(), **sgd_args)
    if key == "adam":
        return torch.optim.Adam(model.parameters(), **hparams)
    if key == "adamw":
        return torch.optim.AdamW(model.parameters(), **hparams)
    if "factor_dtype" in hparams:
        hparams = {**hparams, "factor_dtype": _dtype(hparams["factor_dtype"])}
    if key == "kfac":
        return KFAC(model, **hparams)
    if key in FINE_METHODS:
        optimizer_class: type[KFAC] = getattr(twolevel_kfac, FINE_METHODS[key])
        return optimizer_class(model, **hparams)
    if key in TWO_LEVEL_METHODS:
        return TwoLevelKFAC(model, coarse_space=TWO_LEVEL_METHODS[key], **hparams)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {list(METHODS)}")
