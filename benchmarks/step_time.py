"""Thin wrapper: `python benchmarks/step_time.py [OPTIONS]` is `tlkfac bench step_time [OPTIONS]`.

The benchmark lives in `src/twolevel_kfac/bench/step_time.py`; `tlkfac bench --help` lists
the options (`--quick`, `--threads`, `--out`, `--repeats`, …).
"""

import sys

from twolevel_kfac.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "step_time", *sys.argv[1:]]))
