"""Where a result came from: the code's git commit (and whether the tree was dirty), the
torch version, the thread count and the machine.

Every start and every resume of a run appends one line to ``RUN_DIR/provenance.jsonl``
(:func:`record`), so a run that several sessions or commits finished says so; a report
sums up the lines of all its runs (:func:`describe`). The commit is that of the checkout
the package is imported from (``git rev-parse HEAD`` there when this module is imported, so
a long comparison records the code it runs; ``unknown`` for an installed copy), and *dirty*
means tracked files differed from it.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import subprocess
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["FILE", "collect", "describe", "describe_runs", "read", "record"]

FILE = "provenance.jsonl"
_SOURCE = Path(__file__).resolve().parents[3]  # the checkout holding src/twolevel_kfac


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(_SOURCE), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def code_state() -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the checkout as this process first saw it (when this module
    was imported): the code a long comparison runs is what it imported at its start, even
    if the checkout moves on while it runs."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return commit or "unknown", bool(status) if status is not None else None


code_state()


def collect(event: str = "start") -> dict[str, Any]:
    """The facts of this process that a result depends on."""
    commit, dirty = code_state()
    return {
        "event": event,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
    }


def record(run_dir: str | Path, event: str) -> dict[str, Any]:
    """Append :func:`collect` to ``run_dir/provenance.jsonl``; return it. A resume with
    another thread count than the run's last start or resume is warned of: the sums run in
    another order, so it does not continue bit for bit."""
    entry = collect(event)
    before = read(run_dir) if event == "resume" else []
    if before and before[-1].get("threads") not in (None, entry["threads"]):
        warnings.warn(
            f"this run ran with {before[-1]['threads']} torch thread(s) and resumes with "
            f"{entry['threads']}: its floating-point sums run in another order, so it will "
            "not continue bit for bit the run it would have been; resume with --threads "
            f"{before[-1]['threads']}",
            RuntimeWarning,
            stacklevel=2,
        )
    with (Path(run_dir) / FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
    return entry


def read(run_dir: str | Path) -> list[dict[str, Any]]:
    """The entries of ``run_dir/provenance.jsonl`` (none for runs made before it existed)."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _commit(entry: Mapping[str, Any]) -> str:
    commit = str(entry.get("git_commit", "unknown"))
    short = commit[:7] if commit != "unknown" else commit
    return short + (" (dirty)" if entry.get("git_dirty") else "")


def describe(entries: Iterable[Mapping[str, Any]], runs_without: int = 0) -> str:
    """One markdown paragraph: the commits, torch versions, thread counts and machines the
    entries name (each once, in order of appearance)."""
    entries = list(entries)
    if not entries:
        return "Provenance: not recorded (runs made before provenance.jsonl existed)."

    def distinct(key: Any) -> str:
        return ", ".join(dict.fromkeys(str(key(e)) for e in entries))

    text = (
        f"Provenance ({len(entries)} starts and resumes): commit {distinct(_commit)}; "
        f"torch {distinct(lambda e: e.get('torch'))}; "
        f"{distinct(lambda e: e.get('threads'))} thread(s); "
        f"machine {distinct(lambda e: e.get('machine'))}."
    )
    if runs_without:
        text += f" {runs_without} run(s) have no provenance.jsonl (made before it existed)."
    return text


def describe_runs(root: str | Path, runs: Iterable[Path] | None = None) -> str:
    """:func:`describe` of the runs ``runs`` of a comparison directory (default: every
    ``<method>/seed<k>/`` with a ``metrics.jsonl``)."""
    if runs is None:
        run_dirs = sorted(p.parent for p in Path(root).glob("*/seed*/metrics.jsonl"))
    else:
        run_dirs = sorted(runs)
    entries = [entry for run in run_dirs for entry in read(run)]
    return describe(entries, runs_without=sum(1 for run in run_dirs if not read(run)))
