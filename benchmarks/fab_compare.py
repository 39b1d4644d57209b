"""FAB-T against the reference: our fab-t and pyautoattack's FABAttack_PT (targeted, as AutoAttack's
standard version runs it: 100 iterations, 9 target classes, 1 restart) on the same model, images
and threat models. Prints per threat model the robust accuracy of each (float32 predictions, inside
the threat model), the difference in samples and percentage points, the samples on which they
disagree, the mean perturbation norm on the samples both fool, and the process CPU time of each
with its ratio (process time: on a shared CPU other processes inflate it much less than wall time;
--reference-first swaps the order of the two runs).

    python benchmarks/fab_compare.py --checkpoint results/smallcnn.pt --n 200
    python benchmarks/fab_compare.py --threats linf:0.1,l2:1.0 --json results/bench_fab_compare.json

Without --checkpoint a standard smallcnn is trained on mnist-5k for 2 epochs (the test suite's
model). Our fab-t runs with its defaults (early stop: a sample leaves at its first fooling point
within eps); --no-early-stop runs it to the end as the reference does (the norms then compare too).
Not a test: numbers are printed, never asserted (tests/test_fab.py asserts the agreement).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from common import machine, write_json  # noqa: E402

import attacks  # noqa: E402
from robustbench_lite.checkpoint import model_from_checkpoint  # noqa: E402
from robustbench_lite.data import load_dataset  # noqa: E402
from robustbench_lite.evaluator import predict  # noqa: E402
from robustbench_lite.runtime import SILENT  # noqa: E402
from robustbench_lite.threat import ThreatModel, parse_eps  # noqa: E402
from robustbench_lite.training import TrainConfig, train  # noqa: E402

REF_NORM = {"linf": "Linf", "l2": "L2"}


def load_model(checkpoint: str, dataset):
    if not checkpoint:
        checkpoint = str(Path(tempfile.mkdtemp()) / "smallcnn-mnist-5k-standard.pt")
        train(TrainConfig(model="smallcnn", dataset="mnist-5k", epochs=2, out=checkpoint, device="cpu", seed=0),
              dataset=dataset, narrator=SILENT)
    model, _ = model_from_checkpoint(checkpoint, "smallcnn", dataset)
    return model.eval()


def cpu_timed(fn: Callable[[], torch.Tensor]):
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def robust(model, threat: ThreatModel, x_adv, x, y) -> torch.Tensor:
    return (predict(model, x_adv) == y) & ~threat.violations(x_adv, x)


def compare(model, x, y, threat: ThreatModel, args) -> Dict:
    from pyautoattack.fab_pt import FABAttack_PT  # the optional reference

    ours = attacks.create("fab-t", threat=threat, steps=args.steps, n_target_classes=args.targets,
                          early_stop=not args.no_early_stop, seed=args.seed)
    ref = FABAttack_PT(model, norm=REF_NORM[threat.norm], n_restarts=1, n_iter=args.steps, eps=threat.eps,
                       targeted=True, n_target_classes=args.targets, seed=args.seed, device=x.device)
    runs = {"ours": lambda: ours(model, x, y), "reference": lambda: ref.perturb(x, y)}
    order = ["reference", "ours"] if args.reference_first else ["ours", "reference"]
    done = {k: cpu_timed(runs[k]) for k in order}
    r_ours, r_ref = (robust(model, threat, done[k][0], x, y) for k in ("ours", "reference"))
    both = ~r_ours & ~r_ref
    norms = [float(threat.distance(done[k][0], x)[both].mean()) if both.any() else float("nan")
             for k in ("ours", "reference")]
    n = len(x)
    return dict(threat=str(threat), n=n, robust_ours=int(r_ours.sum()), robust_reference=int(r_ref.sum()),
                diff_samples=int(r_ours.sum() - r_ref.sum()), diff_pp=100.0 * float(r_ours.sum() - r_ref.sum()) / n,
                only_ours_robust=int((r_ours & ~r_ref).sum()), only_reference_robust=int((r_ref & ~r_ours).sum()),
                mean_norm_ours=norms[0], mean_norm_reference=norms[1],
                cpu_s_ours=done["ours"][1], cpu_s_reference=done["reference"][1],
                time_ratio=done["ours"][1] / max(done["reference"][1], 1e-9))


def main(argv=None) -> List[Dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="", help="a smallcnn checkpoint for mnist-5k (default: train one)")
    ap.add_argument("--n", type=int, default=200, help="test images (the first n of mnist-5k's test split)")
    ap.add_argument("--threats", default="linf:0.1,l2:1.0", help="norm:eps pairs, comma-separated")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--targets", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-early-stop", action="store_true", help="run our walks to the end, as the reference")
    ap.add_argument("--reference-first", action="store_true", help="run the reference before ours")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    ds = load_dataset("mnist-5k")
    model = load_model(args.checkpoint, ds)
    x, y = ds.x_test[:args.n], ds.y_test[:args.n]
    rows = []
    for item in args.threats.split(","):
        norm, eps = item.split(":")
        row = compare(model, x, y, ThreatModel(norm.strip(), parse_eps(eps)), args)
        print(f"{row['threat']:>10}  robust: ours {row['robust_ours']}/{row['n']}, reference "
              f"{row['robust_reference']}/{row['n']} ({row['diff_samples']:+d} samples, {row['diff_pp']:+.2f} pp; "
              f"disagree {row['only_ours_robust']}+{row['only_reference_robust']})  mean norm ours "
              f"{row['mean_norm_ours']:.4f} ref {row['mean_norm_reference']:.4f}  cpu s: ours "
              f"{row['cpu_s_ours']:.1f} ref {row['cpu_s_reference']:.1f} (ratio {row['time_ratio']:.2f})", flush=True)
        rows.append(row)
    if args.json:
        write_json(Path(args.json), {"machine": machine(), "args": vars(args), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
