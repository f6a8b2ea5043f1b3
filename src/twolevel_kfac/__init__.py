"""Two-level KFAC: Kronecker-factored natural-gradient training with coarse-space corrections.

Public API (``../shared/design.md`` §2)::

    import twolevel_kfac as tk
    opt = tk.KFAC(model, lr=0.01, damping=1e-3, fisher="mc", likelihood="categorical")
"""

from __future__ import annotations

from .optim.kfac import KFAC
from .optim.options import CurvatureOptions
from .optim.preconditioner import KFACPreconditioner
from .optim.twolevel import CoarseOptions, TwoLevelKFAC, TwoLevelPreconditioner

__all__ = [
    "KFAC",
    "CoarseOptions",
    "CurvatureOptions",
    "KFACPreconditioner",
    "TwoLevelKFAC",
    "TwoLevelPreconditioner",
]
__version__ = "0.1.0"
