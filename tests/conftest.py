"""Shared test set-up: make ``tests/`` importable (``from oracles import ...``) and fixtures."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

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
