"""The fine levels a two-level preconditioner can use: ``M⁻¹`` = the block-diagonal inverse
of KFAC, EKFAC, KPSVD or KFAC-corrected (``TwoLevelKFAC(..., fine=...)``).

Each two-level class combines :class:`~.twolevel.TwoLevelPreconditioner` (coarse level,
combinations) with a fine-level preconditioner (factors, decompositions, ``apply_fine``) by
cooperative inheritance: the coarse level only calls ``apply_fine``, so every coarse space
and combination works with every fine level.
"""

from __future__ import annotations

from .ekfac import EKFACPreconditioner
from .kpsvd import KFACCorrectedPreconditioner, KPSVDPreconditioner
from .preconditioner import KFACPreconditioner
from .twolevel import TwoLevelPreconditioner

FINE_LEVELS: dict[str, type[KFACPreconditioner]] = {
    "kfac": KFACPreconditioner,
    "ekfac": EKFACPreconditioner,
    "kpsvd": KPSVDPreconditioner,
    "kfac_corrected": KFACCorrectedPreconditioner,
}


class TwoLevelEKFACPreconditioner(TwoLevelPreconditioner, EKFACPreconditioner):
    """Two-level preconditioner whose fine level is EKFAC."""


class TwoLevelKPSVDPreconditioner(TwoLevelPreconditioner, KPSVDPreconditioner):
    """Two-level preconditioner whose fine level is KPSVD."""


class TwoLevelKFACCorrectedPreconditioner(TwoLevelPreconditioner, KFACCorrectedPreconditioner):
    """Two-level preconditioner whose fine level is KFAC-corrected."""


TWO_LEVEL_PRECONDITIONERS: dict[str, type[TwoLevelPreconditioner]] = {
    "kfac": TwoLevelPreconditioner,
    "ekfac": TwoLevelEKFACPreconditioner,
    "kpsvd": TwoLevelKPSVDPreconditioner,
    "kfac_corrected": TwoLevelKFACCorrectedPreconditioner,
}
