"""Fisher analysis of small networks: exact curvature, approximation metrics, reports.

Checks the two claims the paper's verdict rests on — the energy-norm gain of the coarse
correction, and that the Fisher's off-diagonal (inter-layer) blocks can be discarded — on
networks of up to ~12k parameters with dense float64 matrices, and up to ~100k
(``max_params``) matrix-free:

* :mod:`.problems`: the networks (``mlp``, ``cnn``, and the tiny Vision Transformer of
  :mod:`.vit`, whose attention gets the optimizer's two blocks ``in_proj`` / ``out_proj``)
  and the data; parameters without a curvature block (norms, positional tables) are held
  fixed and left out of ``θ`` (:mod:`.coordinates`);
* :mod:`.exact`: the true Fisher (exact expectation over the likelihood), the empirical
  Fisher and Monte-Carlo estimates, from torch.func per-sample Jacobians, plus the same
  Fisher in the optimizer's per-sample statistics format (:func:`compute_curvature`);
* :mod:`.products`: exact Fisher–vector products by torch.func jvp/vjp (no dense ``F``);
* :mod:`.backends`: dense (Cholesky) or matrix-free (conjugate gradients, :mod:`.krylov`)
  products and solves with ``F̂ = F + λI``;
* :mod:`.operators`: every method as a direction and an operator ``v ↦ P v``, built with
  the optimizer's own code (:class:`MethodSet`: ``exact``, ``block_diagonal``, ``kfac*``,
  ``ekfac``, ``kpsvd``, ``kfac_corrected``, ``<coarse space>+<combination>``), and
  :mod:`.dense` as dense matrices;
* :mod:`.metrics`: pure metric functions (cosine, F̂-norm error, coarse gain, spectra, block
  norms, captured off-diagonal mass); :mod:`.spectrum` (dense eigenvalues or Lanczos
  extremes of ``P F̂``) and :mod:`.structure` (block norms, dense / Gram / Hutchinson);
* :mod:`.evaluate`, :mod:`.training`, :mod:`.pipeline`, :mod:`.report`: the
  ``tlkfac analyze CONFIG --out DIR`` command (:mod:`.command`, config :mod:`.config`);
* :mod:`.along_run` (:mod:`.along_run_report`): the same metrics at the model snapshots of
  a real ``tlkfac run`` (``--run RUN_DIR``, ``problem.keep_checkpoints: true``).

Unlike the rest of the analysis layer's dependency rule (analysis → curvature), this
package deliberately imports :mod:`twolevel_kfac.optim` and :mod:`twolevel_kfac.twolevel`:
the analysed KFAC and two-level matrices are those of the optimizer's code paths, so the
analysis measures what trains.
"""

from __future__ import annotations

import importlib
from typing import Any

from twolevel_kfac.extras import require_extra

require_extra("experiments", "twolevel_kfac.analysis")

# Lazy exports: ``tlkfac`` imports ``analysis.command`` to build its parser, which must not
# pull in pydantic / torch.func before the command runs.
_EXPORTS = {
    "ALL_METHODS": ".operators",
    "AnalyzeConfig": ".config",
    "Curvature": ".exact",
    "FisherProducts": ".products",
    "MatrixFreeOptions": ".backends",
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
