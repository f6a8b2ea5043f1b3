"""``stdlib_chars``: a character-level corpus that every machine with Python has.

Corpus: the ``*.py`` files directly inside ``sysconfig.get_paths()["stdlib"]`` (not its
subfolders), sorted by file name, each read as UTF-8 with ``errors="replace"`` and
concatenated without separators. Tokens: a character with code point ``c < 128`` is token
``c``; every other character (including U+FFFD from undecodable bytes) is token
``REPLACEMENT`` (0, NUL, which Python source does not contain), so the vocabulary is always
``VOCAB = 128`` ids.

Split by position: the first ``⌊0.9·n⌋`` tokens of the ``n`` are the training text, the rest
the test text. Each is cut into non-overlapping windows ``w`` of ``context + 1`` tokens
(a trailing remainder is dropped), ``x = w[:-1]``, ``y = w[1:]``: int64 ``[N, context]``
each, so ``y[:, t]`` is the character after ``x[:, t]`` (next-character prediction).

The text depends on the Python version: another interpreter's standard library gives
another corpus (``corpus_stats`` reports its size and md5; ``tlkfac data info
stdlib_chars`` prints them). Nothing is downloaded or cached: the corpus is read on every
load (about 0.1 s for Python 3.11's 168 files, 4.7 million characters).
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CONTEXT",
    "REPLACEMENT",
    "TRAIN_SHARE",
    "VOCAB",
    "CorpusStats",
    "corpus_files",
    "corpus_stats",
    "encode",
    "load_stdlib_chars",
    "read_corpus",
    "stdlib_dir",
    "windows",
]

VOCAB = 128
REPLACEMENT = 0  # the token of every non-ASCII character
DEFAULT_CONTEXT = 128
TRAIN_SHARE = 0.9  # the first 90 % of the tokens are the training text


def stdlib_dir() -> Path:
    """The running interpreter's standard library folder (``sysconfig`` ``stdlib``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path | None = None) -> list[Path]:
    """The ``*.py`` files directly inside ``root`` (default :func:`stdlib_dir`), by name.

    Raises:
        FileNotFoundError: ``root`` holds no ``*.py`` file.
    """
    folder = stdlib_dir() if root is None else root
    files = sorted((p for p in folder.glob("*.py") if p.is_file()), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"stdlib_chars: no *.py files in {folder}")
    return files


def read_corpus(root: Path | None = None) -> str:
    """The concatenated text of :func:`corpus_files` (UTF-8, ``errors="replace"``)."""
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in corpus_files(root))


def encode(text: str) -> Tensor:
    """Token ids int64 ``[len(text)]``: the code point if below ``VOCAB``, else ``REPLACEMENT``."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
    return torch.from_numpy(np.where(points < VOCAB, points, REPLACEMENT))


def windows(ids: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows ``w`` of ``context + 1`` ids: ``(w[:, :-1], w[:, 1:])``.

    Args:
        ids: Token ids ``[n]``.
        context: Inputs per window.

    Returns:
        ``(x, y)``, int64 ``[⌊n / (context + 1)⌋, context]`` each (contiguous).

    Raises:
        ValueError: ``context`` below 1.
    """
    if context < 1:
        raise ValueError(f"dataset.context must be >= 1; got {context}")
    n = len(ids) // (context + 1)
    w = ids[: n * (context + 1)].reshape(n, context + 1)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def load_stdlib_chars(
    context: int = DEFAULT_CONTEXT, root: Path | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``stdlib_chars`` windows, split by position (module docstring).

    Args:
        context: Characters per input window.
        root: Folder of the ``*.py`` files (default: :func:`stdlib_dir`).

    Returns:
        ``(train_x, train_y, test_x, test_y)``, int64 ``[N, context]`` each.
    """
    ids = encode(read_corpus(root))
    cut = int(len(ids) * TRAIN_SHARE)
    return (*windows(ids[:cut], context), *windows(ids[cut:], context))


class CorpusStats(NamedTuple):
    """What ``tlkfac data info stdlib_chars`` reports of the corpus on this machine."""

    folder: Path
    python: str  # the interpreter version whose standard library this is
    files: int
    characters: int
    non_ascii: int  # characters mapped to ``REPLACEMENT``
    md5: str  # of the concatenated text, encoded as UTF-8
    train_windows: int
    test_windows: int


def corpus_stats(context: int = DEFAULT_CONTEXT, root: Path | None = None) -> CorpusStats:
    """Size, md5 and window counts of the corpus (``root``: default :func:`stdlib_dir`)."""
    folder = stdlib_dir() if root is None else root
    text = read_corpus(folder)
    n, cut = len(text), int(len(text) * TRAIN_SHARE)
    return CorpusStats(
        folder=folder,
        python=sys.version.split()[0],
        files=len(corpus_files(folder)),
        characters=n,
        non_ascii=sum(1 for c in text if ord(c) >= VOCAB),
        md5=hashlib.md5(text.encode("utf-8")).hexdigest(),
        train_windows=cut // (context + 1),
        test_windows=(n - cut) // (context + 1),
    )
