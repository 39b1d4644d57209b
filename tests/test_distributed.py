"""DDP on CPU: 2 gloo processes started by torchrun give the single-process numbers."""
import json
import os
import subprocess
import sys

import pytest


def _torchrun(args, cwd, nproc=2, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "robustbench_lite", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _single(args, cwd):
    return subprocess.run([sys.executable, "-m", "robustbench_lite", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _strip(summary):
    """Numbers that must match exactly (timings and run ids may differ)."""
    out = {"clean_acc": summary["clean_acc"], "n_examples": summary["n_examples"]}
    for t in summary["threats"]:
        for label, a in t["attacks"].items():
            out[(t["eps"], label)] = (a["robust_acc"], a["n_fooled"], a["mean_norm"], a["max_norm"])
        out[(t["eps"], "worst")] = t["worst_case"]["robust_acc"] if isinstance(t.get("worst_case"), dict) \
            else t.get("worst_case_acc")
    return out


def test_ddp_attack_equals_single_process(tmp_path, zoo_smallcnn):
    args = ["attack", "--model", "smallcnn", "--eps", "0.1,0.2", "--n-examples", "120", "--attack", "fgsm,pgd",
            "--restarts", "2", "--results-dir", "res", "--device", "cpu", "--json", "--batch-size", "50"]
    single = _single(args, tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = _torchrun(args, tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = json.loads(single.stdout), json.loads(ddp.stdout)
    assert _strip(a) == _strip(b)
    assert b["n_examples"] == 120
    rows = (tmp_path / "res" / "leaderboard.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * (2 * 3)  # header + 2 runs x 2 eps x (2 attacks + worst case): rank 1 wrote none
    assert "ddp=2" in rows[-1]


def test_ddp_cascade_equals_single_process(tmp_path, zoo_smallcnn):
    """Each rank cascades over its shard: the survivors of attack k are the same samples as in one
    process, since outcomes are per sample; the merged outcomes say which attacks ran on which sample."""
    args = ["attack", "--model", "smallcnn", "--eps", "0.1,0.2", "--n-examples", "120", "--attack", "fgsm,bim,pgd",
            "--steps", "3", "--cascade", "--results-dir", "res", "--device", "cpu", "--json", "--batch-size", "25",
            "--no-masking-checks"]
    single = _single(args, tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = _torchrun(args, tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = json.loads(single.stdout), json.loads(ddp.stdout)
    assert a["mode"] == b["mode"] == "cascade" and _strip(a) == _strip(b)
    for ta, tb in zip(a["threats"], b["threats"]):
        assert [x["n_attacked"] for x in ta["attacks"].values()] == [x["n_attacked"] for x in tb["attacks"].values()]
    assert a["threats"][0]["attacks"]["pgd"]["n_attacked"] < a["threats"][0]["attacks"]["fgsm"]["n_attacked"]
    outcomes = [(tmp_path / "res" / "runs" / s["run_id"] / "outcomes.csv").read_text() for s in (a, b)]
    assert outcomes[0] == outcomes[1]


def _metrics(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


# What DDP training promises (README, "Data parallel"): every optimisation step takes the gradient
# of the same global batch as one process, so the two runs agree to float summation order *per
# step*. Over many steps they need not stay that close: PGD's sign step turns a ~1e-7 difference
# in an input gradient component near 0 into a different adversarial pixel (and Adam's first
# update lr * g / |g| does the same to a near-zero weight gradient), so adversarial training
# trajectories drift apart like any chaotic system. Measured on this project's machine with the
# multi-epoch run below (seeds 0-3): losses within 0.18%, accuracies within 1 validation image of
# 100 and 2 test images of 1000, weights up to 0.034 apart after 16 Adam steps (one seed failed
# the old 1e-4 loss tolerance on a fresh clone). So:
#   - a few SGD steps (the first one included) must agree to float precision (measured 1.5e-8);
#   - a multi-epoch adversarial run must agree within tolerances a few times the measured drift,
#     which still catches a wrong loss weighting or sharding (those change the first step).
STEP_TOL = dict(rel=1e-5, acc=0.0, weights=1e-6)
DRIFT_TOL = dict(rel=0.02, acc=0.03, weights=None)


def _same_training(single_dir, ddp_dir, tol, name="m"):
    """Per-epoch metrics of the two runs agree within ``tol``: losses and other numbers to ``rel``
    (relative, at least absolute for numbers below 1), accuracies to ``acc`` (absolute), weights
    to ``weights`` (absolute; None: not compared)."""
    import torch

    a, b = _metrics(single_dir / f"{name}.metrics.csv"), _metrics(ddp_dir / f"{name}.metrics.csv")
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for k in ra:
            if k in ("seconds", "img_per_s"):
                continue
            x, y = float(ra[k]), float(rb[k])
            limit = tol["acc"] if k.endswith("_acc") else tol["rel"] * max(1.0, abs(x))
            assert abs(x - y) <= limit + 1e-12, (ra["epoch"], k, ra[k], rb[k])
    wa = torch.load(single_dir / f"{name}.pt", weights_only=True)["state_dict"]
    wb = torch.load(ddp_dir / f"{name}.pt", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys()
    if tol["weights"] is not None:
        for k in wa:
            assert torch.allclose(wa[k], wb[k], rtol=0, atol=tol["weights"]), (k, float((wa[k] - wb[k]).abs().max()))


def _train_both_ways(args, tmp_path, tol):
    """Run ``args`` single-process in tmp/one and with 2 gloo processes in tmp/two; check they
    trained alike (within ``tol``); return the torchrun result."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = _single(args, tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _torchrun(args, tmp_path / "two")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    _same_training(tmp_path / "one", tmp_path / "two", tol)
    return ddp


def test_ddp_adversarial_training_steps_equal_single_process(tmp_path):
    """Two PGD-AT steps with SGD: 33 images in batches of 32, so the second global batch holds one
    image and rank 1 joins its all-reduce with weight 0. Weights and metrics equal to float
    precision: the per-step promise (a wrong loss weight or shard would be off by ~lr * grad)."""
    args = ["train-robust", "--n-train", "33", "--epochs", "1", "--val-size", "100", "--batch-size", "32",
            "--device", "cpu", "--out", "m.pt", "--results-dir", "res", "--eps", "0.1", "--steps", "2",
            "--optimizer", "sgd", "--lr", "0.05", "--eps-warmup", "0", "--val-steps", "2", "--no-eval"]
    _train_both_ways(args, tmp_path, STEP_TOL)
    import torch

    w0 = torch.load(tmp_path / "one" / "m.pt", weights_only=True)["state_dict"]
    assert any(float(v.abs().max()) > 0 for v in w0.values())


def test_ddp_train_robust_equals_single_process(tmp_path):
    # 225 training images in batches of 32: the last global batch holds 1 image, so rank 1 gets
    # no share of it (it joins the all-reduce with weight 0)
    args = ["train-robust", "--n-train", "225", "--epochs", "2", "--val-size", "100", "--n-eval", "60",
            "--batch-size", "32", "--device", "cpu", "--out", "m.pt", "--results-dir", "res", "--eps", "0.1",
            "--steps", "2", "--lr", "0.005", "--eval-steps", "5", "--eps-warmup", "1"]
    ddp = _train_both_ways(args, tmp_path, DRIFT_TOL)
    # only rank 0 talks and writes: one line per epoch, one leaderboard row per evaluation
    assert ddp.stdout.count("epoch 1/2") == 1, ddp.stdout
    assert "on 2 x cpu (DDP)" in ddp.stdout
    lb1 = _metrics(tmp_path / "one" / "res" / "leaderboard.csv")
    lb2 = _metrics(tmp_path / "two" / "res" / "leaderboard.csv")
    assert len(lb1) == len(lb2) >= 2
    assert [r["attack"] for r in lb1] == [r["attack"] for r in lb2]
    for r1, r2 in zip(lb1, lb2):  # the evaluation is exact; the weights it sees drift (above)
        assert abs(float(r1["robust_acc"]) - float(r2["robust_acc"])) <= DRIFT_TOL["acc"] + 1e-12, (r1, r2)
    assert not list((tmp_path / "two").glob("**/*.tmp"))


def test_ddp_standard_training_equals_single_process(tmp_path):
    args = ["train", "--n-train", "960", "--epochs", "1", "--batch-size", "48", "--device", "cpu", "--out", "m.pt",
            "--results-dir", "res"]
    _train_both_ways(args, tmp_path, dict(rel=1e-4, acc=0.0, weights=2e-3))  # plain SGD: no sign steps
    acc = float(_metrics(tmp_path / "two" / "m.metrics.csv")[-1]["test_acc"])
    assert acc > 0.7  # a real training run, not a no-op that trivially matches


def test_ddp_attack_trains_a_missing_zoo_baseline_on_all_ranks(tmp_path):
    """No zoo checkpoint: the ranks train the baseline together (rank 0 writes it), then attack."""
    args = ["attack", "--model", "smallcnn", "--eps", "0.2", "--n-examples", "60", "--attack", "fgsm",
            "--results-dir", "res", "--device", "cpu", "--json", "--no-masking-checks"]
    ddp = _torchrun(args, tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    summary = json.loads(ddp.stdout)
    assert summary["n_examples"] == 60 and summary["clean_acc"] > 0.9
    from robustbench_lite.zoo import zoo_path

    assert zoo_path("smallcnn", "mnist-5k").is_file()  # in this test's ADVBENCH_HOME (inherited by torchrun)
    assert not list((tmp_path / "res").glob("**/*.tmp"))
