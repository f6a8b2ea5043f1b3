"""``tlkfac bench``: the FLOP floor against the issue's numbers, the timing statistics, and
each benchmark's ``--quick`` mode end to end (JSON schema, finite positive ratios, the
markdown re-rendered from the JSON)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from twolevel_kfac.bench import external
from twolevel_kfac.bench.compiled import (
    TOLERANCE,
    CompilePair,
    compile_unavailable,
    measure_pair,
    verdict,
)
from twolevel_kfac.bench.flops import flop_floor, layer_shapes
from twolevel_kfac.bench.methods import Runner
from twolevel_kfac.bench.problems import PROBLEMS
from twolevel_kfac.bench.timing import block_steps, interleave, quartiles, ratio_stats
from twolevel_kfac.cli import main

QUICK = ["--quick", "--threads", "1"]
NO_COMPILE = compile_unavailable()


def _run(tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run ``tlkfac bench NAME --quick`` into ``tmp_path``; return its JSON."""
    assert main(["bench", *args, *QUICK, "--out", str(tmp_path)]) == 0
    return json.loads((tmp_path / f"{args[0]}.json").read_text())


def _positive(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def _check_group(group: dict[str, Any]) -> None:
    assert {"problem", "description", "batch", "interval", "block_steps", "rows"} <= set(group)
    assert group["block_steps"] % group["interval"] == 0
    assert group["rows"][0]["method"] == "sgd" and group["rows"][0]["ratio_sgd"] == 1.0
    for row in group["rows"]:
        for key in ("median_ms", "q1_ms", "q3_ms", "ratio_sgd", "ratio_q1", "ratio_q3"):
            assert _positive(row[key]), (row["method"], key, row[key])
        assert row["ratio_q1"] <= row["ratio_sgd"] <= row["ratio_q3"]
        assert _positive(row["floor_ratio"]) and row["floor_ratio"] >= 1.0
        assert _positive(row["vs_floor"]) and row["skipped_steps"] == 0


def _rerendered(tmp_path: Path, name: str) -> None:
    """``--render`` rewrites the markdown from the JSON alone, identically."""
    md = tmp_path / f"{name}.md"
    before = md.read_text()
    md.unlink()
    assert main(["bench", name, "--render", "--out", str(tmp_path)]) == 0
    assert md.read_text() == before


def test_flop_floor_reproduces_the_mnist_autoencoder_numbers() -> None:
    """MNIST AE, B = 512, Fisher batch 128: fwd+bwd 8.7, preconditioner 9.0, factor refresh
    3.8 per refresh, eigendecompositions 50 per refresh (GFLOP), within 10 %."""
    problem = PROBLEMS["mnist_ae_512"]
    shapes = layer_shapes(problem.build_model(), problem.input_shape)
    assert len(shapes) == 8 and all(s.locations == 1 and s.bias for s in shapes)
    gflop = flop_floor(shapes, batch=512, fisher_batch=128).as_gflop()
    expected = {"forward_backward": 8.7, "precondition": 9.0, "refresh_per_T": 3.8,
                "decomposition_per_T": 50.0}  # fmt: skip
    for key, value in expected.items():
        assert gflop[key] == pytest.approx(value, rel=0.1), key
    floor = flop_floor(shapes, 512, 128)
    assert floor.ratio(20) == pytest.approx((8.7 + 9.0 + (3.8 + 50.0) / 20) / 8.7, rel=0.02)
    assert floor.ratio(1, preconditioned=False) == 1.0
    cheaper = flop_floor(shapes, 512, 128, inverse_method="cholesky", extra_pass=False)
    assert cheaper.decomposition == pytest.approx(floor.decomposition / 9)
    assert cheaper.refresh < floor.refresh


@pytest.mark.parametrize(
    ("space", "combination", "refresh", "expected"),
    [
        # one layer, d_in' = 4, d_out = 2, n_F = 5: P = 8, A = 2·2·4·6 = 96, S = 2·5·8 = 80
        ("nicolaides", "additive", "consistent", (8 + 8, 80)),  # a sum and a shift
        ("nicolaides", "balanced", "consistent", (4 * 8 + 2 * 16, 80)),  # F̂ through W₀: 2KP
        ("tselepidis", "additive", "consistent", (8 + 8, 2 * 5 * (4 + 2))),
        ("residual", "additive", "consistent", (2 * 16, 80 + 2 * 80 + 96)),
        ("residual", "adef1", "consistent", (3 * 16 + 16, 80 + 2 * 80 + 2 * 96)),  # + M⁻¹g
        ("residual", "additive", "faithful", (2 * 16 + 2 * 80 + 96, 80)),
        ("krylov_residual", "adef2", "consistent", (3 * 32 + 32, 2 * 80 + 2 * 80 + 2 * 96)),
        ("krylov_nicolaides", "adef2", "faithful", (3 * 32 + 32, 2 * 80)),  # nothing rebuilt
    ],
)
def test_coarse_floor_counts_the_coarse_level(
    space: str, combination: str, refresh: str, expected: tuple[int, int]
) -> None:
    """``coarse_floor``: per step the restrictions, prolongations and ``F̂`` products of the
    combination on parts, per refresh ``F_c`` (``k·S``) and a residual basis (``2S`` + its
    ``M⁻¹`` applies), at every step in the faithful schedule; the step-time floor adds
    them to KFAC's."""
    from twolevel_kfac.bench.flops import LayerShape, coarse_floor

    shapes = [LayerShape("fc", d_in=3, d_out=2)]
    assert coarse_floor(shapes, 5, space, combination, refresh) == expected
    kfac = flop_floor(shapes, batch=10, fisher_batch=5)
    step, per_refresh = expected
    two_level = replace(kfac, coarse_step=step, coarse_refresh=per_refresh)
    assert two_level.step(4) == pytest.approx(kfac.step(4) + step + per_refresh / 4)


def test_coarse_floor_of_the_spectral_space_counts_its_extreme_pairs() -> None:
    """Under Cholesky the spectral basis costs a factorisation (``n³/3``) per factor of side
    above ``SMALL`` and a full ``eigh`` (``9n³``) per smaller one; under ``eigen`` nothing
    beyond ``F_c`` (the eigenpairs are the fine level's, counted in ``flop_floor``)."""
    from twolevel_kfac.bench.flops import LayerShape, coarse_floor
    from twolevel_kfac.curvature.extreme_eigen import SMALL

    big = SMALL + 2  # A's side, with the bias column
    shapes = [
        LayerShape("big", d_in=big - 1, d_out=SMALL + 6),
        LayerShape("small", d_in=3, d_out=2),
    ]
    sweep = 2 * 5 * (big * (SMALL + 6) + 4 * 2)  # S with n_F = 5
    _, eigen = coarse_floor(shapes, 5, "spectral", "additive", inverse_method="eigen")
    assert eigen == sweep
    _, cholesky = coarse_floor(shapes, 5, "spectral", "additive", inverse_method="cholesky")
    assert cholesky == pytest.approx(sweep + (big**3 + (SMALL + 6) ** 3) / 3 + 9 * (4**3 + 2**3))


def test_the_two_level_floors_of_the_step_time_problems() -> None:
    """The faithful residual schedule cannot reach 1.4× KFAC's step on the MNIST
    autoencoder: its floor alone is above (an ``M⁻¹`` apply per step); the spectral space
    was at 1.125× with eigendecompositions instead of Cholesky and is at 1.008× with one
    extreme pair per factor (a Cholesky factorisation each); NICO's coarse level is 0.2 %."""
    from twolevel_kfac.bench.compare import method_floor
    from twolevel_kfac.bench.methods import method_spec

    problem = PROBLEMS["mnist_ae_512"]
    shapes = layer_shapes(problem.build_model(), problem.input_shape)
    kfac = method_floor(method_spec("kfac"), problem, shapes).ratio(20)

    def relative(label: str, **options: object) -> float:
        spec = method_spec(label).with_options(label, **options)
        return method_floor(spec, problem, shapes).ratio(20) / kfac

    assert relative("residual+additive:faithful") == pytest.approx(1.58, abs=0.01)
    assert relative("spectral+additive") == pytest.approx(1.008, abs=0.001)
    assert relative("spectral+additive", inverse_method="eigen") == pytest.approx(1.125, abs=0.01)
    assert 1.0 < relative("nicolaides+additive") < 1.005


def test_layer_shapes_of_a_convnet_count_output_locations() -> None:
    shapes = layer_shapes(PROBLEMS["cuda_convnet_256"].build_model(), (3, 32, 32))
    first = shapes[0]
    assert (first.d_in, first.d_out, first.locations) == (27, 32, 30 * 30)
    assert shapes[-1].locations == 1 and shapes[-1].d_out == 10
    grouped = layer_shapes(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2, bias=False)), (4, 5, 5))
    assert (grouped[0].d_in, grouped[0].locations, grouped[0].bias) == (18, 9, False)


def test_timing_statistics() -> None:
    assert block_steps(1, 10) == 10 and block_steps(20, 10) == 20 and block_steps(3, 10) == 12
    assert quartiles([2.0]) == (2.0, 2.0, 2.0)
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    # paired per-round ratios: a slow round for both methods cancels
    assert ratio_stats([2.0, 20.0, 4.0], [1.0, 10.0, 2.0]) == (2.0, 2.0, 2.0)


def test_interleave_flushes_denormals_while_timing_only() -> None:
    """Inside the blocks a denormal input reads as zero (FTZ/DAZ); after them torch's
    default (denormals kept) is back, also when a runner raises."""
    from twolevel_kfac.bench.timing import denormals_flushed

    denormal = torch.tensor([1e-40])  # below float32's smallest normal, 1.2e-38
    seen: list[float] = []

    class Probe:
        def run(self, steps: int) -> None:
            seen.append(float(denormal * 1.0))

    with denormals_flushed() as supported:
        inside = float(denormal * 1.0)
    if not supported:
        pytest.skip("this CPU cannot flush denormals")
    assert inside == 0.0 and float(denormal * 1.0) > 0.0
    interleave({"probe": Probe()}, block=1, repeats=1, log=lambda _: None)  # type: ignore[dict-item]
    assert seen and all(v == 0.0 for v in seen) and float(denormal * 1.0) > 0.0
    with pytest.raises(RuntimeError), denormals_flushed():
        raise RuntimeError("a failing block")
    assert float(denormal * 1.0) > 0.0


def test_step_time_quick(tmp_path: Path) -> None:
    data = _run(tmp_path, "step_time")
    assert data["benchmark"] == "step_time" and data["settings"]["quick"] is True
    assert data["environment"]["threads"] == 1
    assert [g["interval"] for g in data["results"]] == [2, 4]
    for group in data["results"]:
        _check_group(group)
        labels = [r["method"] for r in group["rows"]]
        assert {"adam", "kfac:pi:cholesky", "residual+additive:faithful"} <= set(labels)
        memory = {r["method"]: r.get("peak_mib") for r in group["rows"]}
        assert memory["kfac"] > memory["sgd"] >= 0
    floor = data["floors"]["curves_ae_256"]
    assert floor["fisher_batch"] == 64 and len(floor["layers"]) == 12
    assert (tmp_path / "step_time_curves_ae_256.png").stat().st_size > 5000
    assert "| kfac |" in (tmp_path / "step_time.md").read_text()
    _rerendered(tmp_path, "step_time")


def test_scaling_quick(tmp_path: Path) -> None:
    data = _run(tmp_path, "scaling")
    assert [s["quantity"] for s in data["sweeps"]] == ["batch", "width", "depth"]
    for sweep in data["sweeps"]:
        assert len(sweep["points"]) == 2
        for point in sweep["points"]:
            assert _positive(point["kfac_floor_ratio"])
            for row in point["rows"].values():
                assert _positive(row["ratio_sgd"])
    assert (tmp_path / "scaling.png").stat().st_size > 5000
    _rerendered(tmp_path, "scaling")


def test_asdl_quick(tmp_path: Path) -> None:
    data = _run(tmp_path, "asdl")
    assert "kfac_pytorch" in data["skipped"] and "--external" in data["skipped"]["kfac_pytorch"]
    if external.asdl_status() is not None:
        assert "asdl:kfac" in data["skipped"] and not data["results"]
        return
    for group in data["results"]:
        _check_group(group)
        labels = ["sgd", "ours:asdl", "ours:asdl:unchecked", "ours:defaults", "asdl:kfac"]
        assert [r["method"] for r in group["rows"]] == labels


def test_asdl_missing_is_skipped_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(external, "asdl_status", lambda: external.ASDL_MISSING)
    data = _run(tmp_path, "asdl")
    assert data["results"] == [] and data["skipped"]["asdl:kfac"] == external.ASDL_MISSING
    assert "pip install asdfghjkl" in (tmp_path / "asdl.md").read_text()


FAKE_KFAC = '''
class KFACPreconditioner:
    """Stand-in with kfac-pytorch's constructor keywords: counts its steps."""

    def __init__(self, model, *, factor_update_steps, inv_update_steps, damping,
                 factor_decay, kl_clip, lr):
        self.steps = 0

    def step(self):
        self.steps += 1
'''


def _checkout(root: Path, files: dict[str, str]) -> Path:
    """A stand-in checkout at ``root`` with these files (relative path → text)."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _peer_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, checkout: Path, peer: str
) -> dict[str, Any]:
    """``tlkfac bench asdl --quick FLAG CHECKOUT`` without ASDL: the one result group."""
    monkeypatch.setattr(external, "asdl_status", lambda: "not under test")
    monkeypatch.syspath_prepend(str(checkout))
    out = tmp_path / "out"
    args = ["bench", "asdl", *QUICK, "--intervals", "2", "--out", str(out)]
    assert main([*args, flag, str(checkout)]) == 0
    data = json.loads((out / "asdl.json").read_text())
    assert peer not in data["skipped"]
    (group,) = data["results"]
    _check_group(group)
    return group


def test_external_checkout_is_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--external PATH`` imports ``kfac.preconditioner`` from PATH (a stand-in here)."""
    checkout = _checkout(
        tmp_path / "kfac-pytorch", {"kfac/__init__.py": "", "kfac/preconditioner.py": FAKE_KFAC}
    )
    group = _peer_group(tmp_path, monkeypatch, "--external", checkout, "kfac_pytorch")
    assert [r["method"] for r in group["rows"]] == ["sgd", "ours:kfac_pytorch", "kfac_pytorch"]


FAKE_AUTHORS = '''
CALLS = []


class KFAC:
    """Stand-in with the authors' constructor keywords and protocol: records its steps."""

    def __init__(self, net, damping, T_cov, T_inv, alpha, constraint_norm, clipping,
                 batch_size, **coarse):
        self.update_stats = False
        self._iteration_counter = 0
        self.coarse = coarse

    def step(self, update_params=True):
        CALLS.append((self._iteration_counter, self.update_stats, update_params))
        if update_params:
            self._iteration_counter += 1


TwolevelKFAC = KFAC
'''


def test_authors_checkout_is_driven_as_its_readme_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--authors PATH`` times the authors' KFAC, NICO and RESIDU beside ours, each
    iteration as the authors' README has it: the sampled Fisher pass with
    ``update_stats`` on and ``step(update_params=False)``, then the preconditioning step."""
    checkout = _checkout(
        tmp_path / "natural-gradients",
        {
            "optimizers/__init__.py": "",
            "optimizers/kfac.py": FAKE_AUTHORS,
            "optimizers/twolevel_kfac.py": "from optimizers.kfac import *\n",
        },
    )
    for name in [m for m in sys.modules if m == "optimizers" or m.startswith("optimizers.")]:
        monkeypatch.delitem(sys.modules, name)
    group = _peer_group(tmp_path, monkeypatch, "--authors", checkout, "authors")
    labels = [r["method"] for r in group["rows"]]
    assert labels == ["sgd"] + [
        f"{who}authors:{m}" for m in ("kfac", "nicolaides", "residual") for who in ("ours:", "")
    ]
    calls = sys.modules["optimizers.kfac"].CALLS
    assert calls and calls[0::2] == [(n, True, False) for n, _, _ in calls[0::2]]
    assert calls[1::2] == [(n, False, True) for n, _, _ in calls[0::2]]


def test_uninstalled_kfac_pytorch_checkout_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kfac-pytorch's ``__init__`` reads its version from package metadata, so a bare
    checkout fails to import; the reason says to install it."""
    version = "import importlib.metadata\n__version__ = importlib.metadata.version('kfac-x')\n"
    checkout = _checkout(tmp_path / "kfac-pytorch", {"kfac/__init__.py": version})
    for name in [m for m in sys.modules if m == "kfac" or m.startswith("kfac.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(checkout))
    reason = external.kfac_pytorch_status(str(checkout))
    assert reason is not None and "pip install --no-deps" in reason


def test_time_to_target_quick(tmp_path: Path) -> None:
    data = _run(tmp_path, "time_to_target")
    assert {r["method"] for r in data["runs"]} == {"kfac", "sgd", "adam"}
    for run in data["runs"]:
        assert len(run["wall_time_s"]) == len(run["train_loss"]) == 2
        assert all(_positive(t) for t in run["wall_time_s"])
    assert data["settings"]["hyperparameters"]["kfac"]["lr"] == 0.3  # configs/cpu/curves.yaml
    for row in data["summary"]:
        assert row["median_s"] is None or _positive(row["median_s"])
    assert (tmp_path / "time_to_target.png").stat().st_size > 5000


def test_eigh_dtype_quick(tmp_path: Path) -> None:
    data = _run(tmp_path, "eigh_dtype")
    assert [r["size"] for r in data["rows"]] == [64, 128]
    assert all(_positive(r["ratio"]) for r in data["rows"])
    assert [(r["count"], r["size"]) for r in data["batched"]] == [(4, 16), (4, 64)]
    for row in data["batched"]:
        assert row["ratio"] == pytest.approx(row["batched_s"] / row["loop_s"])
        assert _positive(row["loop_s"]) and _positive(row["batched_s"])
    assert "batched / loop" in (tmp_path / "eigh_dtype.md").read_text()


def test_extreme_pair_quick(tmp_path: Path) -> None:
    """The spectral space's pair against ``eigh``: the smallest pair of every CURVES factor
    above ``SMALL`` is certified in the first phase (near-null factors)."""
    data = _run(tmp_path, "extreme_pair")
    problems = [(r["problem"], r["which"]) for r in data["rows"]]
    assert problems == [
        (name, which)
        for name in ("curves_ae_256", "conditioned n=144", "conditioned n=160")
        for which in ("smallest", "largest")
    ]
    assert data["rows"][0]["certified"] == data["rows"][0]["large"] == 10  # sides 200-785
    for row in data["rows"]:
        assert 0 <= row["certified"] <= row["large"], row
        assert _positive(row["eigh_s"]) and _positive(row["pair_s"])
        assert row["ratio"] == pytest.approx(row["pair_s"] / row["eigh_s"])
    assert data["rows"][0]["factors"] == 24  # A and G of CURVES' 12 layers
    assert "pair / eigh" in (tmp_path / "extreme_pair.md").read_text()


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "nonsense", "--out", str(tmp_path)]) == 2
    assert "unknown benchmark 'nonsense'" in capsys.readouterr().err
    args = ["bench", "step_time", *QUICK, "--out", str(tmp_path)]
    assert main([*args, "--methods", "kfac:typo"]) == 2
    assert "unknown method(s) ['kfac:typo']" in capsys.readouterr().err
    assert main(["bench", "scaling", "--render", "--out", str(tmp_path)]) == 2
    assert "tlkfac bench scaling" in capsys.readouterr().err


def _check_compile_row(row: dict[str, Any]) -> None:
    """A compile pair: a recorded failure, or 'not equivalent' without times, or times and
    finite positive compiled / eager ratios."""
    if row["error"] is not None:
        assert isinstance(row["error"], str) and row["error"] and verdict(row) == "failed"
        return
    assert _positive(row["compile_s"]) and _positive(row["eager_warmup_s"])
    assert row["graphs"] >= 1 and row["recompile_limit_hits"] >= 0
    if not row["equivalent"]:
        assert row["relative_difference"] > TOLERANCE and "ratio" not in row
        return
    for key in ("eager_ms", "compiled_ms", "ratio", "ratio_q1", "ratio_q3"):
        assert _positive(row[key]), (row["label"], key, row[key])
    assert row["ratio_q1"] <= row["ratio"] <= row["ratio_q3"]
    assert row["graphs_while_timed"] == 0
    assert verdict(row) in ("compile wins", "compile loses", "no clear difference")


@pytest.mark.skipif(NO_COMPILE is not None, reason=f"torch.compile unavailable: {NO_COMPILE}")
def test_compile_quick(tmp_path: Path) -> None:
    data = _run(tmp_path, "compile")
    assert data["benchmark"] == "compile" and data["unavailable"] is None
    (group,) = data["models"]
    labels = [r["label"] for r in group["rows"]]
    assert labels[0] == "sgd" and len(labels) == 3
    assert "mc Fisher" in labels[1] and "empirical Fisher" in labels[2]
    for row in group["rows"]:
        _check_compile_row(row)
    for row in group["rows"][1:]:
        if row["error"] is None:
            assert row["facts"]["eager"] == {"layers": 3, "zero_G_layers": 0}
    (apply,) = data["apply"]
    _check_compile_row(apply)
    assert apply["error"] is not None or apply["relative_difference"] <= TOLERANCE
    text = (tmp_path / "compile.md").read_text()
    assert "## Where compile wins and where it does not" in text and "| sgd |" in text
    _rerendered(tmp_path, "compile")


def _pair(compiled_scale: float, fail: bool = False) -> CompilePair:
    """A stand-in pair without torch.compile: the 'compiled' twin scales its update."""

    def build(compiled: bool) -> tuple[Runner, Any]:
        if compiled and fail:
            raise RuntimeError("no compiler\nsecond line")
        state = [torch.zeros(3)]

        def step() -> None:
            state[0] = state[0] + (compiled_scale if compiled else 1.0)

        return Runner(step), lambda: state[0]

    return CompilePair("stand-in", build, warmup=3, block=2)


def test_compile_pair_reports_differences_and_failures() -> None:
    same = measure_pair(_pair(1.0), repeats=2, log=lambda _: None)
    assert same["equivalent"] and same["relative_difference"] == 0.0
    assert same["graphs"] == 0 and len(same["compiled_times_s"]) == 2
    assert _positive(same["ratio"]) and verdict(same) != "failed"
    differ = measure_pair(_pair(1.5), repeats=2, log=lambda _: None)
    assert not differ["equivalent"] and differ["relative_difference"] == pytest.approx(0.5)
    assert "ratio" not in differ and verdict(differ) == "not equivalent"
    failed = measure_pair(_pair(1.0, fail=True), repeats=2, log=lambda _: None)
    assert failed["error"] == "RuntimeError: no compiler / second line"
    assert verdict(failed) == "failed" and "ratio" not in failed


def test_the_floor_assumes_the_inverse_method_each_method_uses() -> None:
    """Ours resolve ``auto`` as the optimizers do; the peers keep their own (eigen unless
    configured)."""
    from twolevel_kfac.bench.methods import MethodSpec, inverse_method, method_spec

    assert inverse_method(method_spec("kfac")) == "cholesky"
    assert inverse_method(method_spec("kfac:pi:eigen")) == "eigen"
    assert inverse_method(method_spec("spectral+additive")) == "cholesky"
    assert inverse_method(method_spec("ekfac")) == "eigen"
    assert inverse_method(method_spec("kpsvd")) == "cholesky"
    assert inverse_method(MethodSpec("kfac_pytorch", "kfac_pytorch")) == "eigen"
    asdl = MethodSpec("asdl:kfac", "asdl", (("inverse_method", "cholesky"),))
    assert inverse_method(asdl) == "cholesky"


def test_a_problem_subset_is_merged_into_the_existing_document() -> None:
    """``--problems X``: X's groups replace the old ones (per problem and T), the others
    stay in their order, per-problem dicts merge, settings are the new run's."""
    from twolevel_kfac.bench.report import merge_documents

    old = {
        "benchmark": "step_time",
        "settings": {"repeats": 5},
        "floors": {"a": 1.0, "b": 2.0},
        "results": [
            {"problem": "a", "interval": 20, "rows": "old a"},
            {"problem": "b", "interval": 20, "rows": "old b"},
            {"problem": "b", "interval": 1, "rows": "old b1"},
        ],
    }
    new = {
        "benchmark": "step_time",
        "settings": {"repeats": 2},
        "floors": {"b": 3.0, "c": 4.0},
        "results": [
            {"problem": "b", "interval": 20, "rows": "new b"},
            {"problem": "c", "interval": 20, "rows": "new c"},
        ],
    }
    merged = merge_documents(old, new)
    assert [g["rows"] for g in merged["results"]] == ["old a", "new b", "old b1", "new c"]
    assert merged["floors"] == {"a": 1.0, "b": 3.0, "c": 4.0}
    assert merged["settings"] == {"repeats": 2}
    assert merge_documents({**old, "benchmark": "memory"}, new) is new
    assert merge_documents({**old, "settings": {"quick": True}}, new) is new
    assert merge_documents({"benchmark": "step_time", "results": []}, new) is new
    assert merge_documents({"benchmark": "step_time", "rows": [1]}, new) is new
    assert merge_documents({"benchmark": "x", "results": [[1]]}, {"benchmark": "x"}) == {
        "benchmark": "x"
    }


def test_a_quick_check_never_writes_the_published_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tlkfac bench --quick`` without ``--out`` (the README's check) wrote its numbers over
    ``docs/benchmarks``; it writes ``results/bench-quick`` now."""
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "eigh_dtype", *QUICK]) == 0
    assert (tmp_path / "results" / "bench-quick" / "eigh_dtype.json").is_file()
    assert not (tmp_path / "docs").exists()


def test_tables_quick(tmp_path: Path) -> None:
    """Both forms of an untied table's token factor, per ``V``, against SGD."""
    data = _run(tmp_path, "tables")
    assert [(r["rows"], r["form"]) for r in data["rows"]] == [
        (rows, form) for rows in (64, 300) for form in ("dense", "vector")
    ]
    for row in data["rows"]:
        assert _positive(row["steady_s"]) and _positive(row["refresh_s"]), row
        assert row["ratio"] == pytest.approx(row["steady_s"] / row["sgd_s"])
    dense, vector = data["rows"][2], data["rows"][3]  # V = 300: the dense V × V state
    assert dense["state_mib"] > vector["state_mib"] + 300 * 300 * 4 / 2**20 * 0.9
    assert "steady ÷ SGD" in (tmp_path / "tables.md").read_text()
