"""`advbench attack` and `advbench leaderboard` through typer's CliRunner: JSON output, tables, eps
sweeps, the zoo baseline, run folders, and the error policy (one `error: ...` line, exit 2)."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from robustbench_lite import zoo
from robustbench_lite.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def results(tmp_path):
    return tmp_path / "results"


def attack(ckpt, results, *extra):
    return run("attack", "--checkpoint", ckpt, "--results-dir", results, "--device", "cpu", *extra)


def test_attack_json_summary_run_folder_and_leaderboard(trained_smallcnn_path, results):
    r = attack(trained_smallcnn_path, results, "--eps", "0.3", "--n-examples", "100", "--steps", "5", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)  # nothing but JSON on stdout
    assert out["model"] == "smallcnn" and out["dataset"] == "mnist-5k" and out["n_examples"] == 100
    assert out["defense"] == "standard" and out["activation"] == "relu" and len(out["checkpoint_sha256"]) == 64
    assert out["clean_acc"] > 0.9
    (t,) = out["threats"]
    assert t["norm"] == "linf" and t["eps"] == 0.3 and list(t["attacks"]) == ["fgsm", "bim", "pgd"]
    assert t["attacks"]["pgd"]["robust_acc"] <= 0.05  # a standard MNIST model has no robustness at 0.3
    assert t["attacks"]["pgd"]["config"]["steps"] == 5 and t["attacks"]["fgsm"]["config"]["steps"] == 1
    assert t["worst_case"]["robust_acc"] <= min(a["robust_acc"] for a in t["attacks"].values())
    run_dir = Path(out["run_dir"])
    assert run_dir.parent == results / "runs" and run_dir.name == out["run_id"]
    assert json.loads((run_dir / "summary.json").read_text())["run_id"] == out["run_id"]
    with open(run_dir / "outcomes.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100 and {"sample_id", "label", "clean_pred", "pgd_pred", "pgd_fooled"} <= set(rows[0])
    with open(results / "leaderboard.csv") as f:
        lrows = list(csv.DictReader(f))
    assert [x["attack"] for x in lrows] == ["fgsm", "bim", "pgd", "worst-case"]
    assert all(x["run_id"] == out["run_id"] and x["seed"] == "0" and x["device"] == "cpu" for x in lrows)

    # `advbench leaderboard` in its three formats, and its filters
    r = run("leaderboard", "--results-dir", results)
    assert r.exit_code == 0 and "## mnist-5k · linf eps=0.3" in r.stdout and "| smallcnn | standard |" in r.stdout
    r = run("leaderboard", "--results-dir", results, "--format", "json", "--eps", "3/10")
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == 4
    r = run("leaderboard", "--results-dir", results, "--format", "csv", "--norm", "linf")
    assert r.exit_code == 0 and r.stdout.startswith("run_id,timestamp,model,")
    r = run("leaderboard", "--results-dir", results, "--norm", "l2")
    assert r.exit_code == 0 and r.stdout == "" and "no results yet matching these filters" in r.stderr


def test_attack_table_and_eps_sweep(trained_smallcnn_path, results):
    r = attack(trained_smallcnn_path, results, "--eps", "0.05,0.2", "--attack", "fgsm,pgd", "--steps", "3",
               "--n-examples", "60", "--batch-size", "32")
    assert r.exit_code == 0, r.stderr
    assert "smallcnn on mnist-5k · linf eps=0.05 · n=60" in r.stdout
    assert "robust accuracy: attack x eps" in r.stdout
    for word in ("clean", "fgsm", "pgd", "worst case", "seconds", "img/s"):
        assert word in r.stdout
    assert len(list((results / "runs").iterdir())) == 1
    with open(results / "leaderboard.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 3


def test_attack_l2_with_options(trained_smallcnn_path, results):
    r = attack(trained_smallcnn_path, results, "--eps", "1.5", "--norm", "l2", "--attack", "pgd", "--steps", "3",
               "--restarts", "2", "--loss", "margin", "--alpha", "0.5", "--n-examples", "30", "--json")
    assert r.exit_code == 0, r.stderr
    cfg = json.loads(r.stdout)["threats"][0]["attacks"]["pgd"]["config"]
    assert (cfg["norm"], cfg["eps"], cfg["steps"], cfg["restarts"], cfg["loss"], cfg["alpha"]) == \
        ("l2", 1.5, 3, 2, "margin", 0.5)


def test_attack_without_checkpoint_trains_the_zoo_baseline_first(results, monkeypatch):
    orig = zoo.baseline_config  # a seconds-long baseline: 1 epoch on 500 training images
    monkeypatch.setattr(zoo, "baseline_config", lambda *a, **k: replace(orig(*a, **k), epochs=1, n_train=500))
    args = ("attack", "--model", "lenet", "--eps", "0.1", "--attack", "fgsm", "--n-examples", "50",
            "--results-dir", results, "--device", "cpu")
    r = run(*args)
    assert r.exit_code == 0, r.stderr
    # the first line says what the baseline is trained and evaluated on, and why (before minutes of training)
    assert r.stdout.splitlines()[0] == ("dataset mnist-5k (the default: no --dataset given and no checkpoint naming "
                                        "one; see `advbench attack --help`)")
    assert "no zoo checkpoint" in r.stdout
    assert "training a standard lenet baseline on mnist-5k first (1 epochs)" in r.stdout
    assert zoo.zoo_path("lenet", "mnist-5k").is_file() and not (results / "models").exists()
    r = run(*args)  # the second time the cached baseline is used
    assert r.exit_code == 0 and "training" not in r.stdout
    with open(results / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {x["flags"] for x in rows} == {"zoo"} and len({x["run_id"] for x in rows}) == 2


def test_zoo_entry_is_used_when_present(zoo_smallcnn, results):
    r = run("attack", "--model", "smallcnn", "--eps", "8/255", "--attack", "fgsm", "--n-examples", "20",
            "--results-dir", results, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["checkpoint"] == str(zoo_smallcnn) and out["threats"][0]["eps_label"] == "8/255"


# -- errors: one line on stderr, exit code 2 ----------------------------------------------------------
def test_error_messages(tmp_path, results, trained_smallcnn_path):
    def fails(*args):
        r = run(*args)
        assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stdout == ""
        return r.stderr

    assert fails("attack", "--model", "smallcnn", "--eps", "abc", "--results-dir", results) == (
        "error: invalid eps 'abc': expected a non-negative number or fraction such as 8/255, 0.03 or .5\n")
    assert fails("attack", "--model", "smallcnn", "--eps", "2", "--results-dir", results) == (
        "error: invalid eps '2' for linf: images are in [0, 1], so eps must be <= 1\n")
    missing = tmp_path / "missing.pt"
    assert fails("attack", "--checkpoint", missing, "--eps", "0.1", "--results-dir", results) == (
        f"error: checkpoint not found: {missing}\n")
    assert fails("attack", "--model", "smallcnn", "--eps", "0.1", "--attack", "fgsm", "--steps", "5",
                 "--results-dir", results) == (
        "error: --steps applies to iterative (bim, pgd) attacks only, and none of fgsm is one\n")
    assert fails("attack", "--model", "smallcnn", "--eps", "0.1", "--attack", "square,fab-t", "--alpha", "0.01",
                 "--results-dir", results) == (
        "error: --alpha applies to step-size (bim, pgd, apgd) attacks only, and none of square, fab-t is one\n")
    assert fails("attack", "--model", "smallcnn", "--eps", "0.1", "--attack", "square", "--loss", "ce",
                 "--results-dir", results) == (
        "error: --loss applies to loss-driven (fgsm, bim, pgd, apgd) attacks only, and none of square is one\n")
    assert fails("attack", "--model", "smallcnn", "--eps", "0.1", "--attack", "fgsm,pgx",
                 "--results-dir", results).startswith("error: unknown attack 'pgx'; did you mean 'pgd'?")
    assert fails("attack", "--model", "smallcnn", "--eps", "0.1", "--norm", "l3", "--results-dir", results) == (
        "error: invalid norm 'l3': expected one of linf, l2\n")
    assert fails("attack", "--eps", "0.1", "--results-dir", results) == (
        "error: give --model (the zoo baseline is used) or --checkpoint\n")
    assert fails("attack", "--model", "smallcnn", "--results-dir", results).startswith(
        "error: Missing option '--eps'")
    assert fails("attack", "--checkpoint", trained_smallcnn_path, "--eps", "0.1", "--n-examples", "5000",
                 "--results-dir", results) == (
        "error: --n-examples 5000 is larger than the test split of mnist-5k (1000 examples)\n")
    assert fails("attack", "--checkpoint", trained_smallcnn_path, "--model", "lenet", "--eps", "0.1",
                 "--results-dir", results) == (
        f"error: checkpoint {trained_smallcnn_path} holds model 'smallcnn', not 'lenet'\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert fails("attack", "--checkpoint", trained_smallcnn_path, "--eps", "0.1", "--results-dir",
                 blocker / "results").startswith(f"error: cannot create directory {blocker / 'results'}")
    assert not (results / "runs").exists()  # nothing was recorded by any failure


def test_nan_model_is_an_error(tmp_path, mnist5k, results):
    from robustbench_lite.checkpoint import build_checkpoint, save_checkpoint
    from robustbench_lite.models import model_for_dataset

    model = model_for_dataset("lenet", mnist5k)
    with torch.no_grad():
        model.body[-1].bias.fill_(float("nan"))
    path = tmp_path / "nan.pt"
    save_checkpoint(path, build_checkpoint(model, dataset="mnist-5k"))
    r = run("attack", "--checkpoint", path, "--eps", "0.1", "--n-examples", "10", "--results-dir", results,
            "--device", "cpu")
    assert r.exit_code == 2
    assert r.stderr == ("error: model outputs NaN on 10 of 10 clean inputs; the checkpoint is broken or diverged, "
                        "nothing was recorded\n")
    assert not (results / "leaderboard.csv").exists()


def test_leaderboard_empty_and_corrupt(results):
    r = run("leaderboard", "--results-dir", results)
    assert r.exit_code == 0 and r.stdout == ""
    assert r.stderr == f"no results yet in {results / 'leaderboard.csv'} (run `advbench attack` first)\n"
    r = run("leaderboard", "--results-dir", results, "--format", "json")
    assert r.exit_code == 0 and json.loads(r.stdout) == []
    results.mkdir()
    (results / "leaderboard.csv").write_text("run_id,model\nx,y\n")
    r = run("leaderboard", "--results-dir", results)
    assert r.exit_code == 2
    assert r.stderr == (f"error: {results / 'leaderboard.csv'} is corrupt: missing columns dataset, norm, eps, "
                        f"attack, clean_acc, robust_acc\n")
    r = run("leaderboard", "--results-dir", results, "--format", "xml")
    assert r.exit_code == 2 and r.stderr == "error: invalid --format 'xml': expected md, csv, json or html\n"
