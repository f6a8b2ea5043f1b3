"""The fine levels by name: ``fine="kfac" | "ekfac" | "kpsvd" | "kfac_corrected"`` of
:class:`~.preconditioner.KFACPreconditioner` and so of ``TwoLevelKFAC(..., fine=...)``."""

from __future__ import annotations

from .ekfac import EKFACFine
from .fine import FineLevel
from .kpsvd import KFACCorrectedFine, KPSVDFine

__all__ = ["FINE_LEVELS"]

FINE_LEVELS: dict[str, type[FineLevel]] = {
    cls.name: cls for cls in (FineLevel, EKFACFine, KPSVDFine, KFACCorrectedFine)
}
