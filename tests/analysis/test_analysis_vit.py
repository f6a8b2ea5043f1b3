"""The analysis on a tiny Vision Transformer (``model: {kind: vit}``): the network against a
hand-written forward, its curvature blocks against the optimizer's, the exact Fisher
against an independent per-sample ``jacrev`` oracle, the analysis' directions against the
real optimizers' steps, and a small end-to-end analysis."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import twolevel_kfac as tk
from twolevel_kfac.analysis import metrics
from twolevel_kfac.analysis.config import AnalyzeConfig, load_config
from twolevel_kfac.analysis.coordinates import analysis_layers, exact_attention
from twolevel_kfac.analysis.exact import compute_curvature, fisher_from_statistics
from twolevel_kfac.analysis.operators import MethodSet
from twolevel_kfac.analysis.pipeline import run_analysis
from twolevel_kfac.analysis.problems import build_model
from twolevel_kfac.optim.options import CurvatureOptions
from twolevel_kfac.optim.preconditioner import KFACPreconditioner
from vit_oracle import block_parameters, tiny_vit_spec, vit_forward, vit_true_fisher

ROOT = Path(__file__).resolve().parents[2]


def _model(seed: int = 0, outputs: int = 3) -> nn.Module:
    """The tiny ViT with every parameter (LayerNorms, positions, biases) moved off its
    initial value, so that each enters the forward non-trivially."""
    model = build_model(tiny_vit_spec(outputs), seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _batch(n: int, outputs: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, outputs, (n,), generator=gen)


def _theta(model: nn.Module) -> Tensor:
    """The analysed parameters in the optimizer's layer-vector layout (the oracle's names)."""
    params = dict(model.named_parameters())
    parts = []
    for _, weight, bias in block_parameters(tiny_vit_spec()):
        w = params[weight].detach()
        parts.append(torch.cat([w.reshape(w.shape[0], -1), params[bias].detach()[:, None]], 1))
    return torch.cat([p.flatten() for p in parts])


def test_vit_is_the_hand_written_transformer_with_the_optimizers_blocks() -> None:
    """The model computes the oracle's function (with torch's default attention kernel and
    with the analysis' math kernel); its analysis layers are the optimizer's blocks, in
    order, with the packed in-projection; LayerNorms and positions are outside ``θ``."""
    model = _model()
    x, _ = _batch(5)
    expected = vit_forward(dict(model.named_parameters()), x, tiny_vit_spec())
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-13)
    with exact_attention():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-13)
    assert model.training  # torch's fused fast path (evaluation mode) never runs
    blocks = [name for name, _, _ in block_parameters(tiny_vit_spec())]
    layers = analysis_layers(model)
    assert list(layers) == blocks
    options = CurvatureOptions(fisher="empirical", unsupported="ignore")
    optimizer_layers = KFACPreconditioner(model, options).layers
    assert list(optimizer_layers) == blocks
    attention = model.get_submodule("layer1.self_attn")
    assert isinstance(attention, nn.MultiheadAttention)
    in_proj = optimizer_layers["layer1.self_attn.in_proj"]
    assert in_proj.weight is attention.in_proj_weight and in_proj.bias is attention.in_proj_bias
    x, y = _batch(3)
    curvature = compute_curvature(model, x, y, "categorical", "true")
    assert curvature.shapes[1] == (12, 5)  # [W_q; W_k; W_v | b]: 3E × (E + 1)
    outside = sum(p.numel() for n, p in model.named_parameters() if "norm" in n or "position" in n)
    assert curvature.num_params + outside == sum(p.numel() for p in model.parameters())


def test_vit_true_fisher_matches_the_oracle(float64: None) -> None:
    """torch.func (vmap ∘ jacrev through nn.MultiheadAttention) and the optimizer-format
    statistics (hooks, attention recomputed) give the oracle's Fisher; the gradient too.
    Its inter-layer blocks are far from zero: there is coupling to measure."""
    model = _model(seed=1)
    x, y = _batch(4, seed=1)
    curvature = compute_curvature(model, x, y, "categorical", "true")
    expected = vit_true_fisher(model, tiny_vit_spec(), x)
    assert curvature.fisher is not None
    scale = float(expected.abs().max())
    torch.testing.assert_close(curvature.fisher, expected, rtol=1e-10, atol=1e-12 * scale)
    stats = fisher_from_statistics(curvature.stats)
    torch.testing.assert_close(stats, expected, rtol=1e-10, atol=1e-12 * scale)
    params = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(vit_forward(params, x, tiny_vit_spec()), y)
    loss.backward()
    grads = {n: p.grad for n, p in params.items()}
    parts = [
        torch.cat([grads[w].reshape(grads[w].shape[0], -1), grads[b][:, None]], 1).flatten()
        for _, w, b in block_parameters(tiny_vit_spec())
    ]
    torch.testing.assert_close(curvature.flat_grad, torch.cat(parts), rtol=1e-10, atol=1e-13)
    # the matrix-free products (torch.func linearize / vjp): test_analysis_matrix_free.py
    assert metrics.off_diagonal_fraction(expected, curvature.sizes) > 0.1


@pytest.mark.parametrize("method", ["kfac", "nicolaides+adef2", "residual+additive"])
def test_vit_direction_equals_a_real_optimizer_step(float64: None, method: str) -> None:
    """With the empirical Fisher the analysis direction is exactly the step KFAC /
    TwoLevelKFAC takes on the ViT (lr 1, no momentum / EMA / KL clipping): same blocks, same
    statistics through the optimizer's own attention capture."""
    model = _model(seed=2)
    x, y = _batch(6, seed=2)
    curvature = compute_curvature(model, x, y, "categorical", "empirical")
    expected = MethodSet(model, curvature, damping=0.05).direction(method)
    trained = copy.deepcopy(model)
    settings = {"lr": 1.0, "momentum": 0.0, "damping": 0.05, "fisher": "empirical"}
    settings |= {"ema_decay": 0.0, "kl_clip": None, "unsupported": "ignore"}
    if method == "kfac":
        opt: torch.optim.Optimizer = tk.KFAC(trained, **settings)
    else:
        space, _, combination = method.partition("+")
        opt = tk.TwoLevelKFAC(trained, coarse_space=space, combination=combination, **settings)
    before = _theta(trained)
    nn.functional.cross_entropy(trained(x), y).backward()
    opt.step()
    torch.testing.assert_close(before - _theta(trained), expected, rtol=1e-9, atol=1e-11)


def test_vit_analysis_end_to_end(float64: None) -> None:
    """``run_analysis`` on a synthetic-data ViT: the statistics carry the dense Fisher, the
    exact method scores cosine 1, the coarse spaces report their gains and captured mass."""
    config = AnalyzeConfig.model_validate(
        {
            "name": "vit_smoke",
            "model": tiny_vit_spec(outputs=3, depth=1).model_dump(),
            "data": {"name": "synthetic", "n_train": 64},
            "batch_size": 8,
            "methods": ["exact", "block_diagonal", "kfac", "nicolaides+adef2", "residual+adef2"],
            "damping_sweep": [1e-3, 1.0],
            "state_steps": 1,
            "train": {
                "steps": 2,
                "checkpoint_every": 1,
                "methods": ["kfac", "nicolaides+additive"],
                "metric_methods": ["kfac"],
                "gain_spaces": ["nicolaides"],
            },
        }
    )
    output = run_analysis(config, progress=False)
    assert output.methods["exact"]["cos_to_exact_ng"] == pytest.approx(1.0, abs=1e-9)
    for name in ("block_diagonal", "kfac", "nicolaides+adef2"):
        assert 0.0 < output.methods[name]["cos_to_exact_ng"] <= 1.0 + 1e-12, name
    fisher = output.details["fisher"]
    assert fisher["statistics_vs_dense"] < 1e-12
    assert len(output.details["problem"]["layers"]) == 6  # conv, in/out proj, 2 ffn, head
    assert 0.0 < fisher["off_diagonal_fraction"] < 1.0
    for space in ("nicolaides", "residual"):
        assert output.details["coarse_spaces"][space]["coarse_gain"] <= 1e-12, space
    assert not any(run["diverged"] for run in output.details["training"]["runs"].values())


def test_vit_config_checks_and_the_shipped_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: {kind: vit, image_size: 28, patch: 5}\n")
    with pytest.raises(ValueError, match=r"model\.patch"):
        load_config(path)
    path.write_text("model: {kind: vit, image_size: 28, patch: 7, width: 10, heads: 4}\n")
    with pytest.raises(ValueError, match=r"model\.heads"):
        load_config(path)
    shipped = load_config(ROOT / "configs/analysis/vit_tiny.yaml")
    model = build_model(shipped.model, shipped.seed)
    layers = analysis_layers(model)
    assert sum(p.numel() for m in layers.values() for p in m.parameters(recurse=False)) == 3202
    assert shipped.resolve_backend(3202) == "dense"
