"""Our `--suite standard` against the reference AutoAttack standard, side by side in one run.

For each of two PGD-trained models (trained here once by our own `train-robust` and cached in
--work-dir, git-ignored):

  mnist    smallcnn, PGD-AT on mnist-5k (4,000 real MNIST digits), L-inf eps 0.3, evaluated on the
           1,000 mnist-5k test images;
  cifar10  smallcnn, PGD-AT on the shared CIFAR-10 arrays (../shared/data/cifar10.npz: 4,000
           training images), L-inf eps 8/255, evaluated on its 1,000 test images;

it prints the robust accuracy and the wall time of our standard suite (APGD-CE, APGD-T, FAB-T,
Square as a cascade on survivors: robustbench_lite.evaluator.evaluate) and of the reference
(pyautoattack's AutoAttack(version='standard').run_standard_evaluation) on the same model, images
and threat model, their difference in percentage points, and the time ratio (ours / reference) in
wall time and in process CPU time (steadier on a shared machine); then, for each side, the robust
accuracy after each attack of the cascade and that attack's seconds (the reference's from its log).

    .venv/bin/python benchmarks/autoattack_compare.py --json results/autoattack_compare.json
    .venv/bin/python benchmarks/autoattack_compare.py --models mnist --n 200    # quicker
    .venv/bin/python benchmarks/autoattack_compare.py --device cuda              # on a GPU

Not a test: the numbers are printed, never asserted. Needs the optional extra:
pip install 'advbench[autoattack]'.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import sync  # noqa: E402
from defenses.methods import MethodConfig  # noqa: E402
from robustbench_lite.checkpoint import model_from_checkpoint  # noqa: E402
from robustbench_lite.data import load_dataset  # noqa: E402
from robustbench_lite.evaluator import evaluate  # noqa: E402
from robustbench_lite.fileio import atomic_write_text, ensure_dir  # noqa: E402
from robustbench_lite.runs import RobustTraining, run_robust_training  # noqa: E402
from robustbench_lite.runtime import SILENT  # noqa: E402
from robustbench_lite.specs import suite_attack_specs  # noqa: E402
from robustbench_lite.threat import ThreatModel, format_eps  # noqa: E402
from robustbench_lite.training import TrainConfig  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Case:
    """One model of the comparison: how it is trained and at which threat model it is evaluated."""

    name: str
    dataset: str
    eps: float
    epochs: int
    batch_size: int
    lr: float


CASES = {
    "mnist": Case("mnist", "mnist-5k", 0.3, 10, 32, 0.001),
    "cifar10": Case("cifar10", f"npz:{SHARED / 'cifar10.npz'}", 8 / 255, 15, 64, 0.001),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def trained_model(case: Case, work: Path, seed: int):
    """The PGD-trained smallcnn of ``case`` (trained once with our train-robust, then reused)."""
    out = work / f"smallcnn-{case.name}-pgd-at.pt"
    ds = load_dataset(case.dataset)
    log(f"{case.name}: PGD-AT of smallcnn on {ds.name}, eps {format_eps(case.eps)}, {case.epochs} epochs -> {out} "
        f"(resumed where an earlier preparation stopped; nothing to do once trained)")
    loop = TrainConfig(model="smallcnn", dataset=case.dataset, epochs=case.epochs, batch_size=case.batch_size,
                       lr=case.lr, optimizer="adam", weight_decay=0.0, seed=seed, val_size=500, device="cpu",
                       out=str(out), resume=True)
    run_robust_training(RobustTraining(loop, MethodConfig("pgd-at"), eps=case.eps, evaluate=False), SILENT)
    model, _ = model_from_checkpoint(out, "smallcnn", ds)
    return model.eval(), ds


def ours(model, x, y, threat: ThreatModel, batch_size: int, seed: int, device: str):
    """Our standard suite as `advbench attack --suite standard` runs it: a cascade on survivors."""
    t0, c0 = time.perf_counter(), time.process_time()
    res = evaluate(model, x, y, suite_attack_specs("standard"), threat, batch_size=batch_size, device=device,
                   seed=seed, cascade=True)
    sync(torch.device(device))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    t = res.threats[0]
    return {"clean": res.clean_acc, "robust": t.worst_case_acc, "seconds": seconds, "cpu_seconds": cpu,
            "after": {lab: t.robust_acc(lab) for lab in t.attacks},
            "attack_seconds": {lab: a.seconds for lab, a in t.attacks.items()}}


class _AttackLog(logging.Handler):
    """Collects the reference's per-attack lines, 'robust accuracy after APGD-CE: 45.10% (total
    time 12.3 s)', as {attack: (robust accuracy, cumulative seconds)}."""

    LINE = re.compile(r"robust accuracy after (\S+): ([0-9.]+)% \(total time ([0-9.]+) s\)")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.after: Dict[str, Tuple[float, float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        m = self.LINE.search(record.getMessage())
        if m:
            self.after[m.group(1).lower()] = (float(m.group(2)) / 100, float(m.group(3)))


def reference(model, x, y, threat: ThreatModel, batch_size: int, seed: int, device: str):
    """pyautoattack's AutoAttack standard on the same model, images and threat model (its log
    silenced); robust accuracy = float32 predictions of its adversarial images."""
    try:
        from pyautoattack import AutoAttack  # the optional extra: pip install 'advbench[autoattack]'
    except ImportError:
        raise SystemExit("the reference needs the optional package pyautoattack: pip install 'advbench[autoattack]'")
    aa = AutoAttack(model, norm="Linf" if threat.norm == "linf" else "L2", eps=threat.eps, version="standard",
                    seed=seed, device=device)
    logger, collect = logging.getLogger("auto-attack"), _AttackLog()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(collect)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            out = aa.run_standard_evaluation(x, y, batch_size=batch_size)
        sync(torch.device(device))
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
        logger.propagate = propagate
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    x_adv = out[0] if isinstance(out, tuple) else out  # pyautoattack 0.2 returns (x_adv, y_adv)
    assert not threat.violations(x_adv, x).any(), "the reference left the threat model"
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        robust = (model(x_adv).argmax(1) == y).float().mean().item()
    cumulative = [0.0] + [t for _, t in collect.after.values()]
    return {"clean": clean, "robust": robust, "seconds": seconds, "cpu_seconds": cpu,
            "after": {k: acc for k, (acc, _) in collect.after.items()},
            "attack_seconds": {k: t - cumulative[i] for i, (k, (_, t)) in enumerate(collect.after.items())}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mnist,cifar10", help=f"comma-separated: {', '.join(CASES)}")
    p.add_argument("--n", type=int, default=1000, help="test images (the first n of the test split)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the models are trained on the CPU once)")
    p.add_argument("--work-dir", type=Path, default=ROOT / ".bench" / "autoattack_compare")
    p.add_argument("--prepare-only", action="store_true", help="train (or find) the models, evaluate nothing")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = ensure_dir(args.work_dir)
    rows = []
    for key in [m.strip() for m in args.models.split(",") if m.strip()]:
        case = CASES[key]
        model, ds = trained_model(case, work, args.seed)
        if args.prepare_only:
            continue
        model = model.to(args.device)
        x, y = ds.x_test[:args.n].to(args.device), ds.y_test[:args.n].to(args.device)
        threat = ThreatModel("linf", case.eps)
        log(f"{key}: ours (--suite standard, cascade) on {len(y)} images at {threat}")
        a = ours(model, x, y, threat, args.batch_size, args.seed, args.device)
        log(f"{key}: reference AutoAttack standard")
        b = reference(model, x, y, threat, args.batch_size, args.seed, args.device)
        rows.append({"model": key, "dataset": ds.name, "threat": str(threat), "n": len(y), "ours": a, "reference": b,
                     "diff_pp": 100 * (a["robust"] - b["robust"]), "time_ratio": a["seconds"] / b["seconds"],
                     "cpu_time_ratio": a["cpu_seconds"] / b["cpu_seconds"]})
    if rows:
        print_table(rows)
    if args.json:
        atomic_write_text(args.json, json.dumps({"machine": platform.platform(), "torch": torch.__version__,
                                                 "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


def print_table(rows) -> None:
    print(f"\n{'model':9s} {'threat':18s} {'n':>5s} {'clean':>7s} {'ours':>8s} {'reference':>10s} {'diff pp':>8s} "
          f"{'ours s':>8s} {'ref s':>8s} {'time ratio':>10s} {'CPU ratio':>9s}")
    for r in rows:
        a, b = r["ours"], r["reference"]
        print(f"{r['model']:9s} {r['threat']:18s} {r['n']:5d} {100 * a['clean']:6.2f}% {100 * a['robust']:7.2f}% "
              f"{100 * b['robust']:9.2f}% {r['diff_pp']:+8.2f} {a['seconds']:8.1f} {b['seconds']:8.1f} "
              f"{r['time_ratio']:10.2f} {r['cpu_time_ratio']:9.2f}")
    for r in rows:
        for side in ("ours", "reference"):
            d = r[side]
            after = ", ".join(f"{lab} {100 * v:.2f}% ({d['attack_seconds'].get(lab, float('nan')):.1f} s)"
                              for lab, v in d["after"].items())
            print(f"{r['model']}: after each attack, {side}: {after}")


if __name__ == "__main__":
    sys.exit(main())
