"""`advbench attack --suite`, the masking record of a run, and `advbench report` (plots, report.md,
robustbench.json)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from robustbench_lite.cli import app
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.suite import ATTACK_SUITES, suite_attack_specs

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_named_attack_suites():
    std = suite_attack_specs("standard")
    assert [s.label for s in std] == ["apgd-ce", "apgd-t"]
    assert std[0].params["steps"] == 100 and std[1].params["steps"] == 100
    assert std[1].params["n_target_classes"] == 9
    assert [s.label for s in suite_attack_specs("Quick")] == ["fgsm", "pgd-20"]
    assert set(ATTACK_SUITES) == {"standard", "quick"}
    with pytest.raises(AdvbenchError, match="did you mean 'standard'"):
        suite_attack_specs("standrd")


def test_suite_and_attack_conflict(tmp_path):
    r = run("attack", "--model", "smallcnn", "--eps", "0.1", "--suite", "quick", "--attack", "pgd",
            "--results-dir", tmp_path)
    assert r.exit_code == 2
    assert r.stderr.startswith("error: --suite quick and --attack conflict")
    r = run("attack", "--model", "smallcnn", "--eps", "0.1", "--suite", "quick", "--steps", "5",
            "--results-dir", tmp_path)
    assert r.exit_code == 2 and "--steps" in r.stderr


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, trained_smallcnn_path):
    results = tmp_path_factory.mktemp("report") / "results"
    r = run("attack", "--checkpoint", trained_smallcnn_path, "--eps", "0.05,0.1", "--suite", "quick",
            "-n", "24", "--device", "cpu", "--results-dir", results, "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    return results, out["run_id"], Path(out["run_dir"])


def test_run_records_masking_checks(quick_run):
    results, run_id, run_dir = quick_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["masking"]["checked"] is True
    assert summary["warnings"] == [] and "attack-suite=quick" in summary["flags"]
    with open(results / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["attack"] for r in rows} >= {"fgsm", "pgd-20"}
    assert all("masking:" not in r["flags"] for r in rows)


def test_report_writes_plots_markdown_and_robustbench_json(quick_run, tmp_path):
    results, run_id, run_dir = quick_run
    metrics = tmp_path / "m.metrics.csv"
    metrics.write_text("epoch,train_acc,train_adv_acc,test_acc\n1,0.8,0.5,0.79\n2,0.9,0.6,0.88\n")
    rb = tmp_path / "rb.json"
    r = run("report", run_id[:15], "--results-dir", results, "--training-csv", metrics, "--robustbench-json", rb,
            "--n-images", "4")
    assert r.exit_code == 0, r.stderr
    for name in ("robustness_curve.png", "examples.png", "training_curves.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG, name
    md = (run_dir / "report.md").read_text()
    assert "![robustness curve](robustness_curve.png)" in md and "![examples](examples.png)" in md
    assert "| linf 0.05 |" in md and "pgd-20" in md
    info = json.loads(rb.read_text())
    assert info == json.loads((run_dir / "robustbench.json").read_text())
    for key in ("name", "dataset", "eps", "clean_acc", "autoattack_acc", "architecture", "number_forward_passes"):
        assert key in info
    assert info["eps"] == "0.1" and info["architecture"] == "smallcnn" and info["dataset"] == "mnist-5k"
    extra = info["advbench"]
    assert extra["seed"] == 0 and extra["versions"]["torch"] and extra["attack_forward_passes"] > 0
    assert [a["label"] for a in extra["attacks"]] == ["fgsm", "pgd-20"]
    assert extra["attacks"][1]["settings"]["steps"] == 20


def test_report_errors(tmp_path):
    r = run("report", "nope", "--results-dir", tmp_path)
    assert r.exit_code == 2 and r.stderr.startswith("error: run 'nope' not found")


def test_masked_model_warns_in_terminal_summary_and_leaderboard(tmp_path, trained_smallcnn_path, monkeypatch):
    from robustbench_lite import suite
    from test_masking import Quantised

    orig = suite.load_model

    def masked(*a, **k):
        model, ds, info = orig(*a, **k)
        return Quantised(model).eval(), ds, info

    monkeypatch.setattr(suite, "load_model", masked)
    results = tmp_path / "results"
    r = run("attack", "--checkpoint", trained_smallcnn_path, "--eps", "0.1", "--suite", "quick", "-n", "16",
            "--device", "cpu", "--results-dir", results)
    assert r.exit_code == 0, r.stderr
    assert "warning: input gradients of the logit margin are exactly zero" in r.stdout
    run_dir = next((results / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "masking:zero-gradient" in summary["flags"] and summary["warnings"]
    with open(results / "leaderboard.csv") as f:
        assert all("masking:zero-gradient" in row["flags"] for row in csv.DictReader(f))
