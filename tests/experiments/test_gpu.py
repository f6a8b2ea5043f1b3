"""On a CUDA machine only (skipped elsewhere, with the reason): a one-process run on the
GPU follows the CPU run, its checkpoint resumes on the CPU, and MC sampling draws the same
targets from the same probabilities on both devices. Multi-process NCCL needs two GPUs.

Run on a lent GPU machine with ``pytest tests/experiments/test_gpu.py -q``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import twolevel_kfac as tk
from test_runner import TINY_PROBLEM
from twolevel_kfac.curvature.likelihoods import sample_targets
from twolevel_kfac.experiments.config import ExperimentConfig, parse_config
from twolevel_kfac.experiments.metrics import read_metrics
from twolevel_kfac.experiments.runner import Data, train_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

METHODS = ("kfac", "nico", "residu", "ekfac", "sgd")


def _config(method: str, device: str) -> ExperimentConfig:
    entry = (
        {"lr": 0.05}
        if method == "sgd"
        else {"lr": 0.1, "damping": 0.1, "fisher_batch": 0.5, "cov_interval": 2}
    )
    data = {
        "problem": {**TINY_PROBLEM, "epochs": 2, "checkpoint_every": 3, "device": device},
        "methods": {method: entry},
    }
    return parse_config(data).for_run(method, 0)


def _data() -> Data:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(104, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return Data(train=(x[:80], y[:80]), val=(x[80:92], y[80:92]), test=(x[92:], y[92:]))


def _losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.mark.parametrize("method", METHODS)
def test_gpu_run_follows_the_cpu_run(tmp_path: Path, method: str) -> None:
    """Same data, seed and MC draws (sampled on the CPU generator): the losses agree to
    float32 rounding amplified over 10 steps (TF32 is off by default for matmuls)."""
    cpu = train_run(_config(method, "cpu"), tmp_path / "cpu", data=_data(), progress=False)
    gpu = train_run(_config(method, "cuda"), tmp_path / "gpu", data=_data(), progress=False)
    assert cpu.finished and gpu.finished
    torch.testing.assert_close(
        torch.tensor(_losses(tmp_path / "gpu")),
        torch.tensor(_losses(tmp_path / "cpu")),
        rtol=1e-3,
        atol=1e-4,
    )
    state = torch.load(tmp_path / "gpu" / "checkpoint.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in state["model"].values())


@pytest.mark.parametrize("method", ("kfac", "residu"))
def test_gpu_checkpoint_resumes_on_the_cpu(tmp_path: Path, method: str) -> None:
    run_dir = tmp_path / "run"
    part = train_run(_config(method, "cuda"), run_dir, data=_data(), progress=False, max_steps=4)
    assert not part.finished
    done = train_run(_config(method, "cpu"), run_dir, data=_data(), progress=False, resume=True)
    assert done.finished and done.step == 10


@pytest.mark.parametrize("likelihood", ("categorical", "bernoulli", "gaussian"))
def test_mc_targets_do_not_depend_on_the_device(likelihood: str) -> None:
    outputs = torch.randn(32, 5, generator=torch.Generator().manual_seed(1))
    draws = []
    for device in ("cpu", "cuda"):
        gen = torch.Generator().manual_seed(7)
        draws.append(sample_targets(outputs.to(device), likelihood, gen).cpu())
    torch.testing.assert_close(draws[1], draws[0])


class _Modern(torch.nn.Module):
    """Every block type: an embedding, attention, feed-forward, a grouped 1-d convolution,
    norms (with ``norm_blocks``), over sequence logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = torch.nn.Embedding(12, 16)
        self.layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.conv = torch.nn.Conv1d(16, 16, 3, padding=1, groups=4)
        self.norm = torch.nn.GroupNorm(4, 16)
        self.head = torch.nn.Linear(16, 12)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.layer(self.tokens(ids))
        h = h + self.norm(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.head(h)


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_every_block_type_steps_on_the_gpu_as_on_the_cpu(fisher: str) -> None:
    """Four steps of KFAC and two-level KFAC with every block type on the GPU follow the
    CPU's (MC draws come from the CPU generator on both), to float32 rounding."""
    ids = torch.randint(0, 12, (6, 9), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 12, (6, 9), generator=torch.Generator().manual_seed(2))
    for cls in (tk.KFAC, tk.TwoLevelKFAC):
        params = []
        for device in ("cpu", "cuda"):
            model = _Modern().to(device)
            opt = cls(model, lr=0.05, fisher=fisher, class_dim=-1, norm_blocks=True, cov_interval=2)
            for _ in range(4):
                opt.zero_grad()
                logits = model(ids.to(device))
                loss = torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), y.to(device).flatten()
                )
                loss.backward()
                opt.step()
            params.append(torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()]))
        torch.testing.assert_close(params[1], params[0], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("samples", [100, 1600], ids=["near-null", "refined"])
@pytest.mark.parametrize("which", ["smallest", "largest"])
def test_the_extreme_pair_is_certified_on_the_gpu(samples: int, which: str) -> None:
    """The spectral space's one eigenpair per factor (``curvature/extreme_eigen.py``) on a
    CUDA factor: within ``τ`` of ``eigvalsh``'s extreme, a residual below ``τ``, on the
    factor's device (a null vector of a rank-deficient factor, and a refined pair)."""
    from test_extreme_eigen import assert_certified_pair, wishart
    from twolevel_kfac.curvature.extreme_eigen import extreme_eigenpair

    matrix = wishart(400, samples, torch.float32).cuda()
    assert_certified_pair(matrix, which)
    values, vectors = extreme_eigenpair(matrix, which)
    assert values.device == vectors.device == matrix.device


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_a_wrapped_layer_passes_the_probe_under_tf32(kind: str) -> None:
    """A layer whose forward a wrapper replaced on the instance (accelerate's device hooks)
    is probed at its first captured forward; under TF32 (cuDNN convolutions' default,
    ``float32_matmul_precision("high")`` for a Linear) its gradient is ~3e-4 off float64,
    inside the probe's float32 tolerance of 1e-2: the step is taken."""
    torch.manual_seed(0)
    if kind == "conv":
        model = torch.nn.Sequential(
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
        ).cuda()  # fmt: skip
        x = torch.randn(16, 16, 16, 16, device="cuda")
    else:
        model = torch.nn.Sequential(
            torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
        ).cuda()
        x = torch.randn(64, 256, device="cuda")
    original = model[0].forward
    model[0].forward = lambda *args: original(*args)  # type: ignore[method-assign]
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        opt = tk.KFAC(model, lr=0.1, damping=0.1)
        loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (len(x),)).cuda())
        loss.backward()
        opt.step()
    finally:
        torch.set_float32_matmul_precision(before)
    assert opt.preconditioner.steps == 1
