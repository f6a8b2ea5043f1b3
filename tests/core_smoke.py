"""Run by ``make check-core`` in a venv holding only torch and ``pip install .``: the
optimizers work without any extra, and ``tlkfac`` names the extra it needs.

Not a pytest module (it needs that venv); ``make check-core`` builds the venv and runs it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import torch
import torch.nn.functional as F

import twolevel_kfac as tk

EXTRAS = ("numpy", "yaml", "pydantic", "tqdm", "matplotlib", "scipy", "skimage")


def main() -> int:
    present = [name for name in EXTRAS if importlib.util.find_spec(name) is not None]
    assert not present, f"the core venv should not have {present}"
    torch.manual_seed(0)
    for make in (tk.KFAC, tk.EKFAC, tk.KPSVD, tk.KFACCorrected, tk.TwoLevelKFAC):
        model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        opt = make(model)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
            opt.step()
        print(f"{make.__name__}: ok")
    tlkfac = [
        sys.executable,
        "-c",
        "import sys; from twolevel_kfac.cli import main; sys.exit(main())",
    ]
    done = subprocess.run([*tlkfac, "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 2, done
    assert "pip install 'twolevel-kfac[experiments]'" in done.stderr, done.stderr
    try:
        import twolevel_kfac.experiments  # noqa: F401
    except ImportError as error:
        assert "twolevel-kfac[experiments]" in str(error), error
    else:
        raise AssertionError("twolevel_kfac.experiments imported without its extra")
    print("tlkfac and twolevel_kfac.experiments name the extra: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
