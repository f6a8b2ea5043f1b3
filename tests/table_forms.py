"""Test helper: optimizers built inside :func:`dense_tables` give their small untied
embedding tables the dense one-hot token factor ``G`` (:mod:`twolevel_kfac.curvature.
token_form`) instead of the vector of frequencies, so that one table can take either path."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from twolevel_kfac.optim.fine import FineLevel


@contextmanager
def dense_tables() -> Iterator[None]:
    """Fine levels read as if they needed the dense ``G`` while active (as KPSVD's do)."""
    saved = FineLevel.diagonal_tables
    FineLevel.diagonal_tables = False
    try:
        yield
    finally:
        FineLevel.diagonal_tables = saved
