"""Benchmarks: step-time ratios to SGD, scaling, peers side by side, time to a target loss.

``tlkfac bench [NAME ...]`` runs ``step_time``, ``scaling``, ``asdl`` and
``time_to_target`` by default (``eigh_dtype``, ``distributed`` and ``compile`` by name)
and writes ``NAME.json``, ``NAME.md`` and PNGs to ``--out`` (default ``docs/benchmarks``).
``--quick`` is a fast check that everything runs (its numbers are not worth keeping);
``--render`` rewrites the markdown and plots from existing JSON.
"""

from __future__ import annotations

from twolevel_kfac.extras import require_extra

require_extra("experiments", "twolevel_kfac.bench")

from twolevel_kfac.bench.command import add_arguments, run  # noqa: E402 (after the check)

__all__ = ["add_arguments", "run"]
