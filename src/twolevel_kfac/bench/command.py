"""``tlkfac bench [NAME ...] [--quick] [--threads N] [--out DIR] [--repeats K] …``.

Each benchmark is a module with ``NAME``, ``measure(options) -> dict`` (the JSON
document), ``render(dict) -> str`` (the markdown) and optionally ``plot(dict, out) ->
[paths]``; this module runs the ones asked for and writes ``OUT/NAME.json``,
``OUT/NAME.md`` and the PNGs. ``--render`` re-renders markdown and plots from existing
JSON without measuring.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from types import ModuleType

from twolevel_kfac.bench.options import BenchOptions
from twolevel_kfac.bench.report import merge_documents, read_json, write_json, write_markdown

__all__ = ["BENCHMARKS", "DEFAULT", "add_arguments", "run"]

BENCHMARKS: dict[str, tuple[str, str]] = {
    "step_time": ("twolevel_kfac.bench.step_time", "every method × problem × T, ratios to SGD"),
    "scaling": ("twolevel_kfac.bench.scaling", "ratio to SGD vs batch size, width, depth"),
    "asdl": ("twolevel_kfac.bench.peers", "ASDL's KFAC (and kfac-pytorch) beside ours"),
    "time_to_target": ("twolevel_kfac.bench.time_to_target", "CURVES: wall time to a loss"),
    "eigh_dtype": ("twolevel_kfac.bench.eigh_dtype", "eigh: float32 vs float64, batched vs loop"),
    "extreme_pair": ("twolevel_kfac.bench.extreme_pair", "spectral space: eigh vs one pair"),
    "distributed": ("twolevel_kfac.bench.distributed", "gloo data-parallel step time, bytes"),
    "compile": ("twolevel_kfac.bench.compile", "torch.compile vs eager: SGD, KFAC, apply"),
    "gpu": ("twolevel_kfac.bench.gpu", "CUDA step times vs SGD and ASDL, bf16 autocast"),
    "memory": ("twolevel_kfac.bench.footprints", "peak memory and state_dict size per method"),
    "intervals": ("twolevel_kfac.bench.intervals", "default T_cov/T_inv: loss reached per second"),
    "asdl_target": ("twolevel_kfac.bench.asdl_target", "time to a target loss: ours vs ASDL"),
    "tables": ("twolevel_kfac.bench.tables", "an untied embedding table: dense vs vector G"),
}
DEFAULT = ("step_time", "scaling", "asdl", "time_to_target")


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers; got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1; got {text!r}")
    return values


PUBLISHED, QUICK_OUT = Path("docs/benchmarks"), Path("results/bench-quick")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tlkfac bench``."""
    listing = "; ".join(f"{name}: {text}" for name, (_, text) in BENCHMARKS.items())
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: {', '.join(DEFAULT)}). {listing}",
    )
    parser.add_argument("--quick", action="store_true", help="small and fast: checks, not numbers")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default: {PUBLISHED}; with --quick: {QUICK_OUT}, so that a check "
        "never overwrites the published numbers)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--external", default=None, help="path of a kfac-pytorch checkout")
    parser.add_argument(
        "--authors", default=None, help="path of a checkout of the authors' natural-gradients code"
    )
    parser.add_argument("--problems", type=_names, default=None, help="comma-separated subset")
    parser.add_argument("--methods", type=_names, default=None, help="comma-separated subset")
    parser.add_argument("--intervals", type=_ints, default=None, help="refresh intervals T")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (the gpu benchmark)")
    parser.add_argument(
        "--render", action="store_true", help="re-render markdown and plots from OUT/NAME.json"
    )


def _module(name: str) -> ModuleType:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; allowed: {list(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name][0])


def run(args: argparse.Namespace) -> int:
    """Run (or re-render) the benchmarks asked for; print where the outputs are."""
    from twolevel_kfac.bench.timing import set_threads

    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1; got {args.repeats}")
    modules = [_module(name) for name in args.names or DEFAULT]
    options = BenchOptions(
        quick=args.quick,
        threads=set_threads(args.threads),
        out=args.out or (QUICK_OUT if args.quick else PUBLISHED),
        repeats=args.repeats,
        external=args.external,
        authors=args.authors,
        problems=args.problems,
        methods=args.methods,
        intervals=args.intervals,
        device=args.device,
    )
    for module in modules:
        name = module.NAME
        data = read_json(options.out, name) if args.render else module.measure(options)
        merges = args.problems and not args.methods and not args.render  # whole groups only
        if merges and (options.out / f"{name}.json").is_file():
            data = merge_documents(read_json(options.out, name), data)  # keep the others
        written = [] if args.render else [write_json(options.out, name, data)]
        written.append(write_markdown(options.out, name, module.render(data)))
        if hasattr(module, "plot"):
            written += module.plot(data, options.out)
        print(f"{name}: " + ", ".join(str(path) for path in written))
    return 0
