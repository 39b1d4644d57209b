"""`--suite autoattack`: the reference AutoAttack (PyPI pyautoattack) as an attack, run by our evaluator
on the same model, samples and threat model, recorded like any suite; and its missing-package error.
Tiny models and a handful of images: the reference's Square runs 5,000 queries on every sample it
has not fooled, so these tests keep few samples robust and run single-threaded."""
from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import attacks
from robustbench_lite.cli import app
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.evaluator import evaluate
from robustbench_lite.specs import CASCADE
from robustbench_lite.threat import ThreatModel

pytest.importorskip("pyautoattack")  # installed with the test extra; the missing-package case is simulated below
runner = CliRunner()
MISSING = ("error: attack 'autoattack' needs the reference AutoAttack package, pyautoattack: install it with pip "
           "install 'advbench[autoattack]'")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference's many tiny ops: threads only contend on a loaded machine
    yield
    torch.set_num_threads(before)


def mlp_and_data(n=12, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_the_reference_agrees_with_our_standard_suite_and_leaves_no_trace(one_thread, capfd):
    model, x, y = mlp_and_data()
    threat = ThreatModel("linf", 0.15)
    rng_before = torch.random.get_rng_state()
    ref = evaluate(model, x, y, "autoattack", threat, batch_size=12)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # it seeds torch's generator: restored
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # its logger and prints are silenced
    r = ref.threats[0].attacks["autoattack"]
    assert ref.evaluation == "autoattack" and ref.reportable
    assert r.config == {"attack": "autoattack", "norm": "linf", "eps": 0.15, "seed": 0, "version": "standard"}
    assert 0 < r.n_fooled < r.n_attacked and r.max_norm <= 0.15 + 1e-6  # some fooled, some robust
    assert r.stats["forward"] > 1000  # its forwards are counted (Square alone queries 5,000 times)
    ours = evaluate(model, x, y, "apgd-ce,apgd-t", threat, batch_size=12, cascade=True)
    assert abs(ours.threats[0].worst_case_acc - ref.threats[0].worst_case_acc) <= 1 / 12  # measured: equal


def test_the_reference_on_l2_respects_the_threat_model(one_thread):
    model, x, y = mlp_and_data(n=6, seed=1)
    res = evaluate(model, x, y, "autoattack", ThreatModel("l2", 0.5), batch_size=6)  # violations would raise
    r = res.threats[0].attacks["autoattack"]
    assert 0 < r.n_fooled < r.n_attacked  # a robust sample: all four attacks ran (measured: 5 of 6 fooled)
    assert r.max_norm <= 0.5 * (1 + 1e-6)


def test_the_reference_takes_only_its_own_settings():
    threat = ThreatModel("linf", 0.1)
    with pytest.raises(AdvbenchError, match=r"^invalid steps=5 for attack 'autoattack': the reference AutoAttack "
                                            r"runs its own settings \(only seed and version can be set\)"):
        attacks.create("autoattack", threat=threat, steps=5)
    with pytest.raises(AdvbenchError, match="invalid version='plus' for attack 'autoattack': expected one of "
                                            "standard, rand"):
        attacks.create("autoattack", threat=threat, version="plus")
    r = runner.invoke(app, ["attack", "--model", "smallcnn", "--eps", "0.3", "--suite", "autoattack", "--amp", "bf16"])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        "error: invalid amp='bf16' for attack 'autoattack': the reference AutoAttack runs its own settings (only seed "
        "and version can be set)"]
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 4))
    x = torch.rand(3, 1, 6, 6)
    with pytest.raises(AdvbenchError, match="the reference's standard version needs at least 10 classes, the model "
                                            "has 4"):
        attacks.create("autoattack", threat=threat)(model, x, torch.zeros(3, dtype=torch.long))


def test_suite_autoattack_is_recorded_like_any_suite(trained_smallcnn_path, tmp_path, one_thread):
    results = tmp_path / "results"
    r = runner.invoke(app, ["attack", "--checkpoint", str(trained_smallcnn_path), "--eps", "0.3", "-n", "8",
                            "--suite", "autoattack", "--results-dir", str(results), "--device", "cpu",
                            "--no-masking-checks"])
    assert r.exit_code == 0, r.output
    (worst,) = [ln for ln in r.stdout.splitlines() if ln.startswith("│ worst case ")]
    assert "≤" not in worst and "upper bound" not in r.stdout  # a reportable worst case
    with open(results / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert [x["attack"] for x in rows] == ["autoattack", "worst-case"]
    assert {(x["mode"], x["evaluation"]) for x in rows} == {(CASCADE, "autoattack")}
    assert json.loads(rows[0]["attack_params"]) == {"seed": 0, "version": "standard"}
    assert float(rows[1]["robust_acc"]) <= 0.125  # a standard MNIST model falls at eps 0.3
    assert "standard (cascade)" not in (results / "leaderboard.md").read_text()
    assert "| autoattack (cascade) |" in (results / "leaderboard.md").read_text()


def test_without_the_package_one_line_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # `import pyautoattack` raises ImportError
    r = runner.invoke(app, ["attack", "--model", "smallcnn", "--eps", "0.3", "--suite", "autoattack",
                            "--results-dir", str(tmp_path / "results"), "--device", "cpu"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines() == [MISSING]
    assert not (tmp_path / "results" / "runs").exists()  # refused before any work
    with pytest.raises(AdvbenchError, match=r"pip install 'advbench\[autoattack\]'"):
        attacks.create("autoattack", threat=ThreatModel("linf", 0.3))
