"""A resumable ``tlkfac analyze``: each finished stage of a run is kept in
``OUT/.stages/<key>/``, so that a run stopped part-way (Ctrl-C, a kill, the end of a
session: the ViT and 50k-parameter analyses take 8–10 minutes) goes on from its last
finished stage when the same command is run again.

The stages are the state's metrics (every method, its spectra and solves), the Fisher's
block structure, the damping sweep, each training run, each snapshot along a run, and the
analysed state's training (``state_steps``). Each is seeded on its own (no stage reads a
random stream another one moved), so a resumed run writes what an uninterrupted one
writes, bit for bit, but for its timings. ``<key>`` hashes the configuration, the run
directory analysed, the library's source, torch's thread count and ``$TLKFAC_DATA``:
another of these starts afresh beside it. The folder is removed once every output is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..experiments.checkpoint import check_crc, save_checkpoint

__all__ = ["STAGE_DIR", "Stages", "stage_key"]

STAGE_DIR = ".stages"
T = TypeVar("T")


def stage_key(config: Any, run_dir: str | Path | None) -> str:
    """The key of a run's stages: a hash of ``config`` (a pydantic model), the resolved
    ``run_dir``, the library's source (a code change between a stop and the rerun: its
    stages are not reused), torch's thread count (it moves the last bits) and
    ``$TLKFAC_DATA``."""
    package = Path(__file__).resolve().parents[1]
    source = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        source.update(path.read_bytes())
    described = {
        "config": config.model_dump(mode="json"),
        "run_dir": None if run_dir is None else str(Path(run_dir).resolve()),
        "source": source.hexdigest(),
        "threads": torch.get_num_threads(),
        "data": os.environ.get("TLKFAC_DATA"),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


class Stages:
    """The finished stages of one analysis under ``out`` (``None``: nothing kept).

    ``stages(name, compute)`` returns the kept value of stage ``name`` or computes it with
    ``compute()`` and keeps it (atomically: a run killed while writing leaves the stage
    missing, never torn); :attr:`resumed` lists the stages read back.
    """

    def __init__(self, out: str | Path | None, key: str, fresh: bool = False) -> None:
        self.root = None if out is None else Path(out) / STAGE_DIR
        self.dir = None if self.root is None else self.root / key
        self.resumed: list[str] = []
        if fresh and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __call__(self, name: str, compute: Callable[[], T]) -> T:
        """The kept value of stage ``name``, else ``compute()``, kept."""
        if self.dir is None:
            return compute()
        path = self.dir / f"{name.replace('/', '--')}.pt"
        if path.exists():
            try:
                check_crc(path)  # a changed byte was used before 2026-12-08
                value: T = torch.load(path, weights_only=True)["value"]
            except Exception:  # another version's, torn or changed by hand: computed again
                path.unlink(missing_ok=True)
            else:
                self.resumed.append(name)
                return value
        value = compute()
        self.dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, {"value": value})
        return value

    def finish(self) -> None:
        """Remove the kept stages (every output is written)."""
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
