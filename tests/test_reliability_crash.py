"""Reliability (issue 7) under concurrency and crashes, with real processes and SIGKILL.

* 8 processes append to one leaderboard at the same time (20 runs each, synthetic rows, through
  robustbench_lite.leaderboard.append): every row of all 160 runs is there, the CSV parses, and
  leaderboard.md is exactly what the CSV renders to.
* `train-robust` killed with SIGKILL after its first epoch's checkpoint, then `--resume`d, ends
  with bit-identical weights (and best checkpoint, and metrics) to an uninterrupted run.
* `attack` killed with SIGKILL at random-ish moments (and right when it starts writing) never
  leaves a partial row or a truncated file: the leaderboard parses with the old rows or the old
  rows plus one complete run, the markdown is a complete rendering, the checkpoint still loads.
* A zoo baseline whose training was interrupted is resumed, not silently used half-trained.

Every process runs single-threaded (OMP_NUM_THREADS=1) so that weights compare bit for bit.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from robustbench_lite import leaderboard as lb
from robustbench_lite import zoo
from robustbench_lite.checkpoint import model_from_checkpoint, read_checkpoint
from robustbench_lite.cli import app
from robustbench_lite.errors import AdvbenchError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "robustbench_lite"]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


# --- 8 writers at once ---------------------------------------------------------------------------------------
WRITER = r"""
import json, os, sys, time
from robustbench_lite import leaderboard as lb

results, k, go, per = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
open(go + f".ready{k}", "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
t0 = time.time()
for j in range(per):
    run = f"w{k}-r{j:02d}"
    base = {c: "" for c in lb.COLUMNS}
    base.update(run_id=run, timestamp=f"2026-01-01T00:{k:02d}:{j:02d}", model=f"model{k}", dataset="mnist-5k",
                n_examples="100", norm="linf", eps=repr([0.1, 0.3][j % 2]), clean_acc="0.99", seed=str(k),
                device="cpu", defense="standard", activation="relu", version="test", flags=f"writer={k}")
    rows = [dict(base, attack=a, robust_acc=repr(round((k * 100 + j + i) / 10000, 6)))
            for i, a in enumerate(["fgsm", "pgd", "worst-case"])]
    lb.append(results, rows)
print(json.dumps([t0, time.time()]))
"""


def expected_robust(k: int, j: int, i: int) -> float:
    return round((k * 100 + j + i) / 10000, 6)


def test_eight_processes_appending_at_once_lose_no_row(tmp_path):
    writers, per = 8, 20
    results, sync = tmp_path / "results", tmp_path / "sync"
    results.mkdir()
    sync.mkdir()
    go = sync / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(results), str(k), str(go), str(per)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(writers)]
    try:
        deadline = time.time() + 120
        while len(list(sync.glob("go.ready*"))) < writers:  # every writer has imported pandas & co
            assert time.time() < deadline, "writers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
            time.sleep(0.01)
        go.touch()  # ... and now they all start appending at once
        spans = []
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            spans.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            kill(p)
    assert max(t0 for t0, _ in spans) < min(t1 for _, t1 in spans), "the writers did not overlap"

    df = lb.read(results)  # parses (and passes the corruption checks)
    with open(results / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(df) == writers * per * 3
    by_run = {}
    for r in rows:
        by_run.setdefault(r["run_id"], []).append(r)
    assert set(by_run) == {f"w{k}-r{j:02d}" for k in range(writers) for j in range(per)}
    for run, rs in by_run.items():
        k, j = int(run[1:run.index("-")]), int(run[-2:])
        assert [r["attack"] for r in rs] == ["fgsm", "pgd", "worst-case"], run  # a run's rows stay together
        assert [float(r["robust_acc"]) for r in rs] == [expected_robust(k, j, i) for i in range(3)]
        assert all(r["model"] == f"model{k}" and r["flags"] == f"writer={k}" for r in rs)
    # each writer's runs are in its own order (appends are serialised, none lost or reordered)
    order = list(dict.fromkeys(r["run_id"] for r in rows))
    for k in range(writers):
        mine = [run for run in order if run.startswith(f"w{k}-")]
        assert mine == sorted(mine)
    assert (results / "leaderboard.md").read_text() == lb.render_markdown(lb.read(results))
    assert not [p.name for p in results.iterdir() if p.name.endswith(".tmp")]


# --- SIGKILL during train-robust, then --resume ----------------------------------------------------------
TRAIN_ROBUST = CLI + ["train-robust", "--model", "lenet", "--method", "pgd-at", "--n-train", "300", "--epochs", "3",
                      "--steps", "5", "--val-size", "100", "--val-steps", "3", "--batch-size", "50", "--no-eval",
                      "--device", "cpu", "--seed", "1"]


def _epoch(path: Path) -> int:
    try:
        return int(read_checkpoint(path)["epoch"]) if path.is_file() else 0
    except AdvbenchError:
        return 0


def test_sigkill_during_train_robust_then_resume_gives_the_same_weights(tmp_path):
    straight_out, crashed_out = tmp_path / "straight" / "m.pt", tmp_path / "crashed" / "m.pt"
    straight = subprocess.Popen(TRAIN_ROBUST + ["--out", str(straight_out), "--results-dir", str(tmp_path / "r1")],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    crashed = subprocess.Popen(TRAIN_ROBUST + ["--out", str(crashed_out), "--results-dir", str(tmp_path / "r2")],
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        # the first epoch's checkpoint (and its best.pt, written just before it: see the test below
        # for a kill in between) is on disk: kill it in the second epoch
        while _epoch(crashed_out) < 1 or not crashed_out.with_suffix(".best.pt").is_file():
            assert crashed.poll() is None, crashed.communicate()[1]
            assert time.time() < deadline
            time.sleep(0.005)
        crashed.send_signal(signal.SIGKILL)
        crashed.wait(timeout=60)
        assert crashed.returncode == -signal.SIGKILL
        killed_at = read_checkpoint(crashed_out)["epoch"]
        assert killed_at in (1, 2), "training finished before the kill: nothing was interrupted"

        resumed = subprocess.run(TRAIN_ROBUST + ["--out", str(crashed_out), "--results-dir", str(tmp_path / "r2"),
                                                 "--resume"], env=ENV, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming {crashed_out} from epoch {killed_at + 1} of 3" in resumed.stdout
        _, err = straight.communicate(timeout=300)
        assert straight.returncode == 0, err
    finally:
        kill(straight)
        kill(crashed)

    a, b = read_checkpoint(crashed_out), read_checkpoint(straight_out)
    assert a["epoch"] == b["epoch"] == 3
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert all(torch.equal(x, y) for i in a["optimizer"]["state"] for x, y in
               zip(a["optimizer"]["state"][i].values(), b["optimizer"]["state"][i].values()) if torch.is_tensor(x))

    def metrics(out):
        with open(out.with_suffix(".metrics.csv"), newline="") as f:
            return [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in csv.DictReader(f)]

    assert metrics(crashed_out) == metrics(straight_out) and len(metrics(straight_out)) == 3


# --- SIGKILL during attack --------------------------------------------------------------------------------
def _rows(results: Path):
    with open(results / "leaderboard.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_sigkill_during_attack_leaves_leaderboard_and_checkpoints_intact(tmp_path, zoo_smallcnn, mnist5k):
    results = tmp_path / "results"
    ckpt = zoo_smallcnn
    env = {**ENV, "ADVBENCH_HOME": os.environ["ADVBENCH_HOME"]}  # this test's zoo (ENV was copied at import)
    ckpt_sha = sha(ckpt)
    cmd = CLI + ["attack", "--model", "smallcnn", "--eps", "0.2", "--attack", "fgsm,pgd", "--steps", "5", "-n", "60",
                 "--results-dir", str(results), "--device", "cpu"]
    t0 = time.time()
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # a prior leaderboard
    duration = time.time() - t0
    assert first.returncode == 0, first.stderr
    rows_per_run = len(_rows(results))
    assert rows_per_run == 3  # fgsm, pgd, worst-case

    rnd = random.Random(20261127)
    triggers = [("after", rnd.uniform(0.3, 0.97) * duration) for _ in range(3)]
    triggers += [("run-folder", None), ("csv-temp-file", None)]
    interrupted = 0
    before_rows = _rows(results)
    before_md = (results / "leaderboard.md").read_text()
    for kind, delay in triggers:
        runs_before = set(os.listdir(results / "runs"))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            start = time.time()
            while proc.poll() is None and time.time() - start < 300:
                if kind == "after" and time.time() - start >= delay:
                    break
                if kind == "run-folder" and set(os.listdir(results / "runs")) - runs_before:
                    break  # it has started writing its run folder and, next, the leaderboard
                if kind == "csv-temp-file" and any(n.startswith(".leaderboard.csv.") for n in os.listdir(results)):
                    break  # it is writing the new leaderboard.csv
                time.sleep(0.0005 if kind != "after" else 0.005)
            interrupted += proc.poll() is None
        finally:
            kill(proc)

        # the leaderboard: it parses, the old rows are untouched, and at most one whole run was added
        df = lb.read(results)
        rows = _rows(results)
        assert len(df) == len(rows)
        assert rows[:len(before_rows)] == before_rows, (kind, delay)
        new = rows[len(before_rows):]
        assert len(new) in (0, rows_per_run), (kind, delay, new)
        if new:
            assert len({r["run_id"] for r in new}) == 1 and new[0]["run_id"] not in {r["run_id"] for r in before_rows}
            assert [r["attack"] for r in new] == ["fgsm", "pgd", "worst-case"]
            assert all(r[c] != "" for r in new for c in lb.REQUIRED)
        md = (results / "leaderboard.md").read_text()
        assert md in (lb.render_markdown(df), before_md), "leaderboard.md is not a complete rendering"
        # every run the leaderboard knows has its complete run folder
        for run_id in {r["run_id"] for r in rows}:
            assert {p.name for p in (results / "runs" / run_id).iterdir()} >= {"config.yaml", "summary.json",
                                                                              "outcomes.csv"}
        # the checkpoint: the same bytes, and it loads
        assert sha(ckpt) == ckpt_sha
        model_from_checkpoint(ckpt, "smallcnn", mnist5k)
        before_rows, before_md = rows, md  # (a kill between the CSV and the markdown leaves the older rendering)
    assert interrupted >= 3, f"only {interrupted} of {len(triggers)} runs were still going when killed"

    # and the next run appends as usual
    last = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert last.returncode == 0, last.stderr
    assert len(_rows(results)) == len(before_rows) + rows_per_run
    assert (results / "leaderboard.md").read_text() == lb.render_markdown(lb.read(results))


# --- an interrupted zoo baseline ------------------------------------------------------------------------
def test_interrupted_zoo_baseline_is_resumed_not_used_half_trained(tmp_path, mnist5k, monkeypatch):
    """`advbench attack --model M` trains M's zoo baseline when it is missing; a kill during that
    training leaves a checkpoint of the last finished epoch. The next attack finishes the training
    (same weights as an uninterrupted one) instead of benchmarking a half-trained model."""
    from robustbench_lite.runtime import SILENT
    from robustbench_lite.training import train

    orig = zoo.baseline_config
    monkeypatch.setattr(zoo, "baseline_config", lambda *a, **k: replace(orig(*a, **k), epochs=2, n_train=300))
    results = tmp_path / "results"
    path = zoo.zoo_path("lenet", "mnist-5k", "standard")
    cfg = zoo.baseline_config("lenet", "mnist-5k", path, seed=0, device="cpu")

    def killed_after_epoch_1(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt  # the state a SIGKILL after epoch 1's checkpoint leaves on disk

    with pytest.raises(KeyboardInterrupt):
        train(cfg, dataset=mnist5k, narrator=SILENT, on_epoch_end=killed_after_epoch_1)
    assert read_checkpoint(path)["epoch"] == 1

    r = CliRunner().invoke(app, ["attack", "--model", "lenet", "--eps", "0.1", "--attack", "fgsm", "-n", "20",
                                 "--results-dir", str(results), "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    assert f"zoo checkpoint {path} is from an interrupted training (epoch 1 of 2): resuming it first" in r.stdout
    resumed = read_checkpoint(path)
    assert resumed["epoch"] == 2
    straight = train(replace(cfg, out=str(tmp_path / "straight.pt")), dataset=mnist5k, narrator=SILENT)
    ref = read_checkpoint(straight.out)["state_dict"]
    assert all(torch.equal(resumed["state_dict"][k], ref[k]) for k in ref)
    # a finished baseline is used as it is
    before = (sha(path), path.stat().st_mtime_ns)
    r = CliRunner().invoke(app, ["attack", "--model", "lenet", "--eps", "0.1", "--attack", "fgsm", "-n", "20",
                                 "--results-dir", str(results), "--device", "cpu"])
    assert r.exit_code == 0 and "interrupted training" not in r.stdout and "training a standard" not in r.stdout
    assert (sha(path), path.stat().st_mtime_ns) == before


# --- kills at the edges of training: between the two checkpoint writes, during the final evaluation -------------------
def _tiny_robust_run(out, resume=False):
    from defenses import methods
    from robustbench_lite.threat import ThreatModel
    from robustbench_lite.runtime import SILENT
    from robustbench_lite.training import RobustValidation, TrainConfig, train

    threat = ThreatModel("linf", 0.3)
    cfg = TrainConfig(model="lenet", epochs=3, n_train=200, batch_size=50, optimizer="adam", lr=0.003,
                      weight_decay=0.0, out=str(out), device="cpu", seed=3, val_size=100, resume=resume)
    return train(cfg, methods.create("pgd-at", threat=threat, seed=3, steps=2), narrator=SILENT,
                 robust_val=RobustValidation(threat, steps=2))


def test_kill_between_the_last_checkpoint_and_best_pt_is_recovered_by_resume(tmp_path, monkeypatch):
    import robustbench_lite.training as training

    straight = _tiny_robust_run(tmp_path / "s.pt")
    real_save = training.save_checkpoint

    def killed_before_best(path, ck):
        if str(path).endswith(".best.pt"):
            raise KeyboardInterrupt  # the process dies right after the last checkpoint's rename
        real_save(path, ck)

    monkeypatch.setattr(training, "save_checkpoint", killed_before_best)
    with pytest.raises(KeyboardInterrupt):
        _tiny_robust_run(tmp_path / "k.pt")
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    _tiny_robust_run(tmp_path / "k.pt", resume=True)
    best_k, best_s = tmp_path / "k.best.pt", straight.best_out
    assert best_k.is_file(), "after --resume there is no best.pt"
    a, b = read_checkpoint(best_k), read_checkpoint(best_s)
    assert a["extra"]["best_epoch"] == b["extra"]["best_epoch"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])


def test_kill_during_the_final_evaluation_is_recovered_by_resume(tmp_path, monkeypatch):
    import robustbench_lite.runs as runs

    results = tmp_path / "results"
    args = ["train-robust", "--model", "lenet", "--epochs", "1", "--n-train", "200", "--val-size", "100",
            "--val-steps", "2", "--steps", "2", "--device", "cpu", "--n-eval", "50", "--eval-steps", "2",
            "--results-dir", str(results)]
    real_eval = runs.evaluate_and_record

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "evaluate_and_record", killed)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 130 and not (results / "leaderboard.csv").exists()
    monkeypatch.setattr(runs, "evaluate_and_record", real_eval)
    r = CliRunner().invoke(app, args + ["--resume"])
    assert r.exit_code == 0, r.stderr
    assert (results / "leaderboard.csv").exists(), "the final evaluation was never recorded"
