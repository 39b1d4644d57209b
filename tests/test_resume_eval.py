"""Interrupted evaluations (issue 12, item 14): finished batches are saved in the run folder as they
finish; `attack --resume RUN_ID` and `run SUITE --resume` continue from them and record exactly the
numbers of an uninterrupted run; Ctrl-C / SIGTERM say in one stderr line what was kept.

The kill tests use real processes (SIGKILL / SIGINT / SIGTERM), single-threaded so that numbers
compare exactly."""
from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from robustbench_lite import evaluator
from robustbench_lite.cli import app
from robustbench_lite.evaluator import Journal, evaluate
from robustbench_lite.threat import ThreatModel

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ADVBENCH_PROGRESS_INTERVAL": "1000"}
CLI = [sys.executable, "-m", "robustbench_lite"]
runner = CliRunner()


def attack_args(ckpt, results, *extra):
    return ["attack", "--checkpoint", str(ckpt), "--eps", "0.3", "--attack", "fgsm,pgd", "--steps", "5",
            "--results-dir", str(results), "--device", "cpu", *extra]


def run_folders(results: Path):
    runs = results / "runs"
    return sorted(runs.iterdir()) if runs.is_dir() else []


def saved_batches(results: Path) -> int:
    return sum(len(list((r / "batches").glob("*.pt"))) for r in run_folders(results) if (r / "batches").is_dir())


def leaderboard_rows(results: Path):
    with open(results / "leaderboard.csv", newline="") as f:
        return list(csv.DictReader(f))


TIMING = ("run_id", "timestamp", "seconds", "images_per_s")


def numbers(results: Path):
    """The leaderboard's rows without run ids and timings, and the run's outcomes.csv."""
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in leaderboard_rows(results)]
    (run,) = run_folders(results)
    summary = json.loads((run / "summary.json").read_text())
    accs = [(t["eps"], lab, a["robust_acc"], a["n_fooled"]) for t in summary["threats"]
            for lab, a in t["attacks"].items()] + [t["worst_case"]["robust_acc"] for t in summary["threats"]]
    return rows, accs, (run / "outcomes.csv").read_text()


def start(cmd):
    # SIGINT at its default in the child (a shell may have started the tests with it ignored)
    return subprocess.Popen(CLI + cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_batches(proc, results: Path, at_least: int) -> None:
    deadline = time.time() + 120
    while saved_batches(results) < at_least:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no batch was saved"
        time.sleep(0.002)


# --- evaluate() with a journal --------------------------------------------------------------------------------
class StoppingJournal(Journal):
    """A journal whose process 'dies' (KeyboardInterrupt) right after saving its ``stop``-th batch."""

    def __init__(self, folder, stop):
        super().__init__(folder)
        self.stop = stop

    def record(self, *args):
        super().record(*args)
        if self.count() == self.stop:
            raise KeyboardInterrupt


@pytest.mark.parametrize("stop_after", [1, 5])
def test_evaluate_with_a_journal_resumes_to_the_uninterrupted_result(trained_smallcnn, tmp_path, stop_after):
    model, x, y = trained_smallcnn
    x, y, ids = x[:60], y[:60], torch.arange(100, 160)
    kw = dict(attacks=["fgsm", {"name": "pgd", "steps": 3}], threats=[ThreatModel("linf", 0.1), ThreatModel("linf", 0.3)],
              batch_size=16, device="cpu", sample_ids=ids)
    straight = evaluate(model, x, y, **kw)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, x, y, journal=StoppingJournal(tmp_path / "batches", stop_after), **kw)
    journal = Journal(tmp_path / "batches")
    assert journal.count() == stop_after
    resumed = evaluate(model, x, y, journal=journal, **kw)
    assert journal.count() == journal.total == 2 * 2 * 4
    for a, b in zip(straight.threats, resumed.threats):
        for lab in a.attacks:
            ra, rb = a.attacks[lab], b.attacks[lab]
            assert torch.equal(ra.adv_pred, rb.adv_pred) and torch.equal(ra.fooled, rb.fooled)
            assert torch.equal(ra.dist.nan_to_num(-1), rb.dist.nan_to_num(-1)) and ra.stats == rb.stats
        assert a.worst_case_acc == b.worst_case_acc
    assert straight.outcome_rows() == resumed.outcome_rows()


def test_a_saved_batch_of_other_samples_is_refused(trained_smallcnn, tmp_path):
    model, x, y = trained_smallcnn
    journal = Journal(tmp_path / "batches")
    kw = dict(attacks="fgsm", threats=ThreatModel("linf", 0.1), batch_size=16, device="cpu")
    evaluate(model, x[:32], y[:32], journal=journal, **kw)
    from robustbench_lite.errors import AdvbenchError

    with pytest.raises(AdvbenchError, match="holds other samples"):
        evaluate(model, x[:32], y[:32], journal=journal, sample_ids=torch.arange(32) + 1, **kw)


# --- SIGKILL at random points, then --resume ------------------------------------------------------------------
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_numbers(tmp_path, trained_smallcnn_path):
    common = ("-n", "200", "--batch-size", "20")
    ref = tmp_path / "ref"
    straight = subprocess.run(CLI + attack_args(trained_smallcnn_path, ref, *common), env=ENV, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    expected = numbers(ref)
    n_correct = json.loads((run_folders(ref)[0] / "summary.json").read_text())["n_clean_correct"]
    total = 2 * math.ceil(n_correct / 20)  # 2 attacks x 10 batches
    rnd = random.Random(1412)
    for k in range(3):
        results = tmp_path / f"killed{k}"
        target = rnd.randint(1, 12)
        proc = start(attack_args(trained_smallcnn_path, results, *common))
        try:
            wait_for_batches(proc, results, target)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        (run,) = run_folders(results)
        saved = saved_batches(results)
        assert 1 <= saved < total and not (results / "leaderboard.csv").exists(), (target, saved)
        assert (run / "config.yaml").is_file() and json.loads((run / "state.json").read_text())["status"] == "running"

        resumed = subprocess.run(CLI + attack_args(trained_smallcnn_path, results, *common, "--resume", run.name[:15]),
                                 env=ENV, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming run {run.name}: {saved} finished batches saved" in resumed.stdout
        assert numbers(results) == expected, target  # the same rows (once), accuracies and per-sample outcomes
        assert {r["run_id"] for r in leaderboard_rows(results)} == {run.name}
        assert not (run / "batches").exists() and not (run / "state.json").exists()


# --- Ctrl-C and SIGTERM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_and_sigterm_say_what_was_kept_in_one_line(tmp_path, trained_smallcnn_path, sig, code, word):
    results = tmp_path / "results"
    args = attack_args(trained_smallcnn_path, results, "-n", "200", "--batch-size", "20")
    proc = start(args)
    try:
        wait_for_batches(proc, results, 2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    (run,) = run_folders(results)
    saved = saved_batches(results)
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [ln for ln in lines if ln.startswith("error:")] == lines[-1:]
    assert lines[-1].startswith(f"error: {word}; {saved} of ")
    assert f" batches of run {run.name} are saved: resume with `advbench attack " in lines[-1]
    assert lines[-1].endswith(f"--resume {run.name}`")
    if sig == signal.SIGTERM:  # the command it prints continues the run
        cmd = lines[-1].split("`")[1].split()[1:]
        r = subprocess.run(CLI + cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert {x["run_id"] for x in leaderboard_rows(results)} == {run.name}


# --- resume errors (in process) -------------------------------------------------------------------------------
def invoke_stopped(monkeypatch, args, stop: int):
    """`advbench ARGS` in process, 'killed' (KeyboardInterrupt) right after its ``stop``-th saved batch."""
    real = Journal.record
    calls = []

    def record_then_stop(self, *a):
        real(self, *a)
        calls.append(1)
        if len(calls) == stop:
            raise KeyboardInterrupt

    monkeypatch.setattr(Journal, "record", record_then_stop)
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:
        monkeypatch.setattr(Journal, "record", real)


@pytest.fixture
def interrupted_run(tmp_path, trained_smallcnn_path, monkeypatch):
    """An attack run stopped (KeyboardInterrupt) after 3 saved batches: (results, run id, args)."""
    results = tmp_path / "results"
    args = attack_args(trained_smallcnn_path, results, "-n", "100", "--batch-size", "20")
    r = invoke_stopped(monkeypatch, args, 3)
    assert r.exit_code == 130, r.output
    (run,) = run_folders(results)
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: interrupted; 3 of 10 batches of run {run.name} are saved")
    return results, run.name, args


def error_line(r):
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize("change, key", [(("--steps", "3"), "attacks[1].params.steps is 5 in the run but 3"),
                                         (("--seed", "1"), "seed is 0 in the run but 1"),
                                         (("--eps", "0.2"), "threats[0].eps is 0.3 in the run but 0.2")])
def test_resume_with_other_options_names_the_first_differing_key(interrupted_run, change, key):
    results, run_id, args = interrupted_run
    i = args.index(change[0]) if change[0] in args else None
    bad = args + list(change) if i is None else args[:i + 1] + [change[1]] + args[i + 2:]
    line = error_line(runner.invoke(app, bad + ["--resume", run_id]))
    assert line.startswith(f"error: cannot resume run {run_id}: {key} in this command"), line
    r = runner.invoke(app, args[:-4] + ["-n", "60", "--batch-size", "20", "--resume", run_id])
    assert error_line(r).startswith(f"error: cannot resume run {run_id}: n_examples is 100 in the run but 60")
    assert len(list((results / "runs" / run_id / "batches").glob("*.pt"))) == 3  # nothing changed


def test_resume_prefixes_and_complete_runs(interrupted_run):
    results, run_id, args = interrupted_run
    assert error_line(runner.invoke(app, args + ["--resume", "nope"])).startswith("error: --resume nope: no run 'nope'")
    (results / "runs" / (run_id[:9] + "000000-00000000")).mkdir()
    line = error_line(runner.invoke(app, args + ["--resume", run_id[:9]]))
    assert line.startswith(f"error: --resume {run_id[:9]} is ambiguous: it matches 2 runs") and run_id in line
    r = runner.invoke(app, args + ["--resume", run_id])
    assert r.exit_code == 0, r.output
    assert {x["run_id"] for x in leaderboard_rows(results)} == {run_id}
    line = error_line(runner.invoke(app, args + ["--resume", run_id]))
    assert line == f"error: run {run_id} is complete (its results are in the leaderboard): nothing to resume"


def test_a_failed_fresh_run_leaves_no_run_folder(tmp_path, trained_smallcnn_path, monkeypatch):
    from robustbench_lite.errors import AdvbenchError

    def broken(*a, **k):
        raise AdvbenchError("attack 'pgd' violated the threat model")

    monkeypatch.setattr(evaluator, "_attack_batch", broken)
    results = tmp_path / "results"
    r = runner.invoke(app, attack_args(trained_smallcnn_path, results, "-n", "40"))
    assert r.exit_code == 2 and run_folders(results) == []


# --- run SUITE --resume ---------------------------------------------------------------------------------------
def test_run_suite_resume_skips_complete_models_and_resumes_the_unfinished_one(tmp_path, trained_smallcnn_path,
                                                                              monkeypatch):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: two\nn_examples: 60\nbatch_size: 20\ndevice: cpu\nmasking_checks: false\n"
                     f"models:\n  - {{checkpoint: {trained_smallcnn_path}}}\n"
                     f"  - {{checkpoint: {trained_smallcnn_path}, dataset: mnist-5k}}\n"
                     f"threats:\n  - {{norm: linf, eps: 0.2}}\nattacks:\n  - fgsm\n  - {{name: pgd, steps: 3}}\n")
    straight = tmp_path / "straight"
    r = runner.invoke(app, ["run", str(suite), "--results-dir", str(straight)])
    assert r.exit_code == 0, r.output

    results = tmp_path / "results"
    # stopped in the second model: model 1 saves 2 attacks x 3 batches, then 2 batches of model 2
    r = invoke_stopped(monkeypatch, ["run", suite, "--results-dir", results], 6 + 2)
    assert r.exit_code == 130
    (first,) = {x["run_id"] for x in leaderboard_rows(results)}
    (second,) = {p.name for p in run_folders(results)} - {first}
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: interrupted; 2 of 6 batches of run ") and last.endswith(
        f"resume with `advbench run {suite} --results-dir {results} --resume`"), last

    r = runner.invoke(app, ["run", str(suite), "--results-dir", str(results), "--resume"])
    assert r.exit_code == 0, r.output
    assert f"model 1 of 2: run {first} is complete (skipped)" in r.stdout
    assert f"resuming run {second}: 2 finished batches saved" in r.stdout
    assert {p.name for p in run_folders(results)} == {first, second}

    def accs(res):
        return [(x["model"], x["attack"], x["robust_acc"], x["clean_acc"]) for x in leaderboard_rows(res)]

    assert accs(results) == accs(straight)
    # everything done: a second --resume runs nothing
    r = runner.invoke(app, ["run", str(suite), "--results-dir", str(results), "--resume", "--json"])
    assert r.exit_code == 0 and [x["run_id"] for x in json.loads(r.stdout)["runs"]] == [first, second]
    assert len(leaderboard_rows(results)) == len(leaderboard_rows(straight))
