"""The transformer problems: the ``stdlib_chars`` windows and split (on a fake standard
library), the sequence loss in both conventions, token accuracy, the ``tiny_gpt`` / ``vit``
models, and each shipped config (configs/cpu/tiny_gpt.yaml, vit.yaml) for a few steps with
tiny sizes through ``run_comparison``, the code path of ``tlkfac compare``."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from twolevel_kfac.cli import main
from twolevel_kfac.experiments import comparison
from twolevel_kfac.experiments.config import parse_config
from twolevel_kfac.experiments.data import load_dataset, text
from twolevel_kfac.experiments.losses import loss_function
from twolevel_kfac.experiments.metrics import read_metrics
from twolevel_kfac.experiments.models import build_model
from twolevel_kfac.experiments.problem import Data, evaluate
from twolevel_kfac.experiments.yaml_io import read_yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FAKE_FILES = {  # written in this order; the corpus takes them by name
    "b.py": "print('b')\n",
    "a.py": "x = 'é'\n",  # one non-ASCII character → REPLACEMENT
    "c.txt": "not python\n",  # not *.py: left out
}


@pytest.fixture
def fake_stdlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A standard library folder of two ``*.py`` files (plus files the corpus skips);
    returns the corpus text it should give."""
    root = tmp_path / "stdlib"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "d.py").write_text("in a subfolder: left out\n")
    for name, body in FAKE_FILES.items():
        (root / name).write_text(body, encoding="utf-8")
    (root / "e.py").write_bytes(b"y = 1\xff\n")  # invalid UTF-8 → U+FFFD → REPLACEMENT
    monkeypatch.setattr(text, "stdlib_dir", lambda: root)
    return FAKE_FILES["a.py"] + FAKE_FILES["b.py"] + "y = 1\ufffd\n"


def test_corpus_windows_and_split(fake_stdlib: str) -> None:
    corpus = fake_stdlib
    assert text.read_corpus() == corpus
    ids = text.encode(corpus)
    assert ids.dtype == torch.int64 and len(ids) == len(corpus) == 26
    expected = [ord(c) if ord(c) < 128 else text.REPLACEMENT for c in corpus]
    assert ids.tolist() == expected and expected.count(text.REPLACEMENT) == 2
    context = 4
    train_x, train_y, test_x, test_y = load_dataset("stdlib_chars", context=context)
    cut = int(len(ids) * 0.9)  # 23: windows of 5 from the first 23 ids, then from 3 ids
    assert cut == 23
    assert train_x.shape == train_y.shape == (23 // 5, context)
    assert test_x.shape == test_y.shape == (0, context)  # 3 test ids: no whole window
    for k in range(len(train_x)):
        window = ids[5 * k : 5 * k + 5]
        assert torch.equal(train_x[k], window[:-1]) and torch.equal(train_y[k], window[1:])
    _, _, test_x, test_y = load_dataset("stdlib_chars", context=1)  # windows of 2
    assert torch.equal(test_x[:, 0], ids[23:25:2][:1]) and torch.equal(test_y[:, 0], ids[24:25])
    stats = text.corpus_stats(context)
    assert (stats.files, stats.characters, stats.non_ascii) == (3, 26, 2)
    assert stats.md5 == hashlib.md5(corpus.encode("utf-8")).hexdigest()
    assert (stats.train_windows, stats.test_windows) == (4, 0)


def test_data_set_options(fake_stdlib: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"dataset\.context applies to the text data sets"):
        load_dataset("curves", context=8)
    with pytest.raises(ValueError, match="next-character task"):
        load_dataset("stdlib_chars", autoencoder=True)
    with pytest.raises(ValueError, match=r"dataset\.context must be >= 1"):
        text.windows(torch.arange(5), 0)
    assert main(["data", "info", "stdlib-chars"]) == 0
    out = capsys.readouterr().out
    md5 = hashlib.md5(fake_stdlib.encode()).hexdigest()
    assert f"3 files, 26 characters (2 non-ASCII → id 0), md5 {md5}" in out
    assert "another Python version gives another corpus" in out
    for action in ("fetch", "verify"):
        assert main(["data", action, "stdlib_chars"]) == 0
        assert "nothing to download" in capsys.readouterr().out


def test_empty_stdlib_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text, "stdlib_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no \*\.py files"):
        load_dataset("stdlib_chars")


def test_sequence_loss_conventions_and_token_accuracy() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=gen)
    target = torch.randint(0, 7, (3, 5), generator=gen)
    flat = (logits.reshape(15, 7), target.reshape(15))
    total = loss_function("sequence_cross_entropy", "sum")(logits, target)
    token_mean = loss_function("sequence_cross_entropy", "mean")(logits, target)
    torch.testing.assert_close(total, F.cross_entropy(*flat, reduction="sum") / 3)
    torch.testing.assert_close(token_mean, F.cross_entropy(*flat))
    torch.testing.assert_close(token_mean, total / 5)
    model = torch.nn.Identity()  # the "inputs" are the logits
    loss, acc = evaluate(model, loss_function("sequence_cross_entropy"), logits, target, 2)
    assert loss == pytest.approx(float(total), rel=1e-6)
    assert acc == int((logits.argmax(-1) == target).sum()) / 15 == 3 / 15  # of the tokens
    _, acc = evaluate(model, loss_function("cross_entropy"), *flat)  # [N, C]: per sample
    assert acc == int((flat[0].argmax(1) == flat[1]).sum()) / 15


def test_model_shapes_and_causality() -> None:
    gpt = build_model("tiny_gpt", vocab=11, context=8, width=16, depth=2, heads=2)
    tokens = torch.randint(0, 11, (3, 6))
    out = gpt(tokens)
    assert out.shape == (3, 6, 11)
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 11  # the logits before position 4 do not move
    torch.testing.assert_close(gpt(changed)[:, :4], out[:, :4])
    with pytest.raises(ValueError, match="T <= context 8"):
        gpt(torch.zeros(1, 9, dtype=torch.long))
    vit = build_model("vit", width=16, depth=1, heads=2, classes=5)
    images = torch.rand(4, 784)
    assert vit(images).shape == (4, 5)
    torch.testing.assert_close(vit(images.reshape(4, 1, 28, 28)), vit(images))
    with pytest.raises(ValueError, match="patch dividing the image size"):
        build_model("vit", patch=5)


def _tiny(name: str, model: dict[str, Any]) -> dict[str, Any]:
    """The shipped config ``name`` with a tiny model, one seed and one short epoch."""
    raw = read_yaml(CONFIGS / "cpu" / f"{name}.yaml")
    raw["problem"] |= {"seeds": [0], "batch_size": 4, "epochs": 1, "log_every": 1}
    raw["problem"]["model"]["kwargs"] = model
    for entry in raw["defaults"]["kfac"], *(m or {} for m in raw["methods"].values()):
        for key in ("cov_interval", "inv_interval"):
            if key in entry:
                entry[key] = 2
    return raw


def _check_comparison(out: Path, labels: list[str], steps: int) -> None:
    for label in labels:
        records = read_metrics(out / label / "seed0" / "metrics.jsonl")
        assert [r["step"] for r in records if r["event"] == "step"] == list(range(1, steps + 1))
        assert records[-1]["event"] == "partial" and "val_acc" in records[-1]
    report = (out / "report.md").read_text()
    assert all(f"| {label} | 1 |" in report for label in labels)


def test_tiny_gpt_config_runs(fake_stdlib: str, tmp_path: Path) -> None:
    (Path(text.stdlib_dir()) / "f.py").write_text("def f(x):\n    return x + 1\n" * 40)
    raw = _tiny("tiny_gpt", {"context": 8, "width": 16, "depth": 1, "heads": 2})
    raw["problem"]["dataset"] |= {"context": 8}
    config = parse_config(raw)
    kind, kwargs = config.method_kwargs("kfac_reduce", 0)
    assert (kind, kwargs["class_dim"], kwargs["weight_sharing"]) == ("kfac", -1, "reduce")
    assert kwargs["fallback"] == "adamw" and kwargs["loss_reduction"] == "mean"
    outcome = comparison.run_comparison(config, tmp_path, max_steps=3, progress=False, log=print)
    _check_comparison(tmp_path, list(config.methods), 3)
    assert all(r.step == 3 for r in outcome.runs)


def test_vit_config_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MNIST-shaped synthetic data ([N, 784] in [0, 1], labels 0–9) in place of MNIST."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 784, generator=gen), torch.randint(0, 10, (40,), generator=gen)
    data = Data(train=(x[:24], y[:24]), val=(x[24:32], y[24:32]), test=(x[32:], y[32:]))
    monkeypatch.setattr(comparison, "load_data", lambda problem, data_dir: data)
    config = parse_config(_tiny("vit", {"width": 16, "depth": 1, "heads": 2}))
    assert "class_dim" not in config.method_kwargs("kfac", 0)[1]
    comparison.run_comparison(config, tmp_path, max_steps=2, progress=False, log=print)
    _check_comparison(tmp_path, list(config.methods), 2)
