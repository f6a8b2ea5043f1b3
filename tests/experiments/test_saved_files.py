"""Files the experiment app saves and reads back, changed after they were written: a
checkpoint, a snapshot of the model along a run, a stage of ``tlkfac analyze``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from file_damage import flip_tensor_byte
from twolevel_kfac.analysis.stages import Stages
from twolevel_kfac.experiments.checkpoint import check_crc, load_snapshot, save_checkpoint


def _snapshot(path: Path) -> Path:
    model = {"w": torch.arange(64, dtype=torch.float64)}
    return save_checkpoint(path, {"kind": "snapshot", "step": 3, "model": model})


def test_a_changed_snapshot_is_refused(tmp_path: Path) -> None:
    """A flipped bit in a snapshot went into ``tlkfac analyze --run``'s metrics along the
    run, silently (the checkpoint alone was checked). Refused by name now."""
    path = _snapshot(tmp_path / "step3.pt")
    assert torch.equal(load_snapshot(path)["model"]["w"], torch.arange(64.0, dtype=torch.float64))
    flip_tensor_byte(path)
    with pytest.raises(ValueError, match=r"step3.pt is corrupt: .* fails its CRC-32 check"):
        load_snapshot(path)


def test_a_changed_stage_is_computed_again(tmp_path: Path) -> None:
    """A kept stage of ``tlkfac analyze`` with a flipped bit was read back as it stood
    (a changed ``methods.pt`` went into the report); it is computed again now."""
    calls: list[int] = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.linspace(0, 1, 64, dtype=torch.float64)

    want = torch.linspace(0, 1, 64, dtype=torch.float64)
    Stages(tmp_path, "key")("methods", compute)
    kept = Stages(tmp_path, "key")
    assert kept("methods", compute).equal(want) and kept.resumed == ["methods"]
    assert len(calls) == 1
    flip_tensor_byte(tmp_path / ".stages" / "key" / "methods.pt")
    stages = Stages(tmp_path, "key")
    assert stages("methods", compute).equal(want)
    assert stages.resumed == [] and len(calls) == 2


def test_a_file_saved_without_crcs_is_read(tmp_path: Path) -> None:
    """``torch.serialization.set_crc32_options(False)`` (faster saves of large models)
    writes every CRC as 0: such a checkpoint was refused as changed. It is read now
    (unchecked: there is nothing to check against)."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        path = _snapshot(tmp_path / "step3.pt")
    finally:
        torch.serialization.set_crc32_options(before)
    check_crc(path)
    assert load_snapshot(path)["step"] == 3
