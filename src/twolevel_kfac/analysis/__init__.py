"""Fisher analysis of small networks: exact curvature, approximation metrics, reports.

Checks the two claims the paper's verdict rests on — the energy-norm gain of the coarse
correction, and that the Fisher's off-diagonal (inter-layer) blocks can be discarded — on
a network of up to a few thousand parameters, with dense float64 matrices:

* :mod:`.exact`: the true Fisher (exact expectation over the likelihood), the empirical
  Fisher and Monte-Carlo estimates, from torch.func per-sample Jacobians, plus the same
  Fisher in the optimizer's per-sample statistics format (:func:`compute_curvature`);
* :mod:`.operators`: every method as a direction and a dense matrix, built with the
  optimizer's own code (:class:`MethodSet`: ``exact``, ``block_diagonal``, ``kfac*``,
  ``<coarse space>+<combination>``);
* :mod:`.metrics`: pure metric functions (cosine, F̂-norm error, coarse gain, spectra, block
  norms, captured off-diagonal mass);
* :mod:`.evaluate`, :mod:`.training`, :mod:`.pipeline`, :mod:`.report`: the
  ``tlkfac analyze CONFIG --out DIR`` command (:mod:`.command`, config :mod:`.config`).

Unlike the rest of the analysis layer's dependency rule (analysis → curvature), this
package deliberately imports :mod:`twolevel_kfac.optim` and :mod:`twolevel_kfac.twolevel`:
the analysed KFAC and two-level matrices are those of the optimizer's code paths, so the
analysis measures what trains.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy exports: ``tlkfac`` imports ``analysis.command`` to build its parser, which must not
# pull in pydantic / torch.func before the command runs.
_EXPORTS = {
    "ALL_METHODS": ".operators",
    "AnalyzeConfig": ".config",
    "Curvature": ".exact",
    "MethodSet": ".operators",
    "compute_curvature": ".exact",
    "load_config": ".config",
    "metrics": ".metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name], __name__)
    return module if name == "metrics" else getattr(module, name)
