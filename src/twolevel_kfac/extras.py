"""The optional parts of the package and the extras that install their dependencies.

``pip install twolevel-kfac`` brings the optimizers and torch alone. The experiment
application (``tlkfac``, :mod:`twolevel_kfac.experiments`), the Fisher analysis
(:mod:`twolevel_kfac.analysis`) and the benchmarks (:mod:`twolevel_kfac.bench`) need the
``experiments`` extra: importing them without it raises an ``ImportError`` that names the
extra and the install command, instead of a bare ``No module named 'pydantic'``.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRA_MODULES", "missing_modules", "require_extra"]

EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "experiments": ("numpy", "yaml", "pydantic", "tqdm", "matplotlib"),
}
"""The importable modules each extra provides."""


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    return [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]


def require_extra(extra: str, what: str) -> None:
    """Refuse to go on without the modules of ``extra``.

    Args:
        extra: the name of the extra (a key of :data:`EXTRA_MODULES`).
        what: the part of the package that needs it, for the message.

    Raises:
        ImportError: naming the missing modules and ``pip install 'twolevel-kfac[extra]'``.
    """
    missing = missing_modules(extra)
    if missing:
        raise ImportError(
            f"{what} needs the '{extra}' extra (missing: {', '.join(missing)}): "
            f"pip install 'twolevel-kfac[{extra}]'"
        )
