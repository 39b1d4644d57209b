"""The training loop as robust training uses it: exact resume (weights, optimiser, averager, inner
attack randomness), the held-out validation split, best.pt, the metrics CSV, the catastrophic-
overfitting rollback, and `advbench train-robust`. Tiny budgets: lenet, a few hundred images."""
from __future__ import annotations

import csv
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from defenses import methods
from defenses.methods import PGDAT
from robustbench_lite.checkpoint import read_checkpoint
from robustbench_lite.cli import app
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.runtime import SILENT
from robustbench_lite.threat import ThreatModel
from robustbench_lite.training import (RobustValidation, TrainConfig, best_path, lr_at, metrics_path,
                                       split_train_val, train)
from robustbench_lite.zoo import zoo_path

runner = CliRunner()
THREAT = ThreatModel("linf", 0.3)


def tiny_cfg(out, **kw):
    base = dict(model="lenet", epochs=2, n_train=200, batch_size=50, optimizer="adam", lr=0.003, weight_decay=0.0,
                out=str(out), device="cpu", seed=3, val_size=100)
    base.update(kw)
    return TrainConfig(**base)


def crash_after(n):
    def hook(epoch, row):
        if epoch == n:
            raise KeyboardInterrupt

    return hook


def _equal_states(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


# -- exact resume ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method, averaging", [
    ("pgd-at", dict(swa_start=1)),
    ("trades", dict(ema=0.9)),
    ("fgsm-rs", dict()),
])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, mnist5k, method, averaging):
    def run(out, resume=False, hook=None):
        m = methods.create(method, threat=THREAT, seed=3, **({} if method == "fgsm-rs" else {"steps": 2}))
        return train(tiny_cfg(out, resume=resume, **averaging), m, dataset=mnist5k, narrator=SILENT,
                     robust_val=RobustValidation(THREAT, steps=2), on_epoch_end=hook)

    straight = run(tmp_path / "straight.pt")
    out = tmp_path / "crashed.pt"
    with pytest.raises(KeyboardInterrupt):
        run(out, hook=crash_after(1))
    assert read_checkpoint(out)["epoch"] == 1
    resumed = run(out, resume=True)
    assert resumed.epochs_run == 1 and [r["epoch"] for r in resumed.metrics] == [1, 2]

    a, b = read_checkpoint(out), read_checkpoint(straight.out)
    assert _equal_states(a["state_dict"], b["state_dict"])  # the shipped (averaged) weights
    raw_a = a["extra"]["train_state"].get("raw_state_dict")
    if averaging:
        assert _equal_states(raw_a, b["extra"]["train_state"]["raw_state_dict"])  # and the raw ones
    assert _equal_states(resumed.model.state_dict(), straight.model.state_dict())
    drop = ("seconds", "img_per_s")
    strip = [{k: v for k, v in r.items() if k not in drop} for r in straight.metrics]
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.metrics] == strip


def test_resume_of_a_finished_run_trains_nothing(tmp_path, mnist5k):
    out = tmp_path / "done.pt"
    m = methods.create("fgsm-rs", threat=THREAT)
    train(tiny_cfg(out, epochs=1), m, dataset=mnist5k, narrator=SILENT)
    again = train(tiny_cfg(out, epochs=1, resume=True), m, dataset=mnist5k, narrator=SILENT)
    assert again.epochs_run == 0 and len(again.metrics) == 1


# -- validation split, best.pt, metrics ------------------------------------------------------------
def test_validation_split_is_deterministic_and_disjoint():
    tr, va = split_train_val(1000, 100)
    tr2, va2 = split_train_val(1000, 100, seed=7)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)  # independent of --seed
    assert len(va) == 100 and len(tr) == 900 and not set(tr.tolist()) & set(va.tolist())
    sub, va3 = split_train_val(1000, 100, n_train=50, seed=1)
    assert torch.equal(va3, va) and len(sub) == 50 and set(sub.tolist()) <= set(tr.tolist())
    assert not torch.equal(sub, split_train_val(1000, 100, n_train=50, seed=2)[0])
    # without validation, n_train picks what Dataset.subset picks
    g = torch.Generator().manual_seed(4)
    assert torch.equal(split_train_val(1000, 0, 30, 4)[0], torch.randperm(1000, generator=g)[:30].sort().values)
    with pytest.raises(AdvbenchError, match="^val_size 1000 leaves no training examples"):
        split_train_val(1000, 1000)
    with pytest.raises(AdvbenchError, match="larger than the training examples left"):
        split_train_val(1000, 100, n_train=950)


def test_training_never_sees_the_held_out_examples(tmp_path, mnist5k):
    seen = []

    class Spy(PGDAT):
        def loss(self, model, x, y, ids, epoch):
            seen.append(ids.clone())
            return super().loss(model, x, y, ids, epoch)

    train(tiny_cfg(tmp_path / "spy.pt", epochs=1, n_train=None, val_size=3900), Spy(THREAT, steps=1),
          dataset=mnist5k, narrator=SILENT)
    ids = torch.cat(seen)
    _, val = split_train_val(len(mnist5k.y_train), 3900)
    assert len(ids) == 100 and not set(ids.tolist()) & set(val.tolist())


def test_best_checkpoint_metrics_csv_and_defense_record(tmp_path, mnist5k):
    out = tmp_path / "m.pt"
    m = methods.create("pgd-at", threat=THREAT, steps=2)
    res = train(tiny_cfg(out, epochs=3), m, dataset=mnist5k, narrator=SILENT,
                robust_val=RobustValidation(THREAT, steps=2))
    rows = list(csv.DictReader(metrics_path(out).open()))
    assert len(rows) == 3
    for col in ("epoch", "lr", "train_loss", "train_acc", "train_adv_acc", "train_adv_loss", "train_clean_loss",
                "seconds", "img_per_s", "test_acc", "val_clean_acc", "val_pgd_acc"):
        assert col in rows[0], col
    best_epoch = max(res.metrics, key=lambda r: (r["val_pgd_acc"], -r["epoch"]))["epoch"]
    assert res.best_out == best_path(out) and best_path(out).name == "m.best.pt"
    best = read_checkpoint(best_path(out))
    assert best["extra"]["best_epoch"] == best_epoch == best["epoch"] and best["optimizer"] is None
    last = read_checkpoint(out)
    assert last["epoch"] == 3 and last["defense"]["method"] == "pgd-at" and last["defense"]["eps"] == 0.3
    assert last["metrics"]["val_pgd_acc"] == res.metrics[-1]["val_pgd_acc"]


def test_robust_validation_needs_held_out_examples(tmp_path, mnist5k):
    with pytest.raises(AdvbenchError, match="set val_size > 0"):
        train(tiny_cfg(tmp_path / "x.pt", val_size=0), methods.create("pgd-at", threat=THREAT), dataset=mnist5k,
              narrator=SILENT, robust_val=RobustValidation(THREAT))


def test_swa_learning_rate_and_config_checks():
    cfg = TrainConfig(epochs=4, lr=0.1, swa_start=3, swa_lr=0.01)
    assert lr_at(cfg, 0, 40, 10) == 0.1 and lr_at(cfg, 19, 40, 10) < 0.1 and lr_at(cfg, 20, 40, 10) == 0.01
    for bad, match in ((dict(swa_start=5), "^swa_start must be an epoch between 1 and epochs 4"),
                       (dict(swa_lr=0.1), "^swa_lr needs"), (dict(val_size=-1), "^val_size must be")):
        with pytest.raises(AdvbenchError, match=match):
            TrainConfig(epochs=4, **bad)


def test_config_round_trips_through_a_checkpoint_also_in_the_old_flat_layout():
    from dataclasses import asdict

    from robustbench_lite.runtime import FastPaths

    cfg = TrainConfig(epochs=4, swa_start=2, fast=FastPaths(amp="bf16", channels_last=True))
    assert TrainConfig.from_dict(asdict(cfg)) == cfg
    old = {**{k: v for k, v in asdict(cfg).items() if k != "fast"}, "amp": "bf16", "channels_last": True,
           "compile": False, "retired_setting": 1}  # what older checkpoints stored
    assert TrainConfig.from_dict(old) == cfg


def test_cyclic_schedule_is_fast_ats_triangle():
    """Wong et al. 2020: 0 -> lr_max at 2/5 of the steps -> 0, evaluated after each step."""
    cfg = TrainConfig(epochs=15, lr=0.2, schedule="cyclic")
    total = 1500
    lrs = [lr_at(cfg, s, total) for s in range(total)]
    peak = max(range(total), key=lrs.__getitem__)
    assert peak == 599 and lrs[peak] == pytest.approx(0.2)
    assert lrs[0] == pytest.approx(0.2 / 600) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a < b for a, b in zip(lrs[:599], lrs[1:600])) and all(a > b for a, b in zip(lrs[599:-1], lrs[600:]))
    with pytest.raises(AdvbenchError, match="expected cosine, step, cyclic or constant"):
        TrainConfig(schedule="triangle")


# -- catastrophic-overfitting rollback ---------------------------------------------------------------
class CollapsesAt(PGDAT):
    name = "pgd-at"

    def __init__(self, at, *a, **kw):
        super().__init__(*a, **kw)
        self.at = at

    def check_collapse(self, history, row):
        return f"collapse at epoch {row['epoch']}" if row["epoch"] == self.at else None


def test_collapse_rolls_back_to_the_previous_epoch_and_stops(tmp_path, mnist5k):
    out = tmp_path / "c.pt"
    kept = {}

    def remember(epoch, row):
        if epoch == 1:
            kept["state"] = read_checkpoint(out)["state_dict"]

    res = train(tiny_cfg(out, epochs=3), CollapsesAt(2, THREAT, steps=1), dataset=mnist5k, narrator=SILENT,
                on_epoch_end=remember)
    assert res.stopped.startswith("collapse at epoch 2") and "rolled back to the weights of epoch 1" in res.stopped
    assert res.epochs_run == 2 and [r.get("rolled_back") for r in res.metrics] == [None, 1]
    ck = read_checkpoint(out)
    assert ck["epoch"] == 1 and _equal_states(ck["state_dict"], kept["state"])
    assert _equal_states(res.model.state_dict(), kept["state"])
    assert ck["extra"]["train_state"]["stopped"] == res.stopped
    rows = list(csv.DictReader(metrics_path(out).open()))
    assert [r["rolled_back"] for r in rows] == ["", "1"]
    # a resumed run stays stopped
    again = train(tiny_cfg(out, epochs=3, resume=True), CollapsesAt(99, THREAT, steps=1), dataset=mnist5k,
                  narrator=SILENT)
    assert again.epochs_run == 0 and again.stopped == res.stopped


def test_collapse_in_the_first_epoch_keeps_the_initial_weights(tmp_path, mnist5k):
    out = tmp_path / "c1.pt"
    torch.manual_seed(3)
    res = train(tiny_cfg(out), CollapsesAt(1, THREAT, steps=1), dataset=mnist5k, narrator=SILENT)
    ck = read_checkpoint(out)
    assert ck["epoch"] == 0 and res.stopped and ck["extra"]["train_state"]["stopped"]


# -- the command line -------------------------------------------------------------------------------
TINY = ["--model", "lenet", "--epochs", "1", "--n-train", "200", "--val-size", "100", "--val-steps", "2",
        "--steps", "2", "--device", "cpu", "--n-eval", "50", "--eval-steps", "3"]


def test_train_robust_cli_end_to_end(tmp_path):
    res_dir = tmp_path / "results"
    r = runner.invoke(app, ["train-robust", "--method", "pgd-at", "--activation", "silu", "--results-dir",
                            str(res_dir)] + TINY)
    assert r.exit_code == 0, r.output
    out = zoo_path("lenet", "mnist-5k", "pgd-at", "silu")
    assert out.is_file() and out.with_suffix(".best.pt").is_file() and out.with_suffix(".metrics.csv").is_file()
    assert "pgd-at training of lenet (silu)" in r.output and "best epoch 1" in r.output
    # one epoch: best.pt holds the final weights, evaluated and recorded once
    assert "best epoch is the last one: evaluated once" in r.output and "final+best model" in r.output
    rows = list(csv.DictReader((res_dir / "leaderboard.csv").open()))
    pgd_rows = [row for row in rows if row["attack"] == "pgd"]
    assert len(pgd_rows) == 1
    assert all(row["defense"] == "pgd-at" and row["activation"] == "silu" and row["n_examples"] == "50"
               for row in pgd_rows)
    assert '"steps": 3' in pgd_rows[0]["attack_params"]
    ck = read_checkpoint(out)
    assert ck["activation"] == "silu" and ck["defense"]["method"] == "pgd-at"
    # resume of the finished run: nothing trained, nothing re-recorded
    r = runner.invoke(app, ["train-robust", "--method", "pgd-at", "--activation", "silu", "--results-dir",
                            str(res_dir), "--resume"] + TINY)
    assert r.exit_code == 0, r.output
    assert "not evaluating again" in r.output
    assert len(list(csv.DictReader((res_dir / "leaderboard.csv").open()))) == len(rows)


def test_train_robust_cli_smooth_backward_and_averaging_names(tmp_path):
    r = runner.invoke(app, ["train-robust", "--method", "mix", "--smooth-backward", "softplus", "--swa-start", "1",
                            "--no-eval", "--results-dir", str(tmp_path)] + [a if a != "2" else "1" for a in TINY])
    assert r.exit_code == 0, r.output
    out = zoo_path("lenet", "mnist-5k", "mix-swa", "relu-sb-softplus")
    ck = read_checkpoint(out)
    assert ck["smooth_backward"] == "softplus" and ck["defense"]["smooth_backward"] == "softplus"
    assert ck["defense"]["averaging"] == "swa" and not (tmp_path / "leaderboard.csv").exists()
    r = runner.invoke(app, ["attack", "--checkpoint", str(out), "--eps", "0.1", "-n", "20", "--attack", "fgsm",
                            "--device", "cpu", "--results-dir", str(tmp_path), "--no-masking-checks"])
    assert r.exit_code == 0, r.output
    import pandas as pd

    assert set(pd.read_csv(tmp_path / "leaderboard.csv")["activation"]) == {"relu-sb-softplus"}


@pytest.mark.parametrize("extra, match", [
    (["--method", "pgd-at", "--beta", "3"], "--beta is TRADES' weight"),
    (["--method", "trades", "--mix-weight", "0.3"], "--mix-weight belongs to method 'mix'"),
    (["--method", "pgd-at", "--swa-start", "4"], "--swa-start must be an epoch between 1 and --epochs 1"),
    (["--method", "pgd-at", "--swa-start", "1", "--ema", "0.99"], "choose one"),
    (["--method", "pgd-at", "--bn-mode", "batch"], "invalid --bn-mode 'batch'"),
    (["--method", "pgd-at", "--activation", "silu", "--smooth-backward", "gelu"], "keeps ReLU in the forward"),
    (["--method", "pgdat"], "unknown defense 'pgdat'"),
    (["--method", "pgd-at", "--eps", "2"], "eps must be <= 1"),
    (["--method", "pgd-at", "--val-size", "4000"], "--val-size 4000 leaves no training examples"),
    (["--method", "standard", "--steps", "3"], "has no inner attack"),
    (["--method", "fgsm-rs", "--steps", "3"], "one FGSM step"),
])
def test_train_robust_cli_errors_are_one_line(tmp_path, extra, match):
    args = ["train-robust", "--results-dir", str(tmp_path), "--device", "cpu", "--epochs", "1", "--no-eval"] + extra
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and match in lines[-1], r.output
    assert "Traceback" not in r.output


def test_resume_with_another_method_is_refused(tmp_path, mnist5k):
    out = tmp_path / "r.pt"
    train(tiny_cfg(out, epochs=1, val_size=0, n_train=50), methods.create("fgsm-rs", threat=THREAT),
          dataset=mnist5k, narrator=SILENT)
    with pytest.raises(AdvbenchError, match="was trained with method 'fgsm-rs', not 'pgd-at'"):
        train(tiny_cfg(out, epochs=2, val_size=0, n_train=50, resume=True),
              methods.create("pgd-at", threat=THREAT), dataset=mnist5k, narrator=SILENT)


# -- the claims of the defense table (minutes: run with -m slow) ------------------------------------
@pytest.mark.slow
def test_pgd_at_makes_smallcnn_robust_and_standard_training_does_not(tmp_path, mnist5k, trained_smallcnn):
    """The benchmark budget (benchmarks/defense_table.py): about 4 minutes on 2 idle cores."""
    from robustbench_lite.evaluator import evaluate
    from robustbench_lite.runs import ROBUST_TRAINING, RobustTraining, run_robust_training
    from robustbench_lite.runtime import SILENT

    atk = [{"name": "pgd", "steps": 20}]
    std, x, y = trained_smallcnn
    r = evaluate(std, x, y, atk, THREAT, batch_size=500)
    assert r.threats[0].robust_acc("pgd") < 0.05
    loop = replace(ROBUST_TRAINING, model="smallcnn", epochs=10, batch_size=32, device="cpu",
                   out=str(tmp_path / "at.pt"))
    rep = run_robust_training(RobustTraining(loop, methods.MethodConfig("pgd-at"), eps="0.3", evaluate=False), SILENT)
    r = evaluate(rep.result.model, x, y, atk, THREAT, batch_size=500)
    assert r.clean_acc >= 0.90 and r.threats[0].robust_acc("pgd") >= 0.60
