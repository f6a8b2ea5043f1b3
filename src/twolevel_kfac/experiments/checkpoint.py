"""Run checkpoints: atomic writes, ``weights_only`` loading, refusal of another config.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
``torch.load(..., weights_only=True)`` reads it (no pickled objects):

| key | content |
|---|---|
| ``format`` | ``FORMAT`` |
| ``fingerprint`` | ``ExperimentConfig.fingerprint()`` of the resolved run config |
| ``config`` | JSON of ``ExperimentConfig.fingerprinted()`` (to say what differs) |
| ``model``, ``optimizer`` | their ``state_dict()`` (``optimizer`` ``None`` in the slim final |
| | checkpoint of a finished run, ``problem.final_checkpoint: model``) |
| ``rng`` | torch / numpy / python global RNG states as tensors |
| ``loop`` | the training loop's position and accumulators (``runner.LoopState``) |

Writes go to a temporary file in the same directory, are flushed and fsync'ed, then
``os.replace``'d over the old checkpoint: a crash leaves the old or the new file, never a
torn one.

Snapshots (``problem.keep_checkpoints: true``): ``keep_snapshot`` also keeps the model alone
as ``run_dir/snapshots/step<k>.pt`` at the start of a run and each time the runner writes
its checkpoint (every ``problem.checkpoint_every`` steps and at the end), written the same
way and as ``weights_only``-safe: ``{"format", "kind": "snapshot", "step", "model"}``.
``list_snapshots`` / ``load_snapshot`` read them back (``tlkfac analyze --run DIR``).
"""

from __future__ import annotations

import json
import os
import random
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from twolevel_kfac.experiments.yaml_io import config_diff

if TYPE_CHECKING:
    from twolevel_kfac.experiments.config import ProblemSpec

__all__ = [
    "FORMAT",
    "SNAPSHOT_DIR",
    "check_crc",
    "get_rng_state",
    "keep_snapshot",
    "list_snapshots",
    "load_checkpoint",
    "load_snapshot",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT = 1
SNAPSHOT_DIR = "snapshots"
_SNAPSHOT_NAME = re.compile(r"step(\d+)\.pt")


def get_rng_state() -> dict[str, Any]:
    """The global torch (CPU, and every CUDA device when present), numpy and python RNG
    states, as tensors (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    version, internal, gauss = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "cuda": cuda,
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states of ``get_rng_state`` (CUDA states only when saved on a machine
    with the same number of CUDA devices; otherwise the CUDA generators are left alone)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda", [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    legacy = (npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    np.random.set_state(legacy)  # noqa: NPY002
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file, fsync, ``os.replace``).

    Args:
        path: Destination, e.g. ``run_dir / "checkpoint.pt"``.
        payload: The checkpoint dict (see the module docstring).

    Returns:
        ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save({"format": FORMAT, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_crc(path: Path, advice: str = "resume from another copy, or start afresh") -> None:
    """Refuse a file of :func:`save_checkpoint` whose bytes were changed after it was
    written: ``torch.save``'s zip records a CRC-32 of every entry, which ``torch.load``
    does not check (a flipped byte in a tensor resumed a run 0.059 off an uninterrupted
    one, silently). One read of the file; a file that is no zip is left to
    ``torch.load``'s own error, and one saved without CRCs (torch's
    ``set_crc32_options(False)``: every CRC 0) is not checked (it was refused as changed
    before 2026-12-08).

    Args:
        path: The file.
        advice: What to do instead, for the message.

    Raises:
        ValueError: naming the file and the entry that fails its CRC.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            if all(entry.CRC == 0 for entry in archive.infolist() if entry.file_size):
                return  # written without CRCs
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return
    except Exception as error:  # (a CRC error surfaces from some members as itself)
        bad = str(error)
    if bad is not None:
        raise ValueError(
            f"{path} is corrupt: its entry {bad} fails its CRC-32 check (the file was "
            f"changed after it was written); {advice}"
        )


def load_checkpoint(
    path: str | Path, fingerprint: str, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Read a checkpoint written for the config with ``fingerprint``.

    Args:
        path: The checkpoint file.
        fingerprint: ``ExperimentConfig.fingerprint()`` of the run being resumed.
        config: ``ExperimentConfig.fingerprinted()`` of that run, to name what differs.

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a checkpoint of this format, or of another config (the message
            lists the differing keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path} to resume from")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a checkpoint")
    check_crc(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        # torch's first line only: its advice to load with weights_only=False (which
        # would run code from the file) does not apply to a corrupt or foreign file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if "weights_only" in reason:
            reason = "its contents are not tensors and plain values, as a checkpoint's are"
        raise ValueError(
            f"{path} is not a readable checkpoint (corrupt, truncated or not written by "
            f"tlkfac): {type(error).__name__}{': ' + reason if reason else ''}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a twolevel_kfac run checkpoint (format {FORMAT})")
    if state["fingerprint"] != fingerprint:
        saved = json.loads(state["config"])
        diff = config_diff(saved, config) if config is not None else []
        detail = _differences(diff)
        raise ValueError(
            f"{path} was written for another config ({detail}); resume with the same "
            "config or start a new run directory"
        )
    return state


def keep_snapshot(
    problem: ProblemSpec, run_dir: str | Path, step: int, model_state: Mapping[str, torch.Tensor]
) -> Path | None:
    """Keep the model state of ``step`` as ``run_dir/snapshots/step<step>.pt`` when
    ``problem.keep_checkpoints`` is set (atomically, CPU tensors; rewriting a step that
    is already kept, as a resumed run does, replaces it by the same state).

    Args:
        problem: The run's problem section (``keep_checkpoints``).
        run_dir: The run directory.
        step: The optimizer steps taken so far.
        model_state: The model's ``state_dict()``.

    Returns:
        The snapshot's path, or ``None`` when snapshots are off or a floating-point tensor
        of the state is not finite (a diverged run keeps only its good states).
    """
    if not problem.keep_checkpoints:
        return None
    state = {k: v.detach().cpu() for k, v in model_state.items()}
    if any(v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in state.values()):
        return None
    folder = Path(run_dir) / SNAPSHOT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"kind": "snapshot", "step": int(step), "model": state}
    return save_checkpoint(folder / f"step{int(step)}.pt", payload)


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The snapshots of a run directory as ``(step, path)``, in step order."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    found = []
    for path in folder.glob("step*.pt") if folder.is_dir() else []:
        match = _SNAPSHOT_NAME.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def load_snapshot(path: str | Path) -> dict[str, Any]:
    """Read a snapshot of ``keep_snapshot`` (``weights_only``).

    Returns:
        ``{"format", "kind", "step", "model"}``.

    Raises:
        ValueError: Not a readable snapshot of this format, or changed after it was
            written (its CRC-32s: used as it was before 2026-12-08).
    """
    check_crc(Path(path), "delete it to leave that step out, or rerun the training run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise ValueError(f"{path} is not a readable snapshot: {error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise ValueError(f"{path} is not a twolevel_kfac model snapshot (format {FORMAT})")
    return state


_NAMES = (".name:", "dataset.")  # (a model's or a data set's name: the likely cause)
_SHOWN = 10


def _differences(diff: list[str]) -> str:
    """The config keys that differ, names of models and data sets first, at most
    :data:`_SHOWN` of them and how many more (the cut was silent before 2026-12-11: a
    trial's eleventh, left out, named the other model)."""
    if not diff:
        return "unknown differences"
    ordered = sorted(diff, key=lambda line: not any(name in line for name in _NAMES))
    more = len(ordered) - _SHOWN
    return "; ".join(ordered[:_SHOWN]) + (f"; … and {more} more" if more > 0 else "")
