"""``tlkfac bench memory --quick``: every method's extra peak memory and saved-state size,
the ratios to KFAC, and the targets' check."""

from __future__ import annotations

import json
from pathlib import Path

from twolevel_kfac.bench.footprints import over_target
from twolevel_kfac.cli import main


def test_memory_quick(tmp_path: Path) -> None:
    assert main(["bench", "memory", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "memory.json").read_text())
    (group,) = data["results"]
    rows = group["rows"]
    assert set(rows) == {"sgd", "kfac", "nicolaides+additive", "residual+adef2"}
    assert all(r["memory_error"] is None for r in rows.values())
    assert rows["sgd"]["state_mib"] < rows["kfac"]["state_mib"]  # momentum vs factors too
    assert rows["nicolaides+additive"]["state_mib"] <= 1.2 * rows["kfac"]["state_mib"]
    report = (tmp_path / "memory.md").read_text()
    assert "| nicolaides+additive |" in report and "above 1.2× KFAC's" in report
    md = tmp_path / "memory.md"
    md.unlink()
    assert main(["bench", "memory", "--render", "--out", str(tmp_path)]) == 0
    assert md.read_text() == report


def test_over_target_names_the_method_and_what() -> None:
    data = {
        "results": [
            {
                "problem": "p",
                "rows": {
                    "kfac": {"state_mib": 10.0, "peak_mib": 20.0},
                    "nicolaides+additive": {"state_mib": 11.0, "peak_mib": 21.0},
                    "residual+adef2": {"state_mib": 30.0, "peak_mib": 23.0},
                    "ekfac": {"state_mib": 50.0, "peak_mib": 50.0},  # not two-level
                },
            }
        ]
    }
    assert over_target(data) == ["p/residual+adef2 (state 3.00×)"]
