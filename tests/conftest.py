"""Shared test set-up: make ``tests/`` importable (``from oracles import ...``) and fixtures."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# The tests mirror the package (tests/optim/, tests/twolevel/, …); the oracles and the
# helpers some test modules share are imported by bare name from any of them.
_TESTS = Path(__file__).resolve().parent
for _folder in [_TESTS, *sorted(p for p in _TESTS.iterdir() if p.is_dir() and p.name[0] != "_")]:
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

# Hypothesis draws the same examples on every machine and every run (a property test that
# fails on one clone's random draw and passes on another's is a flaky test); its example
# database stays out of the tree.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")

# The tests use tiny tensors: intra-op threads only add spin-wait overhead (5x slower on a
# loaded 2-CPU machine).
torch.set_num_threads(1)


@pytest.fixture
def float64() -> Iterator[None]:
    """Run the test with ``torch.float64`` as default dtype, restoring the previous one."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
