"""The fast-path flags (--amp bf16, --channels-last, --compile) run and agree with the default path.
On CUDA they are measured by benchmarks/; here they run on the CPU."""
import json

import pytest
from typer.testing import CliRunner

from robustbench_lite.cli import app

runner = CliRunner()


@pytest.fixture
def results(tmp_path, zoo_smallcnn):
    return tmp_path / "res"


def _attack(results, *extra):
    r = runner.invoke(app, ["attack", "--model", "smallcnn", "--eps", "0.15", "--n-examples", "100",
                            "--attack", "fgsm,pgd", "--device", "cpu", "--results-dir", str(results), "--json",
                            *extra])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    return s, {k: v["robust_acc"] for k, v in s["threats"][0]["attacks"].items()}


def test_channels_last_and_bf16_agree_with_default(results):
    _, base = _attack(results)
    s_cl, cl = _attack(results, "--channels-last")
    assert cl == pytest.approx(base, abs=0.02)
    s_bf, bf = _attack(results, "--amp", "bf16")
    assert bf == pytest.approx(base, abs=0.06)  # bf16 logits move a few borderline samples
    flags = (results / "leaderboard.csv").read_text()
    assert "channels_last" in flags and "amp=bf16" in flags


@pytest.mark.slow
def test_compile_agrees_with_default(results):
    _, base = _attack(results)
    _, comp = _attack(results, "--compile")
    assert comp == pytest.approx(base, abs=0.02)


def _train(tmp_path, name, *extra):
    out = tmp_path / f"{name}.pt"
    r = runner.invoke(app, ["train", "--n-train", "960", "--epochs", "1", "--batch-size", "48", "--device", "cpu",
                            "--out", str(out), "--results-dir", str(tmp_path / "res"), *extra])
    assert r.exit_code == 0, r.output
    import torch

    ck = torch.load(out, weights_only=True)
    return ck["metrics"]["test_acc"], ck


def test_training_fast_paths_train_as_well(tmp_path):
    base, _ = _train(tmp_path, "base")
    cl, ck = _train(tmp_path, "cl", "--channels-last")
    assert cl == pytest.approx(base, abs=0.02)
    assert ck["extra"]["train_state"]["config"]["fast"]["channels_last"] is True
    bf, ck = _train(tmp_path, "bf", "--amp", "bf16")
    assert base > 0.7 and bf > 0.7 and bf == pytest.approx(base, abs=0.05)
    assert ck["extra"]["train_state"]["config"]["fast"]["amp"] == "bf16"


def test_training_rejects_unknown_amp(tmp_path):
    r = runner.invoke(app, ["train", "--epochs", "1", "--amp", "fp8", "--out", str(tmp_path / "m.pt")])
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: invalid --amp 'fp8': expected bf16 (or leave it out)"


@pytest.mark.slow
def test_compiled_training_agrees_with_default(tmp_path):
    base, _ = _train(tmp_path, "base")
    comp, _ = _train(tmp_path, "comp", "--compile")
    assert comp == pytest.approx(base, abs=0.02)
