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
    out, block = capsys.readouterr().out, BLOCKS[index]
    if "opt" in namespace:  # it prints what it says: the step's statistics, the blocks
        expected = ["kl_scale"] if "last_stats" in block else []
        expected += ["weight  KFAC Linear"] if "describe_blocks" in block else []
        assert expected and all(text in out for text in expected), (expected, out)


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


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.MULTILINE)}


DOCS = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file_and_heading(doc: Path) -> None:
    """Every relative link of the docs names a file that exists, and its ``#anchor`` a
    heading there (the README's index of *docs/training_loops.md* links to its sections)."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


def test_every_training_loop_section_is_in_the_readme_index() -> None:
    guide = ROOT / "docs" / "training_loops.md"
    sections = re.findall(r"^## (.*)$", guide.read_text(), flags=re.MULTILINE)
    index = re.findall(
        r"^\| \[[^\n]*?\]\(docs/training_loops\.md#([^)]+)\) \|", README.read_text(), re.MULTILINE
    )
    assert sections and [_slug(s) for s in sections] == index
