"""Training speed: each method's epoch time relative to a standard epoch, what each fast-path flag
buys, data-parallel runs, and the fast-AT recipe end to end.

1. Epoch ratios. For --model on --dataset: one training epoch of --n images (batch --batch-size)
   with each method of --methods under each fast-path variant of --variants; methods and variants
   interleaved, best of --repeats (a shared machine disturbs some epochs: the minimum is the least
   disturbed). Printed per row: seconds, images/s, ratio to the standard epoch of the same variant
   (the adversarial methods' cost: an inner attack of k steps costs about k extra forward+backward
   passes, so pgd-at k=7 ~ 8x and fgsm-rs ~ 2x plus the clean-metrics forward), and the speed-up of
   the variant over base for the same method. With compile the first epoch (compilation) is run
   and dropped. Training only: the per-epoch evaluation is on 256 test images and outside the time.
2. --fast-at EPOCHS: fast adversarial training as Wong, Rice & Kolter 2020 ("Fast is better than
   free") run it on CIFAR-10: fgsm-rs with alpha = 10/255 from a uniform random start, eps 8/255,
   SGD (momentum 0.9, weight decay 5e-4), cyclic learning rate peaking at 0.2, batch 128, random
   crop + flip, no eps warm-up; then clean and PGD-(--eval-steps, --eval-restarts) accuracy on the
   test split. Reference: preact-resnet18, 15 epochs, 12 minutes on one older GPU, 86.1% clean /
   46.1% PGD-50 (10 restarts).

    python benchmarks/train_speed.py --device cpu --json results/bench_train_speed.json
    python benchmarks/train_speed.py --device cuda --model preact-resnet18 --dataset npz:.bench/cifar10.npz \\
        --n-images 10000 --batch-size 128 --variants base,bf16,channels_last,bf16+channels_last,compile \\
        --fast-at 15 --fast-at-variant bf16+channels_last --json results/bench_train_speed_gpu.json
    torchrun --standalone --nproc-per-node 2 benchmarks/train_speed.py ...   # DDP: rank 0 reports

Not a test: speed is printed, never asserted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from common import is_main, machine, variant_flags, variants, write_json  # noqa: E402

from defenses.methods import MethodConfig  # noqa: E402
from robustbench_lite.data import load_dataset  # noqa: E402
from robustbench_lite.runs import RobustTraining, run_robust_training  # noqa: E402
from robustbench_lite.runtime import SILENT, FastPaths  # noqa: E402
from robustbench_lite.threat import ThreatModel, parse_eps  # noqa: E402
from robustbench_lite.training import TrainConfig, train  # noqa: E402

METHOD_SPECS = {"standard": ("standard", {}), "fgsm-rs": ("fgsm-rs", {}), "pgd-at": ("pgd-at", {"steps": 7}),
                "trades": ("trades", {"steps": 7}), "mix": ("mix", {})}


def say(msg: str) -> None:
    if is_main():
        print(msg, flush=True)


def method_factory(name: str, threat, seed: int):
    base, _, steps = name.partition(":")  # e.g. pgd-at:10 = 10 inner steps
    key, default = METHOD_SPECS.get(base, (base, {}))
    kw = {**default, **({"steps": int(steps)} if steps else {})}
    config = MethodConfig(key, seed=seed, eps_warmup=0, **kw)
    return lambda: config.build(threat, epochs=1)


def time_epochs(*, model: str, ds, threat, methods, variant_list, n: int, batch_size: int, repeats: int,
                device: str, work: Path, lr: float = 1e-3, optimizer: str = "adam", seed: int = 0,
                log=say):
    """{(variant, method): [seconds of each repeat]} for one training epoch of ``n`` images."""
    makers = {m: method_factory(m, threat, seed) for m in methods}
    secs = {(v, m): [] for v in variant_list for m in methods}
    x_small, y_small = ds.x_test[:256], ds.y_test[:256]
    for rep in range(repeats):
        for v in variant_list:
            flags = variant_flags(v)
            for m, make in makers.items():
                cfg = TrainConfig(model=model, dataset=ds.name, epochs=2 if flags["compile"] else 1,
                                  batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=0.0, seed=seed,
                                  n_train=n, out=str(work / f"{v}-{m.replace(':', '-')}.pt"), device=device,
                                  augment=ds.in_channels == 3, fast=FastPaths(**flags))
                res = train(cfg, make(), dataset=ds, narrator=SILENT, x_val=x_small, y_val=y_small)
                secs[(v, m)].append(float(res.metrics[-1]["seconds"]))
                log(f"  repeat {rep + 1}/{repeats}  {v:24s} {m:10s} {secs[(v, m)][-1]:8.2f} s")
    return secs


def epoch_rows(secs, n: int, methods, variant_list):
    best = {k: min(v) for k, v in secs.items()}
    rows = []
    for v in variant_list:
        std = best.get((v, "standard"))
        for m in methods:
            s = best[(v, m)]
            base = best.get(("base", m))
            rows.append(dict(variant=v, method=m, seconds=s, images_per_s=n / s, all_seconds=secs[(v, m)],
                             ratio_to_standard=(s / std) if std else None,
                             speedup_vs_base=(base / s) if base else None))
    return rows


def print_epoch_table(rows, n: int, batch_size: int, world: int) -> None:
    say(f"\none epoch of {n} images, batch {batch_size} (global), {world} process(es); best of repeats")
    say(f"{'variant':24s} {'method':10s} {'seconds':>9s} {'img/s':>9s} {'x standard':>11s} {'x base':>8s}")
    for r in rows:
        ratio = f"{r['ratio_to_standard']:.2f}" if r["ratio_to_standard"] is not None else "-"
        speed = f"{r['speedup_vs_base']:.2f}" if r["speedup_vs_base"] is not None else "-"
        say(f"{r['variant']:24s} {r['method']:10s} {r['seconds']:9.2f} {r['images_per_s']:9.1f} {ratio:>11s} "
            f"{speed:>8s}")


def fast_at(args, ds, work: Path):
    """The fast-AT recipe end to end: wall time, clean and PGD accuracy on the test split."""
    flags = variant_flags(args.fast_at_variant)
    colour = ds.in_channels == 3
    loop = TrainConfig(model=args.model, dataset=args.dataset, epochs=args.fast_at, batch_size=128, lr=0.2,
                       optimizer="sgd", schedule="cyclic", weight_decay=5e-4, augment=colour, seed=args.seed,
                       n_train=args.fast_at_n, val_size=1000, device=args.device, out=str(work / "fast-at.pt"),
                       fast=FastPaths(**flags))
    defense = MethodConfig("fgsm-rs", alpha=parse_eps("10/255" if colour else "0.375"), eps_warmup=0)
    run = RobustTraining(loop, defense, eps="8/255" if colour else "0.3", val_steps=10, evaluate=True,
                         eval_steps=args.eval_steps, n_eval=args.n_eval, results_dir=str(work / "results"))
    t0 = time.perf_counter()
    rep = run_robust_training(run, SILENT)
    wall = time.perf_counter() - t0
    train_s = sum(float(r["seconds"]) for r in rep.result.metrics)
    row = dict(model=args.model, dataset=ds.name, variant=args.fast_at_variant, epochs=args.fast_at,
               n_train=args.fast_at_n or len(ds.y_train) - 1000, wall_seconds=wall, train_seconds=train_s,
               stopped=rep.result.stopped, eval_steps=args.eval_steps, n_eval=args.n_eval)
    for label, record in rep.evaluations.items():
        r = record.result
        row[f"{label}_clean_acc"] = r.clean_acc
        row[f"{label}_pgd_acc"] = r.threats[0].robust_acc("pgd")
    say(f"\nfast AT ({args.model}, {args.fast_at} epochs, {args.fast_at_variant}): wall {wall / 60:.1f} min "
        f"(training loop {train_s / 60:.1f} min); final clean {row.get('final_clean_acc', float('nan')):.2%}, "
        f"PGD-{args.eval_steps} {row.get('final_pgd_acc', float('nan')):.2%} on {args.n_eval} test images"
        + (f"; stopped: {rep.result.stopped}" if rep.result.stopped else "")
        + "  [Wong et al. 2020: 12 min, 86.1% / 46.1% PGD-50x10]")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--dataset", default="mnist-5k")
    p.add_argument("--eps", default=None, help="default: 0.3 for 1-channel data, 8/255 for colour")
    p.add_argument("--n-images", "--n", dest="n", type=int, default=1024,
                   help="images per timed epoch (under torchrun spell it --n-images: torchrun takes --n)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--methods", default="standard,fgsm-rs,pgd-at",
                   help="comma-separated; pgd-at:K sets K inner steps (pgd-at means K=7)")
    p.add_argument("--variants", default="base", help="base, bf16, channels_last, compile, or '+' of them")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on CPU (0: default)")
    p.add_argument("--fast-at", type=int, default=0, metavar="EPOCHS", help="also run the fast-AT recipe")
    p.add_argument("--fast-at-n", type=int, default=None, help="fast AT on a subset of the training split")
    p.add_argument("--fast-at-variant", default="base")
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--skip-epochs", action="store_true", help="only --fast-at")
    p.add_argument("--work-dir", default=".bench/train_speed")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variant_list = variants(args.variants)
    variant_flags(args.fast_at_variant)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "standard" not in methods:
        methods.insert(0, "standard")
    ds = load_dataset(args.dataset)
    eps = args.eps or ("0.3" if ds.in_channels == 1 else "8/255")
    threat = ThreatModel("linf", parse_eps(eps))
    work = Path(args.work_dir)
    report = dict(machine=machine(), args=vars(args) | {"json": str(args.json)}, epochs=None, fast_at=None)
    if not args.skip_epochs:
        say(f"timing {args.model} on {ds.name}, {threat}: methods {', '.join(methods)}; variants "
            f"{', '.join(variant_list)}")
        secs = time_epochs(model=args.model, ds=ds, threat=threat, methods=methods, variant_list=variant_list,
                           n=args.n, batch_size=args.batch_size, repeats=args.repeats, device=args.device,
                           work=work, lr=args.lr, optimizer=args.optimizer, seed=args.seed)
        report["epochs"] = epoch_rows(secs, args.n, methods, variant_list)
        print_epoch_table(report["epochs"], args.n, args.batch_size, report["machine"]["world_size"])
    if args.fast_at:
        report["fast_at"] = fast_at(args, ds, work)
    if args.json and is_main():
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
