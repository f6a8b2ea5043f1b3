"""Fetch, verify and describe the data sets.

  tlkfac data fetch NAME [--data-dir DIR] [--from DIR]   install (download, import or generate)
  tlkfac data verify NAME [--data-dir DIR]               check every file; exit 2 on problems
  tlkfac data info NAME [--data-dir DIR]                 sizes, shapes, location, checksums

NAME is one of mnist, fashion_mnist, curves, faces, cifar10, cifar100, svhn, stdlib_chars.
The data directory is --data-dir, else $TLKFAC_DATA, else (fetch) <repo>/data, or
(verify/info) <repo>/data or <repo>/../shared/data, whichever holds the data set. `fetch` without
--from downloads the official files (the only network access of the package); with
--from DIR it checks and copies local files. CURVES and FACES are generated and cached.
stdlib_chars has no files: it is read from the running Python's standard library, so
`fetch` and `verify` only read it and print its size and md5.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from twolevel_kfac.experiments.data.registry import (
    FILE_DATASETS,
    GENERATED,
    KNOWN_NAMES,
    TEXT,
    DatasetSpec,
    check_file,
    known_names_error,
    locate,
)

__all__ = ["add_arguments", "run"]

_ACTIONS = {
    "fetch": "download (or --from: import local files; or generate) and check a data set",
    "verify": "check every file: exists, size, magic number, md5",
    "info": "what a data set is, where it is, its files and checksums",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``ACTION NAME`` and the options of ``tlkfac data``.

    Args:
        parser: The ``data`` subcommand's parser.
    """
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help_text in _ACTIONS.items():
        p = sub.add_parser(action, help=help_text, description=help_text)
        p.add_argument("name", metavar="NAME", help=f"data set: {', '.join(KNOWN_NAMES)}")
        p.add_argument(
            "--data-dir",
            default=None,
            help="data directory (default: $TLKFAC_DATA, else <repo>/data or ../shared/data)",
        )
        p.add_argument("--seed", type=int, default=0, help="generator seed of curves / faces")
        if action == "fetch":
            p.add_argument(
                "--from",
                dest="source",
                default=None,
                metavar="DIR",
                help="import the files from this local folder instead of downloading",
            )


def _normalise(name: str) -> str:
    """``fashion-mnist``, ``CIFAR-10``, … → the registry name; unknown names raise."""
    squashed = {known.replace("_", ""): known for known in KNOWN_NAMES}
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in squashed:
        raise known_names_error(name)
    return squashed[key]


def _fetch_target(data_dir: str | None) -> Path:
    from twolevel_kfac.experiments.data.cache import cache_dirs

    return cache_dirs(data_dir)[0]


def _corpus_lines() -> list[str]:
    """What ``stdlib_chars`` is on this machine: folder, size, md5, window counts."""
    from twolevel_kfac.experiments.data.text import DEFAULT_CONTEXT, corpus_stats

    c = corpus_stats()
    return [
        f"  folder:    {c.folder} (Python {c.python})",
        f"  corpus:    {c.files} files, {c.characters:,} characters ({c.non_ascii:,} non-ASCII "
        f"→ id 0), md5 {c.md5} (of the text as UTF-8)",
        f"  windows:   context {DEFAULT_CONTEXT}: {c.train_windows:,} train / "
        f"{c.test_windows:,} test",
    ]


def _text(args: argparse.Namespace, name: str) -> int:
    """``fetch`` / ``verify`` of a text set: nothing to install; read it and describe it."""
    if getattr(args, "source", None) is not None:
        raise ValueError(f"{name} is read from the Python standard library; --from does not apply")
    print(f"{name}: nothing to download or cache; read from the running Python on every load")
    print("\n".join(_corpus_lines()))
    return 0


def _fetch(args: argparse.Namespace, name: str) -> int:
    if name in TEXT:
        return _text(args, name)
    if name in GENERATED:
        if args.source is not None:
            raise ValueError(f"{name} is generated here; --from does not apply to it")
        from twolevel_kfac.experiments.data.generated import fetch_generated

        fetch_generated(name, args.data_dir, args.seed, print)
        return 0
    from twolevel_kfac.experiments.data.fetch import download_dataset, import_dataset

    spec, target = FILE_DATASETS[name], _fetch_target(args.data_dir)
    if args.source is not None:
        import_dataset(spec, Path(args.source), target, print)
    else:
        download_dataset(spec, target, print)
    print(f"{name}: {len(spec.files)} files verified and installed in {target / spec.folder}")
    return 0


def _data_dir(args: argparse.Namespace, spec: DatasetSpec) -> Path:
    from twolevel_kfac.experiments.data.idx import resolve_data_dir

    return resolve_data_dir(args.data_dir, require=spec.folder)


def _verify(args: argparse.Namespace, name: str) -> int:
    if name in TEXT:
        return _text(args, name)
    if name in GENERATED:
        from twolevel_kfac.experiments.data.generated import verify_generated

        verify_generated(name, args.data_dir, args.seed, print)
        return 0
    spec = FILE_DATASETS[name]
    data_dir = _data_dir(args, spec)
    reports = [check_file(locate(data_dir, f), f) for f in spec.files]
    for report in reports:
        if report.ok:
            print(f"ok      {report.path}  {report.message}  md5 {report.md5}")
        else:
            print(f"FAILED  {report.message}")
    bad = [r for r in reports if not r.ok]
    if bad:
        details = "\n  ".join(r.message for r in bad)
        raise ValueError(
            f"{name}: {len(bad)} of {len(reports)} files failed verification:\n  {details}\n"
            f"fetch them again: tlkfac data fetch {name} [--from DIR] --data-dir {data_dir}"
        )
    print(f"{name}: all {len(reports)} files verified in {data_dir / spec.folder}")
    return 0


def _info_described(args: argparse.Namespace, name: str) -> None:
    """The lines of `info` for a generated or a text set (no files to list)."""
    from twolevel_kfac.experiments.data.generated import cache_file

    info = TEXT.get(name) or GENERATED[name]
    print(f"  returns:   {info.returns}")
    print(f"  procedure: {info.procedure}")
    print(f"  source:    {info.source}")
    print(f"  licence:   {info.licence}")
    if name in TEXT:
        print("\n".join(_corpus_lines()))
        return
    path = cache_file(name, args.data_dir, args.seed)
    state = f"present, {path.stat().st_size:,} bytes" if path.is_file() else "not generated yet"
    print(f"  cache:     {path} (seed {args.seed}; {state})")


def _info_files(args: argparse.Namespace, spec: DatasetSpec) -> None:
    data_dir: Path | None = None
    try:
        data_dir = _data_dir(args, spec)
        folder = data_dir / spec.folder
        where = f"{folder} ({'present' if folder.is_dir() else 'missing'})"
    except FileNotFoundError as exc:
        where = f"no data directory ({exc})"
    print(f"  returns:   {spec.returns}")
    print(f"  source:    {spec.source}")
    print(f"  licence:   {spec.licence}")
    if spec.archive is not None:
        print(f"  download:  {spec.archive[0]} (md5 {spec.archive[1]})")
    else:
        bases = sorted({f.url.rsplit("/", 1)[0] + "/" for f in spec.files if f.url})
        print(f"  download:  {', '.join(bases + list(spec.mirrors))}")
    print(f"  location:  {where}")
    print("  files:")
    for file in spec.files:
        state = "not checked"
        if data_dir is not None:
            path = locate(data_dir, file)
            state = f"{path.stat().st_size:,} bytes" if path.is_file() else "missing"
        print(f"    {file.path}  {file.expected}  md5 {' or '.join(file.md5)}  [{state}]")


def _info(args: argparse.Namespace, name: str) -> int:
    described = {**GENERATED, **TEXT}
    title = described[name].title if name in described else FILE_DATASETS[name].title
    print(f"{name}: {title}")
    if name in described:
        _info_described(args, name)
    else:
        _info_files(args, FILE_DATASETS[name])
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``tlkfac data ACTION NAME``.

    Args:
        args: Parsed arguments (``action``, ``name``, ``data_dir``, ``seed``, ``source``).

    Returns:
        0 on success (failures raise, and the CLI exits with status 2).

    Raises:
        ValueError: Unknown data set name (the message lists the known ones).
        RuntimeError: An optional dependency the data set needs is not installed.
    """
    name = _normalise(args.name)
    actions = {"fetch": _fetch, "verify": _verify, "info": _info}
    if args.action not in actions:
        raise ValueError(f"unknown action {args.action!r}; allowed: {sorted(actions)}")
    try:
        return actions[args.action](args, name)
    except ImportError as exc:  # an optional dependency (scikit-image, scipy) is missing
        raise RuntimeError(str(exc)) from exc
