"""The leaderboard: CSV rows, markdown sections and sort order, atomic + locked appends (several
processes at once lose no row), corrupt and unwritable files."""
from __future__ import annotations

import json
import multiprocessing as mp

import pandas as pd
import pytest
import torch
from torch import nn

from robustbench_lite import leaderboard as lb
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.evaluator import evaluate


def row(run_id, model, attack, robust, *, dataset="mnist-5k", norm="linf", eps=0.3, clean=0.99, ts="2026-01-01T00:00:00",
        sha="aaaa", defense="standard", activation="relu", n=100):
    r = {c: "" for c in lb.COLUMNS}
    r.update(run_id=run_id, timestamp=ts, model=model, checkpoint_sha256=sha, dataset=dataset, n_examples=str(n),
             norm=norm, eps=repr(eps), attack=attack, clean_acc=repr(clean), robust_acc=repr(robust),
             defense=defense, activation=activation, attack_params="{}")
    return r


def run_rows(run_id, model, accs, worst, **kw):
    return [row(run_id, model, a, v, **kw) for a, v in accs.items()] + [row(run_id, model, "worst-case", worst, **kw)]


def test_rows_from_an_evaluation(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(20, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    res = evaluate(model, x, y, ["fgsm", {"name": "pgd", "steps": 2}], eps="0.1,0.2")
    rows = lb.result_rows(res, {"run_id": "r1", "model": "m", "dataset": "d", "seed": 0, "flags": "zoo"})
    assert len(rows) == 2 * 3  # (2 attacks + worst case) x 2 threat models
    assert all(list(r) == lb.COLUMNS for r in rows)
    assert [r["attack"] for r in rows[:3]] == ["fgsm", "pgd", "worst-case"]
    assert rows[0]["eps"] == "0.1" and rows[3]["eps"] == "0.2" and rows[0]["n_examples"] == "20"
    assert json.loads(rows[1]["attack_params"])["steps"] == 2
    assert json.loads(rows[2]["attack_params"]) == ["fgsm", "pgd"]
    assert float(rows[0]["clean_acc"]) == 1.0
    assert float(rows[2]["robust_acc"]) <= min(float(rows[0]["robust_acc"]), float(rows[1]["robust_acc"]))
    lb.append(tmp_path, rows)
    df = lb.read(tmp_path)
    assert len(df) == 6 and list(df.columns) == lb.COLUMNS
    assert df.to_dict(orient="records") == rows  # strings round-trip exactly


def test_markdown_sections_sort_order_and_strongest_run(tmp_path):
    rows = []
    rows += run_rows("r1", "smallcnn", {"fgsm": 0.2, "pgd": 0.0}, 0.0)
    rows += run_rows("r2", "smallcnn", {"fgsm": 0.9, "pgd": 0.8}, 0.8, sha="bbbb", defense="pgd-at")
    rows += run_rows("r3", "lenet", {"fgsm": 0.5, "pgd": 0.3}, 0.3, sha="cccc")
    rows += run_rows("r4", "smallcnn", {"fgsm": 0.4, "pgd": 0.1}, 0.1, ts="2026-02-01T00:00:00")  # newer, weaker
    rows += run_rows("r5", "smallcnn", {"fgsm": 0.7, "bim": 0.6}, 0.6, eps=0.1)
    rows += run_rows("r6", "resnet18", {"pgd": 0.4}, 0.4, dataset="npz:cifar10.npz", eps=8 / 255)
    rows += run_rows("r7", "smallcnn", {"fgsm": 0.9, "pgd": 0.9}, 0.9, ts="2026-03-01T00:00:00", n=20)  # smoke run
    lb.append(tmp_path, rows[:10])
    lb.append(tmp_path, rows[10:])
    md = (tmp_path / "leaderboard.md").read_text()
    titles = [line for line in md.splitlines() if line.startswith("## ")]
    assert titles == ["## mnist-5k · linf eps=0.1", "## mnist-5k · linf eps=0.3", "## npz:cifar10.npz · linf eps=8/255"]
    sec = md.split("## mnist-5k · linf eps=0.3")[1].split("## ")[0]
    lines = [ln for ln in sec.splitlines() if ln.startswith("|")]
    assert lines[0] == ("| # | model | defense | activation | checkpoint | n | evaluation | clean | fgsm | pgd | worst case "
                        "| run |")
    body = lines[2:]
    assert len(body) == 3  # r4 and r7 (same model, checkpoint, defense) are weaker evaluations than r1
    assert [b.split(" | ")[-1].strip(" |`") for b in body] == ["r2", "r3", "r1"]  # worst case 80 > 30 > 0
    # rows without the mode / evaluation columns ran per attack and are weak: their worst case is an upper bound
    assert body[0].startswith("| 1 | smallcnn | pgd-at | relu | `bbbb` | 100 | weak (per-attack) | 99.00 | 90.00 | 80.00 "
                              "| ≤ 80.00 |")
    sec01 = md.split("## mnist-5k · linf eps=0.1")[1].split("## ")[0]
    assert "| clean | fgsm | bim | worst case |" in sec01
    # the same via the DataFrame API
    sections = lb.table(lb.read(tmp_path))
    assert [t for t, _ in sections][1] == "mnist-5k · linf eps=0.3"
    assert list(sections[1][1]["worst case"]) == [0.8, 0.3, 0.0]


def test_json_rendering_has_numbers(tmp_path):
    lb.append(tmp_path, run_rows("a", "m", {"pgd": 0.25}, 0.25, eps=8 / 255))
    recs = json.loads(lb.render_json(lb.read(tmp_path)))
    assert recs[0]["robust_acc"] == 0.25 and recs[0]["eps"] == 8 / 255 and recs[0]["n_examples"] == 100
    assert recs[0]["attack_params"] == {} and recs[1]["attack"] == "worst-case" and recs[0]["mean_norm"] is None


def test_filter_rows(tmp_path):
    lb.append(tmp_path, run_rows("a", "m", {"pgd": 0.1}, 0.1, eps=8 / 255) + run_rows("b", "m", {"pgd": 0.2}, 0.2,
                                                                                      norm="l2", eps=0.5))
    df = lb.read(tmp_path)
    assert len(lb.filter_rows(df, norm="linf")) == 2
    assert len(lb.filter_rows(df, eps=0.5)) == 2
    assert len(lb.filter_rows(df, eps=8 / 255, norm="linf", dataset="MNIST-5K")) == 2
    assert len(lb.filter_rows(df, dataset="cifar10")) == 0


def test_missing_and_empty_leaderboards_read_as_empty(tmp_path):
    assert lb.read(tmp_path).empty
    (tmp_path / "leaderboard.csv").write_text("")
    assert lb.read(tmp_path).empty
    assert "No results yet" in lb.render_markdown(lb.read(tmp_path))


def test_corrupt_csv_is_an_error_and_is_not_overwritten(tmp_path):
    p = tmp_path / "leaderboard.csv"
    p.write_text("hello,world\n1,2\n")
    with pytest.raises(AdvbenchError, match=r"leaderboard.csv is corrupt: missing columns run_id, model"):
        lb.read(tmp_path)
    with pytest.raises(AdvbenchError, match="is corrupt"):
        lb.append(tmp_path, run_rows("r", "m", {"pgd": 0.1}, 0.1))
    assert p.read_text() == "hello,world\n1,2\n"
    lb.append(tmp_path / "ok", run_rows("r", "m", {"pgd": 0.1}, 0.1))
    text = (tmp_path / "ok" / "leaderboard.csv").read_text().splitlines()
    (tmp_path / "ok" / "leaderboard.csv").write_text("\n".join(text[:-1] + [text[-1].replace(",0.1,", ",abc,")]))
    with pytest.raises(AdvbenchError, match=r"corrupt: row 3 has robust_acc='abc'"):
        lb.read(tmp_path / "ok")


def test_a_failure_while_appending_changes_no_file(tmp_path, monkeypatch):
    lb.append(tmp_path, run_rows("r1", "m", {"pgd": 0.1}, 0.1))
    before = {n: (tmp_path / n).read_text() for n in ("leaderboard.csv", "leaderboard.md")}

    def boom(df):
        raise RuntimeError("crash while rendering")

    monkeypatch.setattr(lb, "render_markdown", boom)
    with pytest.raises(RuntimeError):
        lb.append(tmp_path, run_rows("r2", "m", {"pgd": 0.2}, 0.2))
    assert {n: (tmp_path / n).read_text() for n in before} == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_unwritable_results_dir_is_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(AdvbenchError, match="cannot create directory"):
        lb.append(blocker / "results", run_rows("r", "m", {"pgd": 0.1}, 0.1))
    with pytest.raises(AdvbenchError):
        lb.create_run_dir(blocker)


def test_run_ids_are_unique_and_run_files_are_written(tmp_path):
    ids = {lb.create_run_dir(tmp_path)[0] for _ in range(50)}
    assert len(ids) == 50
    run_id, d = lb.create_run_dir(tmp_path)
    lb.write_run_files(d, {"a": (1, 2), "eps": float("nan")}, {"x": 1.5}, [{"sample_id": 1, "fooled": 0}])
    assert (d / "config.yaml").read_text() == "a:\n- 1\n- 2\neps: null\n"
    assert json.loads((d / "summary.json").read_text()) == {"x": 1.5}
    assert (d / "outcomes.csv").read_text() == "sample_id,fooled\n1,0\n"


def _writer(args):
    results_dir, k, per = args
    for j in range(per):
        lb.append(results_dir, run_rows(f"p{k}-{j}", f"model{k}", {"fgsm": 0.5, "pgd": 0.1 * j}, 0.05 * j))
    return k


def test_concurrent_appends_lose_no_row(tmp_path):
    procs, per = 4, 5
    ctx = mp.get_context("fork")
    with ctx.Pool(procs) as pool:
        assert sorted(pool.map(_writer, [(str(tmp_path), k, per) for k in range(procs)])) == list(range(procs))
    df = pd.read_csv(tmp_path / "leaderboard.csv", dtype=str, keep_default_na=False)
    assert len(df) == procs * per * 3
    assert set(df["run_id"]) == {f"p{k}-{j}" for k in range(procs) for j in range(per)}
    assert (df.groupby("run_id").size() == 3).all()
    md = (tmp_path / "leaderboard.md").read_text()
    assert all(f"model{k}" in md for k in range(procs))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_each_entry_shows_its_strongest_evaluation_not_its_largest(tmp_path):
    """Issue 12 item 6: a weak FGSM run with n=100 and a later, stronger PGD run with n=50 of the same
    model: the PGD run's numbers are shown (lowest worst case), with its n; the rule is stated."""
    lb.append(tmp_path, run_rows("weak", "smallcnn", {"fgsm": 0.7}, 0.7, n=100, ts="2026-01-01T00:00:00"))
    lb.append(tmp_path, run_rows("strong", "smallcnn", {"pgd": 0.2}, 0.2, n=50, ts="2026-01-02T00:00:00"))
    (sec,) = lb.table(lb.read(tmp_path))
    t = sec[1]
    assert list(t["run"]) == ["strong"] and list(t["n"]) == ["50"] and list(t["worst case"]) == [0.2]
    md = (tmp_path / "leaderboard.md").read_text()
    assert "`strong`" in md and "`weak`" not in md
    assert "the lowest worst-case robust accuracy" in md and "ties: more examples, then the latest" in md
    # ties on the worst case: more examples win, then the latest
    lb.append(tmp_path, run_rows("tie-small", "smallcnn", {"pgd": 0.2}, 0.2, n=20, ts="2026-01-03T00:00:00"))
    lb.append(tmp_path, run_rows("tie-late", "smallcnn", {"pgd": 0.2}, 0.2, n=50, ts="2026-01-04T00:00:00"))
    assert list(lb.table(lb.read(tmp_path))[0][1]["run"]) == ["tie-late"]


def test_checkpoint_hashes_are_shown_and_grouped_by_a_12_hex_prefix(tmp_path):
    full = "0123456789abcdef" * 4
    lb.append(tmp_path, run_rows("old", "smallcnn", {"pgd": 0.3}, 0.3, sha=full[:12]))   # an old short hash
    lb.append(tmp_path, run_rows("new", "smallcnn", {"pgd": 0.1}, 0.1, sha=full))        # the full sha256
    lb.append(tmp_path, run_rows("other", "smallcnn", {"pgd": 0.5}, 0.5, sha="f" * 64))
    t = lb.table(lb.read(tmp_path))[0][1]
    assert list(t["run"]) == ["other", "new"] and list(t["checkpoint"]) == ["f" * 12, full[:12]]
    md = (tmp_path / "leaderboard.md").read_text()
    assert f"`{full[:12]}`" in md and full not in md


def test_markdown_path_that_is_a_directory_is_refused_before_anything_is_written(tmp_path):
    lb.append(tmp_path, run_rows("r1", "m", {"pgd": 0.1}, 0.1))
    csv_before = (tmp_path / "leaderboard.csv").read_bytes()
    (tmp_path / "leaderboard.md").unlink()
    (tmp_path / "leaderboard.md").mkdir()
    with pytest.raises(AdvbenchError, match=r"cannot write the leaderboard: .*leaderboard.md is a directory"):
        lb.append(tmp_path, run_rows("r2", "m", {"pgd": 0.2}, 0.2))
    assert (tmp_path / "leaderboard.csv").read_bytes() == csv_before


@pytest.mark.parametrize("first", [True, False])
def test_csv_is_rolled_back_when_the_markdown_write_fails(tmp_path, monkeypatch, first):
    """The CSV was replaced, then the markdown write fails: the old CSV (bytes and mtime) is back, or
    no CSV when there was none."""
    import os

    from robustbench_lite import fileio

    if not first:
        lb.append(tmp_path, run_rows("r1", "m", {"pgd": 0.1}, 0.1))
    p = tmp_path / "leaderboard.csv"
    before = (p.read_bytes(), p.stat().st_mtime_ns) if p.exists() else None
    real = fileio.atomic_write_text

    def md_fails(path, text):
        if str(path).endswith(lb.MD_NAME):
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(lb, "atomic_write_text", md_fails)
    with pytest.raises(AdvbenchError, match="cannot write the leaderboard in .*: No space left on device"):
        lb.append(tmp_path, run_rows("r2", "m", {"pgd": 0.2}, 0.2))
    assert ((p.read_bytes(), p.stat().st_mtime_ns) if p.exists() else None) == before
    assert not [q for q in os.listdir(tmp_path) if q.endswith(".tmp")]


def test_train_robust_whose_best_epoch_is_its_last_is_recorded_once(tmp_path):
    """Issue 12 item 5: with one epoch, best.pt holds the final weights: one evaluation, one run in
    the leaderboard (flagged final+best), not two runs with the same numbers."""
    from typer.testing import CliRunner

    from robustbench_lite.cli import app
    from robustbench_lite.runs import _same_weights

    results = tmp_path / "results"
    r = CliRunner().invoke(app, ["train-robust", "--model", "lenet", "--epochs", "1", "--n-train", "200",
                                 "--val-size", "100", "--val-steps", "2", "--eval-steps", "2", "--n-eval", "50",
                                 "--device", "cpu", "--results-dir", str(results), "--out", str(tmp_path / "m.pt")])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "m.best.pt").is_file() and _same_weights(tmp_path / "m.pt", tmp_path / "m.best.pt")
    assert "best epoch is the last one: evaluated once" in r.stdout
    df = lb.read(results)
    assert df["run_id"].nunique() == 1 and len(list((results / "runs").iterdir())) == 1
    assert set(df["flags"].str.split(";").explode()) >= {"train-robust:final+best"}
