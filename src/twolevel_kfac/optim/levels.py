"""The fine levels by name: ``fine="kfac" | "ekfac" | "kpsvd" | "kfac_corrected"`` of
:class:`~.preconditioner.KFACPreconditioner` and so of ``TwoLevelKFAC(..., fine=...)``."""

from __future__ import annotations

from .ekfac import EKFACFine
from .fine import FineLevel
from .kpsvd import KFACCorrectedFine, KPSVDFine
from .options import check_choice

__all__ = ["FINE_LEVELS", "fine_level_type"]

FINE_LEVELS: dict[str, type[FineLevel]] = {
    cls.name: cls for cls in (FineLevel, EKFACFine, KPSVDFine, KFACCorrectedFine)
}


def fine_level_type(name: str) -> type[FineLevel]:
    """The fine level called ``name``.

    Raises:
        ValueError: no fine level has that name (the message lists them).
    """
    check_choice("fine", name, FINE_LEVELS)
    return FINE_LEVELS[name]
