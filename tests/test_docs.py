"""The README's Python examples run as written (documentation that cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
ANALYSIS = ROOT / "docs" / "analysis" / "README.md"


def test_readme_has_examples() -> None:
    assert BLOCKS, "README.md lost its usage example"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {}
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), namespace)
    if "opt" in namespace:
        assert "kl_scale" in capsys.readouterr().out


def test_the_analysis_example_runs_and_prints_what_the_doc_says(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = ANALYSIS.read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    exec(compile(block, "docs/analysis/README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "P = 83, inter-layer share of ‖F‖² = 0.48" in out and "P = 83" in text
    for number in ("0.564", "1.08", "0.583", "1.17", "0.722", "0.122"):
        assert number in out and number in text, number
