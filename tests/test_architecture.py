"""The package's layering, read from the code: the optimizer core imports torch and the
standard library alone and never the application; ``docs/architecture.md``'s diagram is the
import graph of today's code (``python tests/test_architecture.py`` rewrites it).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "twolevel_kfac"
DOC = ROOT / "docs" / "architecture.md"
APPLICATION = ("experiments", "analysis", "bench", "cli")
"""The parts behind the ``experiments`` extra."""
BEGIN, END = "<!-- import graph: begin -->", "<!-- import graph: end -->"


def unit(module: str) -> str:
    """The architecture unit of a dotted module name below ``twolevel_kfac``: its
    subpackage, or the top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """The absolute module names ``path`` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    """Unit → the units it imports (inside ``twolevel_kfac``), and ``<third party>``."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = unit(module_name(path))
        if source == "__init__":
            continue
        edges = graph.setdefault(source, set())
        for target in imports(path):
            if target == "twolevel_kfac" or target.startswith("twolevel_kfac."):
                if unit(target) != source:
                    edges.add(unit(target))
            elif target.split(".")[0] not in sys.stdlib_module_names | {"torch", "__future__"}:
                edges.add(f"<{target.split('.')[0]}>")
    return graph


def mermaid(graph: dict[str, set[str]]) -> str:
    """The graph of the package units (third-party imports left out) as a mermaid block."""
    lines = ["```mermaid", "graph TD"]
    for source in sorted(graph):
        for target in sorted(t for t in graph[source] if not t.startswith("<")):
            lines.append(f"    {source} --> {target}")
    lines.append("```")
    return "\n".join(lines)


def test_the_core_imports_torch_and_the_standard_library_alone() -> None:
    graph = import_graph()
    core = {u for u in graph if u not in APPLICATION}
    for source in sorted(core):
        outside = sorted(t for t in graph[source] if t.startswith("<") or t in APPLICATION)
        assert not outside, f"core unit {source!r} imports {outside}"


def test_the_architecture_diagram_is_the_import_graph_of_the_code() -> None:
    text = DOC.read_text()
    block = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), text, flags=re.DOTALL)
    assert block, f"{DOC} lost its import graph markers"
    assert block.group(1) == mermaid(import_graph()), (
        "docs/architecture.md is out of date: run `python tests/test_architecture.py`"
    )


if __name__ == "__main__":
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + mermaid(import_graph()) + "\n" + text[end:])
    print(f"rewrote the import graph of {DOC}")
