"""The fast-path flags (--amp bf16, --channels-last, --compile) run and agree with the default path.
On CUDA they are measured by benchmarks/; here they run on the CPU."""
import json
import shutil

import pytest
from typer.testing import CliRunner

from robustbench_lite.cli import app

runner = CliRunner()


@pytest.fixture
def results(tmp_path, trained_smallcnn_path):
    models = tmp_path / "res" / "models"
    models.mkdir(parents=True)
    shutil.copy(trained_smallcnn_path, models / "smallcnn-mnist-5k-standard.pt")
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
