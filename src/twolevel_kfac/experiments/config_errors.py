"""How an invalid experiment config is worded: an unknown key with its close matches and
what is allowed there, a missing key, or a value error at its dotted path."""

from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import BaseModel

__all__ = ["check_keys", "format_error", "hint"]


def hint(key: str, allowed: typing.Iterable[str]) -> str:
    """`` (did you mean …?)`` for the close matches of ``key`` among ``allowed``."""
    close = difflib.get_close_matches(key, list(allowed), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def unknown_key(path: str, key: str, allowed: list[str]) -> str:
    """The message for the unknown ``key`` at the dotted ``path``."""
    return f"unknown key '{path}'{hint(key, allowed)}; allowed here: {allowed}"


def check_keys(where: str, entry: dict[str, Any], allowed: typing.Iterable[str]) -> None:
    """Refuse a key of ``entry`` (at ``where``) that is not ``allowed``, naming close matches.

    Raises:
        ValueError: the unknown key, its close matches and what is allowed there.
    """
    allowed = sorted(allowed)
    for key in entry:
        if key not in allowed:
            raise ValueError(unknown_key(f"{where}.{key}", str(key), allowed))


def _fields(model: Any) -> dict[str, Any]:
    """The fields of a pydantic model or pydantic dataclass (``{}`` for anything else)."""
    return dict(getattr(model, "model_fields", None) or getattr(model, "__pydantic_fields__", {}))


def _model_at(model: Any, loc: tuple[Any, ...]) -> Any:
    """The pydantic model (or pydantic dataclass) that validates location ``loc`` below
    ``model``."""
    for part in loc:
        field = _fields(model).get(str(part)) if model is not None else None
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        model = next((c for c in candidates if isinstance(c, type) and _fields(c)), None)
    return model


def format_error(error: Any, root: type[BaseModel]) -> str:
    """One line for one pydantic validation error below the model ``root``."""
    loc = tuple(error["loc"])
    path = ".".join(map(str, loc))
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # (a dataclass)
        model = _model_at(root, loc[:-1])
        allowed = sorted(_fields(model))
        return unknown_key(path, str(loc[-1]), allowed)
    if error["type"] == "missing":
        return f"missing required key '{path}'"
    message = str(error["msg"]).removeprefix("Value error, ")
    if not loc:
        return message
    return f"{path}: {message} (got {error.get('input')!r})"
