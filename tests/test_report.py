"""`advbench attack --suite`, the masking record of a run, and `advbench report` (plots, report.md,
report.html, robustbench.json)."""
from __future__ import annotations

import base64
import csv
import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from browser import Chromium, needs_chromium
from robustbench_lite.cli import app
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.specs import ATTACK_SUITES, AttackSpec, suite_attack_specs

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_named_attack_suites():
    std = suite_attack_specs("standard")
    assert [s.label for s in std][:2] == ["apgd-ce", "apgd-t"]
    assert std[0].params["steps"] == 100 and std[1].params["steps"] == 100
    assert std[1].params["n_target_classes"] == 9
    assert [s.label for s in suite_attack_specs("Quick")] == ["fgsm", "pgd-20"]
    assert [s.label for s in suite_attack_specs("autoattack")] == ["autoattack"]
    assert {"standard", "rand", "quick", "autoattack"} <= set(ATTACK_SUITES)
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
    # report.html: the same text as one self-contained page, the three plots embedded, the JSON linked
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and f"<h1>advbench run {run_id}</h1>" in page
    srcs = re.findall(r'<img alt="([^"]*)" src="([^"]*)"', page)
    assert [alt for alt, _ in srcs] == ["robustness curve", "examples", "training curves"]
    for name, (_, src) in zip(("robustness_curve.png", "examples.png", "training_curves.png"), srcs):
        assert src == "data:image/png;base64," + base64.b64encode((run_dir / name).read_bytes()).decode(), name
    assert '<a href="robustbench.json">robustbench.json</a>' in page and "<link" not in page
    assert page.count("<script") == 1 and '<table class="sortable">' in page and "<td>linf 0.05</td>" in page
    assert "<li>evaluation: weak, per-attack (each attack on every clean-correct sample); the worst case is an upper " \
           "bound from weak attacks only (AutoAttack&#x27;s standard set: <code>--suite standard</code>)</li>" in page
    assert str(run_dir / "report.html") in r.stdout
    assert ("- evaluation: weak, per-attack (each attack on every clean-correct sample); the worst case is an upper "
            "bound from weak attacks only (AutoAttack's standard set: `--suite standard`)") in md
    info = json.loads(rb.read_text())
    assert info == json.loads((run_dir / "robustbench.json").read_text())
    for key in ("name", "dataset", "eps", "clean_acc", "worst_case_acc", "attacks", "architecture",
                "number_forward_passes"):
        assert key in info
    # a worst case over fgsm + pgd-20 is not AutoAttack: it is not called autoattack_acc
    assert "autoattack_acc" not in info and info["attacks"] == ["fgsm", "pgd-20"]
    assert "not AutoAttack" in info["footnote"]
    assert info["eps"] == "0.1" and info["architecture"] == "smallcnn" and info["dataset"] == "mnist-5k"
    extra = info["advbench"]
    assert extra["seed"] == 0 and extra["versions"]["torch"] and extra["attack_forward_passes"] > 0
    assert [a["label"] for a in extra["attacks"]] == ["fgsm", "pgd-20"]
    assert extra["attacks"][1]["settings"]["steps"] == 20


@needs_chromium
def test_report_html_sorts_in_chromium(quick_run, tmp_path):
    results, run_id, run_dir = quick_run
    r = run("report", run_id, "--results-dir", results, "--n-images", "2")
    assert r.exit_code == 0, r.stderr
    with Chromium.start(tmp_path / "profile") as browser:
        browser.open((run_dir / "report.html").as_uri())
        assert {u.split(":", 1)[0] for u in browser.requests} == {"file", "data"}
        drawn = browser.evaluate("Array.from(document.images, i => i.complete && i.naturalWidth > 0)")
        assert len(drawn) >= 2 and all(drawn)  # the robustness curve, the examples (and the training curves)
        assert browser.column("Robust accuracy", "threat") == ["linf 0.05", "linf 0.1"]
        browser.click_header("Robust accuracy", "worst case")
        worst = [float(c.rstrip("%")) for c in browser.column("Robust accuracy", "worst case")]
        assert worst == sorted(worst)
        browser.click_header("Robust accuracy", "threat")
        assert browser.column("Robust accuracy", "threat") == ["linf 0.05", "linf 0.1"]
        browser.click_header("Robust accuracy", "threat")
        assert browser.column("Robust accuracy", "threat") == ["linf 0.1", "linf 0.05"]
        assert browser.errors == []
        assert browser.screenshot_for_people(tmp_path, "report.png").read_bytes()[:8] == PNG


def test_report_errors(tmp_path):
    r = run("report", "nope", "--results-dir", tmp_path)
    assert r.exit_code == 2 and r.stderr.startswith("error: run 'nope' not found")


def test_masked_model_warns_in_terminal_summary_and_leaderboard(tmp_path, trained_smallcnn_path, monkeypatch):
    from robustbench_lite import runs
    from test_masking import Quantised

    orig = runs.load_model

    def masked(*a, **k):
        model, info = orig(*a, **k)
        return Quantised(model).eval(), info

    monkeypatch.setattr(runs, "load_model", masked)
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


def test_autoattack_acc_only_for_the_standard_cascade_or_the_reference():
    from robustbench_lite.report import autoattack_like, robustbench_info
    from robustbench_lite.threat import ThreatModel

    def config(specs, mode):
        return {"mode": mode, "attacks": [{"label": s.label, "name": s.name,
                                           "resolved": s.build(ThreatModel("linf", 0.3)).config()} for s in specs]}

    std = suite_attack_specs("standard")
    summary = {"clean_acc": 0.9, "threats": [{"norm": "linf", "eps": 0.3, "worst_case": {"robust_acc": 0.5},
                                              "attacks": {s.label: {"robust_acc": 0.5} for s in std}}]}
    cascade = config(std, "cascade")
    info = robustbench_info(cascade, summary)
    assert autoattack_like(cascade) and info["autoattack_acc"] == info["worst_case_acc"] == "50.00"
    assert ATTACK_SUITES["standard"].description in info["footnote"] and "upper bound" not in info["footnote"]
    per_attack = config(std, "per-attack")  # the same worst case, but not run as AutoAttack runs it
    info = robustbench_info(per_attack, summary)
    assert not autoattack_like(per_attack) and "autoattack_acc" not in info
    assert "each attack run on every clean-correct sample" in info["footnote"]
    for i in range(len(std)):  # a standard attack missing, or with fewer iterations: not AutoAttack
        assert not autoattack_like(config(std[:i] + std[i + 1:], "cascade"))
        weaker = [AttackSpec(s.name, dict(s.params, steps=5), s.label) if j == i else s for j, s in enumerate(std)]
        assert not autoattack_like(config(weaker, "cascade"))
    assert not autoattack_like(config([AttackSpec("pgd", {"steps": 1000}, "pgd")], "cascade"))
    reference = config(suite_attack_specs("autoattack"), "per-attack")
    assert autoattack_like(reference) and "autoattack_acc" in robustbench_info(reference, summary)


@pytest.fixture
def report_world(quick_run, tmp_path):
    """A private copy of the quick run's results folder (hard links would share the run files)."""
    import shutil

    results, run_id, _ = quick_run
    dest = tmp_path / "results"
    shutil.copytree(results, dest)
    return dest, run_id, dest / "runs" / run_id


def test_report_with_an_ambiguous_prefix_lists_the_runs(report_world):
    results, run_id, run_dir = report_world
    twin = run_dir.parent / (run_id[:-1] + ("0" if run_id[-1] != "0" else "1"))
    twin.mkdir()
    r = run("report", run_id[:15], "--results-dir", results)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: run prefix '{run_id[:15]}' is ambiguous: it matches 2 runs in ")
    assert run_id in r.stderr and twin.name in r.stderr


def test_report_with_outcomes_missing_is_one_line(report_world):
    results, run_id, run_dir = report_world
    (run_dir / "outcomes.csv").unlink()
    before = sorted(p.name for p in run_dir.iterdir())
    r = run("report", run_id, "--results-dir", results)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: run {run_dir} is incomplete: {run_dir / 'outcomes.csv'} ")
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_report_that_cannot_be_written_is_one_line(report_world):
    """A destination that is a directory stops even root (who ignores permission bits): refused before
    any file is written."""
    results, run_id, run_dir = report_world
    (run_dir / "report.md").unlink(missing_ok=True)
    (run_dir / "report.md").mkdir()
    before = sorted(p.name for p in run_dir.iterdir())
    r = run("report", run_id, "--results-dir", results)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: cannot write the report: {run_dir / 'report.md'} is a directory")
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_report_write_failure_is_one_line(report_world, monkeypatch):
    """An OSError while writing (a full disk, a read-only mount) becomes one line naming the file."""
    from robustbench_lite import report

    results, run_id, run_dir = report_world

    def full(summary, out):
        raise OSError(28, "No space left on device", str(out))

    monkeypatch.setattr(report, "plot_robustness_curve", full)
    r = run("report", run_id, "--results-dir", results)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr == f"error: cannot write the report: {run_dir / 'robustness_curve.png'}: No space left on device\n"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: permission bits are not enforced (see the directory case above)")
def test_report_in_a_read_only_run_folder_is_one_line(report_world):
    results, run_id, run_dir = report_world
    os.chmod(run_dir, 0o555)
    try:
        r = run("report", run_id, "--results-dir", results)
    finally:
        os.chmod(run_dir, 0o755)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


def test_atypical_budget_warns_on_stderr_and_flags_the_run(tmp_path, trained_smallcnn_path):
    """Issue 12 item 15: 8/255 on MNIST digits is a colour-image budget: one warning line on stderr
    and an atypical-eps flag; the first line says which dataset is used and why."""
    results = tmp_path / "results"
    r = run("attack", "--checkpoint", trained_smallcnn_path, "--eps", "8/255", "--attack", "fgsm", "-n", "16",
            "--device", "cpu", "--results-dir", results)
    assert r.exit_code == 0, r.stderr
    assert r.stderr == ("warning: linf eps=8/255 is small for mnist-5k (grey-scale 1x28x28 images): typical linf "
                        "budgets are 0.1-0.4 (0.3 for MNIST, Madry et al.)\n")
    first = r.stdout.splitlines()[0]
    assert first.startswith("attacking smallcnn (") and "on 16 mnist-5k test images (the checkpoint's dataset" in first
    with open(results / "leaderboard.csv") as f:
        assert all("atypical-eps" in row["flags"].split(";") for row in csv.DictReader(f))
    r = run("attack", "--checkpoint", trained_smallcnn_path, "--eps", "0.3", "--attack", "fgsm", "-n", "16",
            "--device", "cpu", "--results-dir", results, "--dataset", "mnist-5k")
    assert r.exit_code == 0 and r.stderr == "" and "test images (given with --dataset)" in r.stdout
