"""The model zoo: one user cache ($ADVBENCH_HOME/models) shared by every results dir, entries keyed by
the data's sha256 (not a file name), trained once under a lock however many runs need it; training
outputs locked against a second training; the identities recorded in the leaderboard."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from robustbench_lite import fileio, zoo
from robustbench_lite import leaderboard as lb
from robustbench_lite.checkpoint import file_sha256
from robustbench_lite.cli import app
from robustbench_lite.data import load_dataset

runner = CliRunner()
CLI = [sys.executable, "-m", "robustbench_lite"]


def small_npz(path: Path, mnist5k, offset: int = 0, n_train: int = 300, n_test: int = 40) -> Path:
    """A few hundred real digits (uint8 NHW), a different slice of mnist-5k for each offset."""
    x = (mnist5k.x_train[offset:offset + n_train + n_test, 0] * 255).round().byte().numpy()
    y = mnist5k.y_train[offset:offset + n_train + n_test].numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:], y_test=y[n_train:])
    return path


def rows(results: Path):
    with open(results / "leaderboard.csv", newline="") as f:
        return list(csv.DictReader(f))


def attack(results, *extra):
    return runner.invoke(app, ["attack", "--model", "smallcnn", "--eps", "0.3", "-n", "20", "--attack", "fgsm",
                               "--device", "cpu", "--no-masking-checks", "--results-dir", str(results), *extra])


# --- where the zoo is ----------------------------------------------------------------------------------------
def test_home_is_advbench_home_else_the_xdg_cache_else_dot_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ADVBENCH_HOME", str(tmp_path / "h"))
    assert zoo.home() == tmp_path / "h"
    monkeypatch.delenv("ADVBENCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.home() == tmp_path / "xdg" / "advbench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert zoo.home() == tmp_path / "user" / ".cache" / "advbench"


def test_entry_name_is_readable_and_carries_the_data_fingerprint(mnist5k, advbench_home):
    fp = mnist5k.fingerprint
    assert len(fp) == 64 and fp == load_dataset("mnist-5k").fingerprint
    assert zoo.zoo_path("smallcnn", "mnist-5k") == advbench_home / "models" / f"smallcnn-mnist-5k-{fp[:12]}-standard.pt"
    assert zoo.zoo_path("lenet", mnist5k, "pgd-at", "silu").name == f"lenet-mnist-5k-{fp[:12]}-pgd-at-silu.pt"


def test_fingerprint_is_the_content_not_the_file(tmp_path, mnist5k):
    a = load_dataset(f"npz:{small_npz(tmp_path / 'A' / 'data.npz', mnist5k)}")
    b = load_dataset(f"npz:{small_npz(tmp_path / 'B' / 'copy.npz', mnist5k)}")  # same arrays, another file
    c = load_dataset(f"npz:{small_npz(tmp_path / 'C' / 'data.npz', mnist5k, offset=1000)}")
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.input_shape == c.input_shape


# --- item 2: another dataset with the same stem never reuses a baseline; the rows say which data ------------
def test_same_stem_other_data_trains_its_own_baseline_and_rows_record_the_data(tmp_path, mnist5k, advbench_home):
    a = small_npz(tmp_path / "A" / "data.npz", mnist5k)
    c = small_npz(tmp_path / "C" / "data.npz", mnist5k, offset=1000)
    results = tmp_path / "res"
    r1 = attack(results, "--dataset", f"npz:{a}")
    assert r1.exit_code == 0, r1.stderr
    r2 = attack(results, "--dataset", f"npz:{c}")
    assert r2.exit_code == 0, r2.stderr
    assert "training a standard smallcnn baseline" in r1.stdout and "training a standard smallcnn baseline" in r2.stdout
    entries = sorted(p.name for p in (advbench_home / "models").glob("*.pt"))
    fa, fc = load_dataset(f"npz:{a}").fingerprint, load_dataset(f"npz:{c}").fingerprint
    assert entries == sorted([f"smallcnn-npz-data-{fa[:12]}-standard.pt", f"smallcnn-npz-data-{fc[:12]}-standard.pt"])
    got = rows(results)
    assert [(r["dataset"], r["dataset_sha256"]) for r in got] == [(f"npz:{a}", fa)] * 2 + [(f"npz:{c}", fc)] * 2
    ckpts = {r["checkpoint"]: r["checkpoint_sha256"] for r in got}
    assert len(ckpts) == 2 and all(file_sha256(p) == h and len(h) == 64 for p, h in ckpts.items())
    config = yaml.safe_load(next((results / "runs").glob(f"{got[-1]['run_id']}/config.yaml")).read_text())
    assert config["dataset_sha256"] == fc and config["checkpoint_sha256"] == got[-1]["checkpoint_sha256"]


# --- item 16: one zoo for every results dir ------------------------------------------------------------------
def test_the_zoo_is_shared_by_all_results_dirs(tmp_path, mnist5k, advbench_home):
    data = small_npz(tmp_path / "data.npz", mnist5k)
    first = attack(tmp_path / "r1", "--dataset", f"npz:{data}")
    assert first.exit_code == 0 and "training a standard" in first.stdout, first.stderr
    second = attack(tmp_path / "r2", "--dataset", f"npz:{data}")
    assert second.exit_code == 0 and "training" not in second.stdout, second.stdout
    assert rows(tmp_path / "r1")[0]["checkpoint_sha256"] == rows(tmp_path / "r2")[0]["checkpoint_sha256"]
    assert not (tmp_path / "r1" / "models").exists() and not (tmp_path / "r2" / "models").exists()
    assert [p.parent for p in advbench_home.rglob("*.pt")] == [advbench_home / "models"]


def test_train_without_out_writes_the_zoo_entry(tmp_path, mnist5k, advbench_home):
    data = small_npz(tmp_path / "data.npz", mnist5k)
    r = runner.invoke(app, ["train", "--model", "lenet", "--dataset", f"npz:{data}", "--epochs", "1",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    assert zoo.zoo_path("lenet", f"npz:{data}").is_file()
    assert not list(advbench_home.rglob("*.lock"))  # the output lock is gone with the training


# --- item 3: concurrent runs train a missing baseline once; a locked training output is refused ----------------
def test_eight_concurrent_attacks_on_an_empty_zoo_train_the_baseline_once(tmp_path, mnist5k, advbench_home):
    data = small_npz(tmp_path / "data.npz", mnist5k)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = CLI + ["attack", "--model", "smallcnn", "--eps", "0.3", "-n", "20", "--attack", "fgsm", "--device", "cpu",
                 "--dataset", f"npz:{data}", "--no-masking-checks"]
    procs = [subprocess.Popen(cmd + ["--results-dir", str(tmp_path / ("shared" if k % 2 else f"own{k}"))], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(8)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    entry = zoo.zoo_path("smallcnn", f"npz:{data}")
    assert sum(o.count("training a standard smallcnn baseline") for o in outs) == 1, outs
    waited = [o for o in outs if f"waiting for another process training {entry}" in o]
    assert all(o.count("waiting for another process") == 1 for o in waited)
    hashes = {r["checkpoint_sha256"] for d in tmp_path.glob("*") if (d / "leaderboard.csv").is_file()
              for r in rows(d)}
    assert hashes == {file_sha256(entry)}
    assert len(rows(tmp_path / "shared")) == 2 * 4  # fgsm + worst case for each of the 4 runs sharing it
    assert not list(advbench_home.rglob("*.lock")) and not list(advbench_home.rglob("*.tmp"))


def test_a_training_output_being_trained_elsewhere_is_refused_at_once(tmp_path):
    out = tmp_path / "m.pt"
    with fileio.locked(out):  # another training holds it
        r = subprocess.run(CLI + ["train", "--model", "lenet", "--epochs", "1", "--n-train", "100", "--device", "cpu",
                                  "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == (f"error: {out} is being trained by another process (lock {out}.lock held); wait for it to "
                        f"finish or choose another --out\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, and our lock file gone with us


def test_lock_timeout_and_on_wait(tmp_path):
    target = tmp_path / "x"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from robustbench_lite.fileio import locked\n"
                               f"with locked({str(target)!r}):\n    print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        calls = []
        with pytest.raises(fileio.LockBusy, match="is locked by another process"):
            with fileio.locked(target, timeout=0, on_wait=lambda: calls.append(1)):
                pass
        assert calls == []  # timeout 0 does not wait
        with pytest.raises(fileio.LockBusy):
            with fileio.locked(target, timeout=0.3, on_wait=lambda: calls.append(1)):
                pass
        assert calls == [1]
    finally:
        holder.communicate("", timeout=60)
    with fileio.locked(target, timeout=0):  # free again; and a holder may take it again (nested)
        with fileio.locked(target, timeout=0):
            assert Path(str(target) + ".lock").is_file()
        assert Path(str(target) + ".lock").is_file()
    assert not Path(str(target) + ".lock").exists()


# --- the leaderboard: the new column, old CSVs, old short hashes -------------------------------------------------
def test_old_leaderboard_without_dataset_sha256_reads_and_appends(tmp_path):
    old_cols = [c for c in lb.COLUMNS if c != "dataset_sha256"]
    row = {c: "" for c in old_cols}
    row.update(run_id="r0", model="m", dataset="mnist-5k", norm="linf", eps="0.1", attack="fgsm", clean_acc="0.9",
               robust_acc="0.1", checkpoint_sha256="0123456789ab")
    (tmp_path / "leaderboard.csv").write_text(",".join(old_cols) + "\n" + ",".join(row[c] for c in old_cols) + "\n")
    assert len(lb.read(tmp_path)) == 1
    new = dict(row, run_id="r1", dataset_sha256="f" * 64)
    lb.append(tmp_path, [{c: new.get(c, "") for c in lb.COLUMNS}])
    got = rows(tmp_path)
    assert [r["dataset_sha256"] for r in got] == ["", "f" * 64]


def test_final_eval_recorded_matches_old_12_hex_rows(tmp_path):
    from robustbench_lite.runs import _final_eval_recorded

    ck = tmp_path / "m.pt"
    ck.write_bytes(b"weights")
    digest = file_sha256(ck)
    base = {c: "" for c in lb.COLUMNS}
    base.update(run_id="r0", model="m", dataset="d", norm="linf", eps="0.1", attack="pgd", clean_acc="1",
                robust_acc="0")
    lb.append(tmp_path, [dict(base, checkpoint_sha256="0" * 12)])
    assert not _final_eval_recorded(ck, str(tmp_path))
    lb.append(tmp_path, [dict(base, checkpoint_sha256=digest[:12])])  # a row of an older version
    assert _final_eval_recorded(ck, str(tmp_path))
