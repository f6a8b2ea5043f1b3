"""Thin wrapper: `python benchmarks/eigh_dtype.py [OPTIONS]` is `tlkfac bench eigh_dtype [OPTIONS]`.

The benchmark lives in `src/twolevel_kfac/bench/eigh_dtype.py`; `tlkfac bench --help` lists
the options (`--quick`, `--threads`, `--out`, `--repeats`, …).
"""

import sys

from twolevel_kfac.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "eigh_dtype", *sys.argv[1:]]))
