"""Evaluation throughput of the default suite (FGSM + BIM-10 + PGD-10 and the worst case), and
what each fast-path flag buys.

For each model it runs robustbench_lite.evaluator.evaluate exactly as `advbench attack` does and
prints images/s per attack and for the whole suite, plus the ratio of the suite's time to its
floor: (forward+backward passes the attacks actually ran, from the engine's counters) x (the time
of one forward+backward to the input per image, measured on the same device). A ratio near 1
means the evaluator and engine add nothing on top of the model's own cost.

    python benchmarks/eval_speed.py --device cpu
    python benchmarks/eval_speed.py --device cuda --models resnet18,preact-resnet18 \
        --dataset npz:data/cifar10.npz --variants base,bf16,channels_last,bf16+channels_last,compile

Models are trained quickly first (standard training, --train-epochs) so early stopping behaves as
on a real benchmark. Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import input_gradient_passes, sync, variants, variant_flags, write_json  # noqa: E402

from robustbench_lite.data import load_dataset  # noqa: E402
from robustbench_lite.evaluator import evaluate  # noqa: E402
from robustbench_lite.specs import parse_attack_specs  # noqa: E402
from robustbench_lite.runtime import SILENT, accelerate, resolve_device, to_memory_format  # noqa: E402
from robustbench_lite.threat import ThreatModel, parse_eps  # noqa: E402
from robustbench_lite.training import TrainConfig, train  # noqa: E402


def fwd_bwd_seconds_per_image(model, x, y, bs, amp, repeats=3):
    """Time of one forward+backward to the input per image (the attack step's floor)."""
    best = float("inf")
    for _ in range(repeats + 1):
        sync(x.device)
        t0 = time.perf_counter()
        input_gradient_passes(model, x, y, bs, amp)
        sync(x.device)
        best = min(best, time.perf_counter() - t0)
    return best / len(x)


def run_variant(name, net, ds, x, y, ids, device, variant, args):
    flags = variant_flags(variant)
    amp, cl, comp = flags["amp"], flags["channels_last"], flags["compile"]
    model = accelerate(net, device, channels_last=cl, compile=comp)
    xv = to_memory_format(x, cl)
    specs = parse_attack_specs([{"name": "fgsm", "amp": amp}, {"name": "bim", "steps": 10, "amp": amp},
                                {"name": "pgd", "steps": 10, "amp": amp}])
    threat = ThreatModel(args.norm, parse_eps(args.eps, args.norm))
    if comp:  # compile outside the timing
        evaluate(model, xv[:64], y[:64], specs, [threat], batch_size=args.batch_size, device=device,
                 sample_ids=ids[:64])
    sync(device)
    t0 = time.perf_counter()
    res = evaluate(model, xv, y, specs, [threat], batch_size=args.batch_size, device=device, sample_ids=ids)
    sync(device)
    total = time.perf_counter() - t0
    per_img = fwd_bwd_seconds_per_image(model, xv, y, args.batch_size, amp)
    tr = res.threats[0]
    fb = sum(a.stats.get("backward_samples", 0) for a in tr.attacks.values())
    fwd_only = sum(a.stats.get("forward_samples", 0) - a.stats.get("backward_samples", 0) for a in tr.attacks.values())
    floor = fb * per_img + (fwd_only + 2 * len(y)) * per_img / 3  # a forward alone ~ 1/3 of forward+backward
    row = dict(model=name, dataset=ds.name, variant=variant, device=str(device), n=len(y), eps=args.eps,
               clean_acc=res.clean_acc, worst_case_acc=tr.worst_case_acc, seconds=total,
               images_per_s=len(y) / total, floor_seconds=floor, ratio_to_floor=total / floor,
               fwd_bwd_ms_per_image=1000 * per_img)
    for lab, a in tr.attacks.items():
        row[f"{lab}_acc"] = tr.robust_acc(lab)
        row[f"{lab}_img_s"] = a.images_per_s
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--models", default="smallcnn")
    p.add_argument("--dataset", default="mnist-5k")
    p.add_argument("--eps", default=None, help="default: 0.1 for 1-channel data, 8/255 for colour")
    p.add_argument("--norm", default="linf")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--train-epochs", type=int, default=2)
    p.add_argument("--variants", default="base,channels_last,bf16")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on CPU (0: default)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    ds = load_dataset(args.dataset)
    if args.eps is None:
        args.eps = "0.1" if ds.in_channels == 1 else "8/255"
    x, y, ids = ds.subset("test", min(args.n, len(ds.y_test)), 0)
    x, y, ids = x.to(device), y.to(device), ids.to(device)
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        out = Path(".bench") / f"{name}-{ds.name.replace('/', '_').replace(':', '_')}.pt"
        t0 = time.perf_counter()
        cfg = TrainConfig(model=name, dataset=args.dataset, epochs=args.train_epochs, batch_size=128, out=str(out),
                          device=str(device), augment=ds.in_channels == 3)
        res = train(cfg, dataset=ds, narrator=SILENT)
        print(f"trained {name} on {ds.name} for {args.train_epochs} epochs in {time.perf_counter() - t0:.1f} s "
              f"(test acc {res.metrics[-1]['test_acc']:.2%})", flush=True)
        for variant in variants(args.variants):
            if "bf16" in variant and device.type == "cpu" and not torch.backends.mkldnn.is_available():
                continue
            rows.append(run_variant(name, res.model, ds, x, y, ids, device, variant, args))
            r = rows[-1]
            print(f"{name:16s} {variant:24s} {r['images_per_s']:8.1f} img/s  suite {r['seconds']:7.2f} s  "
                  f"floor {r['floor_seconds']:7.2f} s  ratio {r['ratio_to_floor']:.3f}  "
                  f"clean {r['clean_acc']:.2%}  worst {r['worst_case_acc']:.2%}", flush=True)
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
