"""How close the attack engine runs to its floor, and what early stopping buys.

1. Engine overhead and throughput. For each of --models (default smallcnn on 1x28x28 and resnet18
   on 3x32x32; random weights: only the ratio matters), time PGD-k over N images with early
   stopping OFF and divide by the floor, k x (one forward + one backward to the input) on the same
   batches, under each fast-path variant of --variants (the floor runs with the same flags).
   Prints images/s, the ratio (target <= 1.05) and the speed-up over base. The labels are the
   model's own clean predictions, so every sample starts correctly classified.
2. Early stopping. smallcnn trained for one epoch on mnist-5k (a standard, non-robust model):
   PGD-k images/s with early stopping ON vs OFF. Most samples are fooled in a few steps and leave
   the batch, so the target is >= 5x.
3. Side by side with torchattacks (installed): FGSM and PGD-k (early stopping OFF) on one batch of
   --n-side (2,048) MNIST images that the trained smallcnn of part 2 classifies correctly (the
   samples an evaluation attacks), each as a ratio to the floor (1 resp. k x forward + backward).
   Ours is timed as the evaluator runs an attack (the attack, the threat-model check, the float32
   predictions it records: evaluator._attack_batch); torchattacks bare and with the prediction of
   its output that an evaluation needs. Run it on two checkouts (interleaved) to compare them.
4. Square Attack (--square): on the same trained smallcnn, the time per query over one no-grad
   forward of the same batch (early stopping off: every sample every query), then our square and
   the reference's (pyautoattack's SquareAttack, as AutoAttack's standard runs it) with early
   stopping on the same clean-correct images: robust accuracy and seconds of each.

    python benchmarks/attack_speed.py --device cpu --n 128 --json results/bench_attack_speed.json
    python benchmarks/attack_speed.py --models '' --no-early-stopping --side-by-side --repeats 5
    python benchmarks/attack_speed.py --device cuda --models resnet18,preact-resnet18 --n-resnet 4096 \
        --batch-size 512 --variants base,bf16,channels_last,bf16+channels_last,compile --json ...
    python benchmarks/attack_speed.py --models "" --no-early-stopping --square --eps-trained 0.15   # part 4 only

Not a test: speed is printed as ratios, never asserted.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from common import input_gradient_passes, sync, variant_flags, variants  # noqa: E402

import attacks  # noqa: E402
from robustbench_lite import evaluator  # noqa: E402
from robustbench_lite.models import create_model  # noqa: E402
from robustbench_lite.runtime import accelerate, to_memory_format  # noqa: E402
from robustbench_lite.threat import ThreatModel  # noqa: E402


def build_model(name: str, in_channels: int, size: int, mean, std) -> nn.Module:
    return create_model(name, in_channels=in_channels, num_classes=10, input_size=size, mean=mean, std=std)


CLOCK = "wall"  # set in main(): "cpu" = this process's CPU time (time.process_time)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of ``fn()`` on the chosen clock. On a shared CPU, process CPU time is what
    other processes cannot inflate much; on CUDA only wall time (with syncs) is meaningful."""
    clock = time.process_time if CLOCK == "cpu" else time.perf_counter
    sync(device)
    t0 = clock()
    fn()
    sync(device)
    return clock() - t0


def batches(n: int, bs: int) -> List[slice]:
    return [slice(i, min(i + bs, n)) for i in range(0, n, bs)]


def floor_fn(model, x, y, steps, bs, amp=None) -> Callable[[], None]:
    """k x (forward + backward to the input): the lower bound (under the same autocast as the attack)."""
    return lambda: input_gradient_passes(model, x, y, bs, amp, passes=steps)


def attack_fn(model, attack, x, y, bs) -> Callable[[], torch.Tensor]:
    def run():
        return torch.cat([attack(model, x[s], y[s], sample_ids=torch.arange(s.start, s.stop, device=x.device))
                          for s in batches(len(x), bs)])

    return run


def best_of(fns: Dict[str, Callable[[], object]], device, repeats: int):
    """Min over ``repeats`` interleaved runs, after one warm-up run each (whose outputs are
    returned): the minimum is what is robust to other processes on a shared CPU."""
    outputs = {k: f() for k, f in fns.items()}
    times: Dict[str, List[float]] = {k: [] for k in fns}
    order = list(fns)
    for i in range(repeats):
        for k in (order if i % 2 == 0 else order[::-1]):  # alternate the order: no position bias
            times[k].append(timed(fns[k], device))
    return {k: min(v) for k, v in times.items()}, outputs


def input_shape(name: str):
    return (1, 28) if name in ("smallcnn", "lenet") else (3, 32)


def overhead(args, device) -> List[Dict]:
    """PGD-k images/s and its ratio to the k x (forward+backward) floor, per model and fast-path
    variant (each variant's floor runs with the same flags)."""
    rows = []
    for name in args.models:
        c, size = input_shape(name)
        n = args.n if c == 1 else args.n_resnet
        torch.manual_seed(0)
        net = build_model(name, c, size, (0.5,) * c, (0.25,) * c).to(device).eval()
        x0 = torch.rand(n, c, size, size, device=device)
        with torch.no_grad():
            y = torch.cat([net(x0[s]).argmax(1) for s in batches(n, args.batch_size)])
        threat = ThreatModel("linf", args.eps_random)
        base_seconds = None
        for v in args.variants:
            flags = variant_flags(v)
            model = accelerate(net, device, channels_last=flags["channels_last"], compile=flags["compile"])
            x = to_memory_format(x0, flags["channels_last"])
            amp = flags["amp"]
            fns = {
                "floor": floor_fn(model, x, y, args.steps, args.batch_size, amp),
                "pgd keep=first-fool": attack_fn(model, attacks.create("pgd", threat=threat, steps=args.steps,
                                                                       early_stop=False, amp=amp),
                                                 x, y, args.batch_size),
            }
            if v == "base":
                fns["pgd keep=last (training)"] = attack_fn(
                    model, attacks.create("pgd", threat=threat, steps=args.steps, early_stop=False, keep="last"),
                    x, y, args.batch_size)
            t, _ = best_of(fns, device, args.repeats)
            for k in fns:
                if k == "floor":
                    continue
                if k == "pgd keep=first-fool" and base_seconds is None:
                    base_seconds = t[k]
                rows.append(dict(model=name, input=f"{c}x{size}x{size}", n=n, steps=args.steps,
                                 variant=k if v == "base" else f"{v}: {k}", fast_path=v, seconds=t[k],
                                 floor_seconds=t["floor"], ratio=t[k] / t["floor"], images_per_s=n / t[k],
                                 speedup_vs_base=(base_seconds / t[k]) if base_seconds else None))
    return rows


def train_one_epoch(device):
    from robustbench_lite.data import load_dataset
    from robustbench_lite.models import model_for_dataset

    ds = load_dataset("mnist-5k")
    torch.manual_seed(0)
    model = model_for_dataset("smallcnn", ds).to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    xtr, ytr = ds.x_train.to(device), ds.y_train.to(device)
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0)).to(device)
    model.train()
    for i in range(0, len(ytr), 100):
        b = perm[i:i + 100]
        loss = F.cross_entropy(model(xtr[b]), ytr[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), ds.x_test.to(device), ds.y_test.to(device)


def early_stopping(args, device) -> List[Dict]:
    try:
        model, x, y = train_one_epoch(device)
    except Exception as exc:  # no dataset / models yet: skip this part
        print(f"(early-stopping part skipped: {exc})")
        return []
    x, y = x[:args.n], y[:args.n]
    threat = ThreatModel("linf", args.eps_trained)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    rows = []
    fns = {f"early_stop={es}": attack_fn(model, attacks.create("pgd", threat=threat, steps=args.steps_trained,
                                                               early_stop=es), x, y, args.batch_size)
           for es in (False, True)}
    t, x_adv = best_of(fns, device, args.repeats)
    for es in (False, True):
        k = f"early_stop={es}"
        with torch.no_grad():
            robust = float((model(x_adv[k]).argmax(1) == y).float().mean())
        rows.append(dict(model="smallcnn (1 epoch, mnist-5k)", eps=args.eps_trained, n=len(y),
                         steps=args.steps_trained, variant=k, seconds=t[k], images_per_s=len(y) / t[k],
                         clean_accuracy=clean, robust_accuracy=robust,
                         speedup=t["early_stop=False"] / t[k]))
    return rows


def correct_mnist(model, n: int, device):
    """The first ``n`` mnist-5k images (test split, then train) that ``model`` classifies correctly."""
    from robustbench_lite.data import load_dataset

    ds = load_dataset("mnist-5k")
    x, y = torch.cat([ds.x_test, ds.x_train]).to(device), torch.cat([ds.y_test, ds.y_train]).to(device)
    with torch.no_grad():
        ok = torch.cat([model(x[s]).argmax(1) == y[s] for s in batches(len(y), 1024)])
    return x[ok][:n], y[ok][:n]


def side_by_side(args, device) -> List[Dict]:
    """Part 3: ours (as the evaluator runs it) and torchattacks, FGSM and PGD-k, ratio to the floor."""
    import torchattacks

    model, _, _ = train_one_epoch(device)
    x, y = correct_mnist(model, args.n_side, device)
    ids, threat, eps = torch.arange(len(y), device=device), ThreatModel("linf", args.eps_trained), args.eps_trained
    rows = []
    for name, steps in (("fgsm", 1), (f"pgd-{args.steps}", args.steps)):
        if name == "fgsm":
            ours, theirs = attacks.create("fgsm", threat=threat), torchattacks.FGSM(model, eps=eps)
        else:
            ours = attacks.create("pgd", threat=threat, steps=steps, early_stop=False)
            theirs = torchattacks.PGD(model, eps=eps, alpha=ours.settings.alpha, steps=steps, random_start=True)
        fns = {"floor": floor_fn(model, x, y, steps, len(y)),
               "ours": lambda: ours(model, x, y, sample_ids=ids),
               "ours + recorded predictions": lambda: evaluator._attack_batch(model, ours, name, threat, (x, y, ids),
                                                                               len(y)),
               "torchattacks": lambda: theirs(x, y),
               "torchattacks + predict": lambda: evaluator.predict(model, theirs(x, y), len(y))}
        t, _ = best_of(fns, device, args.repeats)
        rows += [dict(attack=name, n=len(y), variant=k, seconds=t[k], floor_seconds=t["floor"],
                      ratio=t[k] / t["floor"]) for k in fns if k != "floor"]
    return rows


def print_overhead(args, rows: List[Dict]) -> None:
    print(f"\n1. engine overhead: PGD-{args.steps} (early stopping OFF) / {args.steps} x (forward + backward "
          f"to the input)   target <= 1.05")
    print(f"{'model':16} {'input':9} {'n':>5} {'variant':40} {'attack s':>9} {'floor s':>9} {'ratio':>7} "
          f"{'img/s':>9} {'x base':>7}")
    for r in rows:
        sp = f"{r['speedup_vs_base']:.2f}" if r["speedup_vs_base"] else "-"
        print(f"{r['model']:16} {r['input']:9} {r['n']:5d} {r['variant']:40} {r['seconds']:9.3f} "
              f"{r['floor_seconds']:9.3f} {r['ratio']:7.3f} {r['images_per_s']:9.1f} {sp:>7}")
    worst = max(r["ratio"] for r in rows)
    print(f"worst ratio {worst:.3f} (target <= 1.05: {'met' if worst <= 1.05 else 'MISSED'})")


def print_early_stopping(args, es_rows: List[Dict]) -> None:
    r0 = es_rows[0]
    print(f"\n2. early stopping: PGD-{args.steps_trained} on {r0['model']}, linf eps={args.eps_trained:g}, "
          f"n={r0['n']}, clean accuracy {r0['clean_accuracy']:.3f}   target >= 5x")
    print(f"{'variant':18} {'seconds':>9} {'img/s':>9} {'robust acc':>11} {'speedup':>8}")
    for r in es_rows:
        print(f"{r['variant']:18} {r['seconds']:9.3f} {r['images_per_s']:9.1f} {r['robust_accuracy']:11.3f} "
              f"{r['speedup']:7.2f}x")
    speedup = es_rows[-1]["speedup"]
    print(f"early-stopping speedup {speedup:.2f}x (target >= 5x: {'met' if speedup >= 5 else 'MISSED'})")


def print_side_by_side(args, side_rows: List[Dict]) -> None:
    print(f"\n3. side by side with torchattacks: one batch of {side_rows[0]['n']} mnist-5k images the trained "
          f"smallcnn gets right, linf eps={args.eps_trained:g}, early stopping OFF; floor = k x (forward + "
          f"backward to the input)")
    print(f"{'attack':8} {'variant':30} {'seconds':>9} {'floor s':>9} {'ratio':>7}")
    for r in side_rows:
        print(f"{r['attack']:8} {r['variant']:30} {r['seconds']:9.3f} {r['floor_seconds']:9.3f} {r['ratio']:7.3f}")


# -- 4. Square Attack: the cost of a query, and the reference's Square side by side -----------------------
def forward_passes(model, x, bs, passes: int) -> Callable[[], None]:
    """``passes`` x one no-grad forward over x in batches: the floor of a score-based attack."""
    def run():
        with torch.no_grad():
            for s in batches(len(x), bs):
                for _ in range(passes):
                    model(x[s])

    return run


def square_speed(args, device) -> List[Dict]:
    """Square's seconds per query over one forward (early stopping off), then ours vs the reference's
    with early stopping: robust accuracy over the n images and seconds (one timed run each)."""
    from pyautoattack.square import SquareAttack  # the optional reference implementation

    model, x, y = train_one_epoch(device)
    x, y = x[:args.n_square], y[:args.n_square]
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    xc, yc = x[ok], y[ok]
    threat, q, bs = ThreatModel("linf", args.eps_trained), args.square_queries, args.batch_size
    k = args.square_ratio_queries
    no_stop = attacks.create("square", threat=threat, steps=k, early_stop=False)
    t, _ = best_of({"floor": forward_passes(model, xc, bs, k + 1), "square": attack_fn(model, no_stop, xc, yc, bs)},
                   device, args.repeats)
    rows = [dict(part="per query", n=len(yc), queries=k, seconds=t["square"], floor_seconds=t["floor"],
                 ratio=t["square"] / t["floor"])]
    ref = SquareAttack(model, norm="Linf", eps=threat.eps, n_queries=q, p_init=0.8, n_restarts=1, seed=0,
                       device=device, resc_schedule=False)
    ours = attacks.create("square", threat=threat, steps=q)
    for name, run in (("reference", lambda: ref.perturb(xc, yc)), ("ours", attack_fn(model, ours, xc, yc, bs))):
        out = {}
        seconds = timed(lambda: out.setdefault("x", run()), device)
        with torch.no_grad():
            robust = int((model(out["x"]).argmax(1) == yc).sum())
        rows.append(dict(part=name, n=len(y), clean=int(ok.sum()), queries=q, eps=threat.eps, seconds=seconds,
                         robust_accuracy=robust / len(y)))
    return rows


def print_square(args, rows: List[Dict]) -> None:
    r = rows[0]
    print(f"\n4. square: {r['queries'] + 1} queries (early stopping OFF) / {r['queries'] + 1} x one forward, "
          f"{r['n']} images: {r['seconds']:.3f}s / {r['floor_seconds']:.3f}s = ratio {r['ratio']:.3f}")
    print(f"   square vs the reference on smallcnn (1 epoch, mnist-5k), linf eps={args.eps_trained:g}, "
          f"{rows[1]['queries']} queries, n={rows[1]['n']} ({rows[1]['clean']} clean-correct)")
    print(f"   {'':10} {'robust acc':>11} {'seconds':>9}")
    for r in rows[1:]:
        print(f"   {r['part']:10} {r['robust_accuracy']:11.3f} {r['seconds']:9.1f}")
    print(f"   time ratio ours / reference {rows[2]['seconds'] / rows[1]['seconds']:.2f}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=256, help="images for smallcnn (and the trained model)")
    p.add_argument("--n-resnet", type=int, default=None, help="images for the 3x32x32 models (default: n // 16, "
                                                              ">= 8)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="k of PGD-k in the overhead part")
    p.add_argument("--steps-trained", type=int, default=40, help="k of PGD-k on the trained model")
    p.add_argument("--eps-random", type=float, default=8 / 255, help="L-inf eps for the random-weight models")
    p.add_argument("--eps-trained", type=float, default=0.3, help="L-inf eps on the trained smallcnn")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="smallcnn,resnet18", help="any registered models (smallcnn and lenet "
                                                                  "get 1x28x28 inputs, others 3x32x32)")
    p.add_argument("--variants", default="base", help="fast paths: base, bf16, channels_last, compile, or '+' "
                                                      "of them (comma-separated)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads on CPU (default 1: steadier timings on a shared machine; "
                        "0 = torch's choice)")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="auto: process CPU time on CPU (robust to other processes), wall time on CUDA")
    p.add_argument("--no-early-stopping", action="store_true", help="skip part 2")
    p.add_argument("--side-by-side", action="store_true", help="run part 3 (needs torchattacks)")
    p.add_argument("--n-side", type=int, default=2048, help="images of part 3 (one batch)")
    p.add_argument("--square", action="store_true", help="part 4: Square Attack (needs pyautoattack)")
    p.add_argument("--n-square", type=int, default=500, help="images of part 4")
    p.add_argument("--square-queries", type=int, default=1000, help="queries of ours and the reference's Square")
    p.add_argument("--square-ratio-queries", type=int, default=100, help="queries of the per-query ratio")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.variants = variants(args.variants)
    if args.n_resnet is None:
        args.n_resnet = max(8, args.n // 16)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = args.clock if args.clock != "auto" else ("cpu" if device.type == "cpu" else "wall")

    print(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"batch {args.batch_size} | best of {args.repeats} | clock {CLOCK}")
    parts = [("overhead", overhead, print_overhead, True),
             ("early_stopping", early_stopping, print_early_stopping, not args.no_early_stopping),
             ("side_by_side", side_by_side, print_side_by_side, args.side_by_side),
             ("square", square_speed, print_square, args.square)]
    figures = {}
    for key, run, show, wanted in parts:
        figures[key] = run(args, device) if wanted else []
        if figures[key]:
            show(args, figures[key])

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(device=str(device), clock=CLOCK, torch=torch.__version__, threads=torch.get_num_threads(),
                    python=platform.python_version(), batch_size=args.batch_size, repeats=args.repeats)
        args.json.write_text(json.dumps(dict(meta=meta, **figures), indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
