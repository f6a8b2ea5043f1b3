"""YAML reading for configs: line-numbered syntax errors, ``1e-3`` as a float, no duplicates.

PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a *string*; configs mean a float, so
the loader here resolves it as one. Duplicate keys, which PyYAML silently merges (last
wins), are an error. Empty files and non-mapping documents are refused with a message.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["config_diff", "read_yaml"]


class _Loader(yaml.SafeLoader):
    """Safe loader that reads ``1e-3`` as a float and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Invalid YAML (with line and column), an empty file, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise FileNotFoundError(
            f"config file {path} does not exist{where}; the experiment configs are the YAML "
            "files in the repository's configs/ (a pip-installed package has none)"
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"{where}: invalid YAML: {error.problem or error.context}") from None
    if data is None:
        raise ValueError(f"{path} is empty; expected a mapping with 'problem' and 'methods'")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``"key: old → new"`` lines for every dotted key whose value differs."""
    lines: list[str] = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, name = old.get(key, "<unset>"), new.get(key, "<unset>"), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_diff(a, b, f"{name}.")
        elif a != b:
            lines.append(f"{name}: {a!r} → {b!r}")
    return lines
