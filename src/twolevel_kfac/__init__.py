"""Two-level KFAC: Kronecker-factored natural-gradient training with coarse-space corrections.

Public API::

    import twolevel_kfac as tk
    opt = tk.KFAC(model, lr=0.01, damping=1e-3, fisher="mc", likelihood="categorical")

Fine levels beside KFAC: ``tk.EKFAC`` (George et al. 2018), ``tk.KPSVD`` and
``tk.KFACCorrected`` (Koroko et al. 2023), also as ``tk.TwoLevelKFAC(..., fine=...)``;
``adaptive_damping=True`` / ``qmodel_lr_momentum=True`` (Martens & Grosse 2015 §6.5, §7) on
all of them.
"""

from __future__ import annotations

from .conversion import conv1d_from_linear, linear_from_conv1d
from .curvature.layer_types import layer_type, register_layer_type, unregister_layer_type
from .optim.damping import DampingOptions
from .optim.ekfac import EKFAC, EKFACPreconditioner
from .optim.kfac import KFAC
from .optim.kpsvd import KPSVD, KFACCorrected, KFACCorrectedPreconditioner, KPSVDPreconditioner
from .optim.options import CurvatureOptions
from .optim.preconditioner import KFACPreconditioner
from .optim.twolevel import CoarseOptions, TwoLevelKFAC, TwoLevelPreconditioner

__all__ = [
    "EKFAC",
    "KFAC",
    "KPSVD",
    "CoarseOptions",
    "CurvatureOptions",
    "DampingOptions",
    "EKFACPreconditioner",
    "KFACCorrected",
    "KFACCorrectedPreconditioner",
    "KFACPreconditioner",
    "KPSVDPreconditioner",
    "TwoLevelKFAC",
    "TwoLevelPreconditioner",
    "conv1d_from_linear",
    "layer_type",
    "linear_from_conv1d",
    "register_layer_type",
    "unregister_layer_type",
]
__version__ = "0.1.0"
