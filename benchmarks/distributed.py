"""Thin wrapper: `python benchmarks/distributed.py [OPTIONS]` is
`tlkfac bench distributed [OPTIONS]`.

The benchmark lives in `src/twolevel_kfac/bench/distributed.py`; `tlkfac bench --help` lists
the options (`--quick`, `--threads`, `--out`, `--repeats`, …).
"""

import sys

from twolevel_kfac.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "distributed", *sys.argv[1:]]))
