"""The defense table: standard vs adversarial training, and the Smooth Adversarial Training
comparison of activations under one budget (CPU, mnist-5k, smallcnn, L-inf eps = 0.3).

    .venv/bin/python benchmarks/defense_table.py --out results/defense_table.md

What it does (every number on the 1,000 mnist-5k test images, PGD with the engine's default step
2.5 * eps / steps, one random start, seed 0):
  1. a standard smallcnn (the zoo baseline budget) -> clean and PGD-20 / PGD-50 accuracy;
  2. PGD-AT (Madry et al.) of smallcnn with ReLU, SiLU, GELU, Softplus (alpha=10) and SmoothReLU,
     same budget, same seed, same data (500 training images held out for validation) -> clean,
     PGD-20, PGD-50 of the last epoch, and the epoch that validation PGD accuracy would pick;
  3. per-epoch training time of fgsm-rs and pgd-at (k=7) divided by the standard epoch's, measured
     on the same data and batch size, methods interleaved, best of ``--timing-repeats`` epochs
     (the machine is shared: the minimum is the least disturbed measurement).
Checkpoints and metrics go to ``--work-dir`` (default .bench/defense_table, git-ignored).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from defenses.methods import MethodConfig  # noqa: E402
from robustbench_lite.data import load_dataset  # noqa: E402
from robustbench_lite.evaluator import evaluate  # noqa: E402
from robustbench_lite.fileio import atomic_write_text, ensure_dir  # noqa: E402
from robustbench_lite.runs import RobustTraining, run_robust_training  # noqa: E402
from robustbench_lite.runtime import SILENT  # noqa: E402
from robustbench_lite.threat import ThreatModel  # noqa: E402
from robustbench_lite.training import TrainConfig, train  # noqa: E402
from train_speed import time_epochs as time_epochs_base  # noqa: E402

ACTIVATIONS = ("relu", "silu", "gelu", "softplus", "smoothrelu")
EVAL_ATTACKS = [{"name": "pgd", "steps": 20, "label": "pgd-20"}, {"name": "pgd", "steps": 50, "label": "pgd-50"}]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pgd_eval(model, ds, threat, seed=0):
    r = evaluate(model, ds.x_test, ds.y_test, EVAL_ATTACKS, threat, batch_size=500, device="cpu", seed=seed)
    t = r.threats[0]
    return {"clean": r.clean_acc, "pgd-20": t.robust_acc("pgd-20"), "pgd-50": t.robust_acc("pgd-50"),
            "worst": t.worst_case_acc}


def robust_opts(args, activation: str, method: str = "pgd-at", work: Path = None, steps=...) -> RobustTraining:
    loop = TrainConfig(model="smallcnn", dataset="mnist-5k", activation=activation, epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, weight_decay=0.0,
                       seed=args.seed, val_size=500, device="cpu", out=str(work / f"smallcnn-{method}-{activation}.pt"))
    defense = MethodConfig(method, steps=args.steps if steps is ... else steps, eps_warmup=args.eps_warmup)
    return RobustTraining(loop, defense, eps=str(args.eps), val_steps=10, evaluate=False)


def time_epochs(args, ds, threat, work: Path):
    """Per-epoch training seconds of standard, fgsm-rs and pgd-at (k=7), interleaved
    (benchmarks/train_speed.py measures; this keeps the table's labels)."""
    labels = {"standard": "standard", "fgsm-rs": "fgsm-rs", "pgd-at:7": "pgd-at (k=7)"}
    secs = time_epochs_base(model="smallcnn", ds=ds, threat=threat, methods=list(labels), variant_list=["base"],
                            n=args.timing_n, batch_size=args.batch_size, repeats=args.timing_repeats, device="cpu",
                            work=work / "timing", lr=args.lr, optimizer=args.optimizer, seed=args.seed,
                            log=lambda m: log("timing" + m))
    best = {labels[m]: min(v) for (_, m), v in secs.items()}
    return {labels[m]: {"seconds": best[labels[m]], "all": v, "ratio": best[labels[m]] / best["standard"]}
            for (_, m), v in secs.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/defense_table.md", help="Markdown table to write.")
    p.add_argument("--work-dir", default=".bench/defense_table")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=7, help="Inner PGD steps of PGD-AT (alpha = 2.5 eps / steps).")
    p.add_argument("--eps-warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--activations", default=",".join(ACTIVATIONS))
    p.add_argument("--methods", default="fgsm-rs",
                   help="Other defenses trained (ReLU, same budget) for the first table: fgsm-rs,trades,mix.")
    p.add_argument("--timing-n", type=int, default=1024, help="Images per timed epoch.")
    p.add_argument("--timing-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", default=None,
                   help="JSON of an earlier run (written next to --out): keep its rows, recompute only --redo.")
    p.add_argument("--redo", default="",
                   help="With --reuse: rows to recompute, e.g. fgsm-rs,timing (names: standard, an activation, "
                        "a method, timing).")
    p.add_argument("--render-only", action="store_true", help="With --reuse: only re-render the markdown.")
    args = p.parse_args(argv)
    old = json.loads(Path(args.reuse).read_text()) if args.reuse else None
    redo = {r.strip() for r in args.redo.split(",") if r.strip()}

    def reused(section, key=None):
        """The earlier run's row, unless it is to be recomputed (None: compute it)."""
        if old is None or (key or section) in redo:
            return None
        got = old.get(section)
        if key is not None:
            got = (got or {}).get(key)
        return got

    torch.set_num_threads(args.threads)
    work = ensure_dir(args.work_dir)
    ds = load_dataset("mnist-5k")
    threat = ThreatModel("linf", args.eps)
    t_start = time.time()
    report = {"args": vars(args), "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    if args.render_only:
        if old is None:
            p.error("--render-only needs --reuse")
        out = Path(args.out)
        atomic_write_text(out, render(old, argparse.Namespace(**{**vars(args), **old["args"]})))
        print(out.read_text())
        return 0

    # 1. standard training (the zoo baseline budget for smallcnn)
    from robustbench_lite.zoo import baseline_config

    report["standard"] = reused("standard")
    if report["standard"] is None:
        log("standard training (zoo baseline budget)")
        cfg = baseline_config("smallcnn", "mnist-5k", work / "smallcnn-standard.pt", seed=args.seed, device="cpu")
        std = train(cfg, dataset=ds, narrator=SILENT)
        report["standard"] = {**pgd_eval(std.model, ds, threat), "epochs": cfg.epochs,
                              "epoch_s": sum(r["seconds"] for r in std.metrics) / len(std.metrics)}
    log(f"standard: {report['standard']}")

    # 2. PGD-AT with each activation, same budget
    report["pgd_at"] = {}
    for act in [a.strip() for a in args.activations.split(",") if a.strip()]:
        if reused("pgd_at", act) is not None:
            report["pgd_at"][act] = reused("pgd_at", act)
            continue
        log(f"pgd-at with {act}: {args.epochs} epochs, {args.steps} steps")
        rep = run_robust_training(robust_opts(args, act, work=work), SILENT)
        res = rep.result
        row = pgd_eval(res.model, ds, threat)
        row.update(epochs=len(res.metrics), best_epoch=rep.best_epoch,
                   val_pgd=[round(r.get("val_pgd_acc", float("nan")), 4) for r in res.metrics],
                   epoch_s=sum(r["seconds"] for r in res.metrics) / len(res.metrics))
        report["pgd_at"][act] = row
        log(f"pgd-at {act}: {row}")

    # 3. other defenses, same budget, ReLU
    report["methods"] = {}
    for meth in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if reused("methods", meth) is not None:
            report["methods"][meth] = reused("methods", meth)
            continue
        log(f"{meth}: {args.epochs} epochs")
        over = {"steps": None} if meth in ("fgsm-rs", "mix") else {}  # their own one step
        rep = run_robust_training(robust_opts(args, "relu", method=meth, work=work, **over), SILENT)
        res = rep.result
        row = pgd_eval(res.model, ds, threat)
        row.update(epochs=len([r for r in res.metrics if not r.get("rolled_back")]), best_epoch=rep.best_epoch,
                   stopped=res.stopped, epoch_s=sum(r["seconds"] for r in res.metrics) / len(res.metrics))
        report["methods"][meth] = row
        log(f"{meth}: {row}")

    # 4. epoch-time ratios
    report["timing"] = reused("timing")
    if report["timing"] is None:
        log("epoch timing (interleaved)")
        report["timing"] = time_epochs(args, ds, threat, work)
    report["total_s"] = time.time() - t_start + (old.get("total_s", 0.0) if old else 0.0)
    if old:
        report["reused_from"] = args.reuse
        report["redone"] = sorted(redo)

    md = render(report, args)
    out = Path(args.out)
    ensure_dir(out.parent)
    atomic_write_text(out, md)
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2, default=str))
    print(md)
    log(f"wrote {out} and {out.with_suffix('.json')} in {report['total_s'] / 60:.1f} min")
    return 0


def _pct(v) -> str:
    return f"{100 * v:.1f}"


def render(report, args) -> str:
    s = report["standard"]
    eps = f"{args.eps:g}"
    lines = [
        "# Defense table (mnist-5k, smallcnn, L-inf eps = %s, CPU)" % eps,
        "",
        "Accuracy (%%) on the 1,000 mnist-5k test images; PGD-k: k steps of 2.5 eps / k from a uniform random "
        "start, 1 restart. Generated by `benchmarks/defense_table.py` (torch %s, %d threads, %.0f min in all)."
        % (report["torch"], args.threads, report["total_s"] / 60),
        "",
        "## Standard vs adversarial training",
        "",
        "| model | training | clean | PGD-20 | PGD-50 |",
        "|---|---|---:|---:|---:|",
        f"| smallcnn | standard ({s['epochs']} epochs, SGD) | {_pct(s['clean'])} | {_pct(s['pgd-20'])} | "
        f"{_pct(s['pgd-50'])} |",
    ]
    at = report["pgd_at"]
    if "relu" in at:
        r = at["relu"]
        lines.append(f"| smallcnn | pgd-at, k={args.steps} ({r['epochs']} epochs) | {_pct(r['clean'])} | "
                     f"{_pct(r['pgd-20'])} | {_pct(r['pgd-50'])} |")
    notes = []
    for meth, r in report.get("methods", {}).items():
        if r.get("stopped"):
            notes.append(f"{meth}: {r['stopped']}.")
            what = f"stopped by the collapse guard, {r['epochs']} epoch{'s' if r['epochs'] != 1 else ''} kept"
        else:
            what = f"{r['epochs']} epochs"
        lines.append(f"| smallcnn | {meth} ({what}) | {_pct(r['clean'])} | {_pct(r['pgd-20'])} | "
                     f"{_pct(r['pgd-50'])} |")
    if notes:
        lines += [""] + notes
    lines += ["", f"Adversarial rows: {args.epochs} epochs of {args.optimizer} (lr {args.lr:g}, cosine), batch "
              f"{args.batch_size}, eps ramped over the first {args.eps_warmup} epochs, BatchNorm-free smallcnn; "
              f"last-epoch model (for a run stopped by the catastrophic-overfitting guard: the epoch it rolled "
              f"back to)."]
    lines += [
        "",
        "## Smooth Adversarial Training: activations under the same budget",
        "",
        f"PGD-AT, k={args.steps} inner steps of 2.5 eps / k, eps ramped over the first {args.eps_warmup} epochs, "
        f"{args.epochs} epochs of {args.optimizer} (lr {args.lr:g}, cosine), batch {args.batch_size}, seed "
        f"{args.seed}; 3,500 training images (500 held out for validation). Last-epoch model; *best epoch* is the "
        f"one validation PGD-10 accuracy picks (robust early stopping).",
        "",
        "*s / epoch* is wall time on a machine shared with other jobs (their load varied during the run), so "
        "it does not compare the activations' cost; the timing section below is measured interleaved.",
        "",
        "| activation | clean | PGD-20 | PGD-50 | best epoch | validation PGD-10 per epoch | s / epoch |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for act, r in at.items():
        vals = " ".join(_pct(v) for v in r["val_pgd"])
        lines.append(f"| {act} | {_pct(r['clean'])} | {_pct(r['pgd-20'])} | {_pct(r['pgd-50'])} | "
                     f"{r['best_epoch']} | {vals} | {r['epoch_s']:.1f} |")
    t = report["timing"]
    lines += [
        "",
        "## Epoch time relative to standard training",
        "",
        f"Same {args.timing_n} images, batch {args.batch_size}, methods interleaved, best of "
        f"{args.timing_repeats} epochs each (training only; validation excluded).",
        "",
        "| method | s / epoch | x standard | target |",
        "|---|---:|---:|---:|",
    ]
    targets = {"standard": "", "fgsm-rs": "<= 2.3", "pgd-at (k=7)": "<= 8.8"}
    for name, v in t.items():
        lines.append(f"| {name} | {v['seconds']:.2f} | {v['ratio']:.2f} | {targets.get(name, '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
