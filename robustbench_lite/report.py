"""Run reports: plots, report.md / report.html and a RobustBench-style JSON, written into the run folder.

    advbench report RUN_ID [--results-dir results] [--training-csv PATH] [--robustbench-json PATH]

writes into ``<results>/runs/<run_id>/``:

  robustness_curve.png   accuracy vs eps per attack and the worst case, one panel per norm
                         (every curve starts at the clean accuracy at eps = 0)
  examples.png           clean / adversarial / amplified perturbation of a few samples with their
                         predictions. Runs do not store adversarial examples, so the strongest attack
                         of the run (lowest robust accuracy at the largest eps) is re-run on ~8
                         samples; randomness is keyed by sample id, so these are the run's examples.
  training_curves.png    clean vs adversarial accuracy per epoch, from a training metrics CSV
                         (--training-csv, or the checkpoint's ``<name>.metrics.csv`` when present)
  robustbench.json       RobustBench's model_info fields plus what RobustBench lacks (seed, attack
                         settings, versions, masking warnings)
  report.md              a self-contained summary that links the PNGs (relative paths)
  report.html            report.md as one self-contained page (webpage.page): the PNGs embedded, tables
                         sortable by any column

matplotlib runs with the Agg backend (no display needed).
"""
from __future__ import annotations

import csv
import json
import math
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml

from .data import load_dataset
from .errors import AdvbenchError
from .fileio import atomic_write_text, ensure_dir, not_a_file
from .leaderboard import version
from .runfolder import matching_run_ids, run_ids
from .runtime import pct
from .specs import ATTACK_SUITES, CASCADE, PER_ATTACK, REFERENCE_SUITE, WEAK, AttackSpec, evaluation_kind
from .threat import ThreatModel, format_eps
from .webpage import data_uri, page, pyplot
from .zoo import load_model


def _save(plt, fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --- loading a run --------------------------------------------------------------------------------
def run_dir(run_id: str, results_dir="results") -> Path:
    p = Path(results_dir) / "runs" / str(run_id)
    if not p.is_dir():
        runs = Path(results_dir) / "runs"
        known, matches = run_ids(results_dir), matching_run_ids(results_dir, str(run_id))
        if len(matches) == 1:
            return runs / matches[0]
        if len(matches) > 1:
            shown = ", ".join(matches[:10]) + (f" and {len(matches) - 10} more" if len(matches) > 10 else "")
            raise AdvbenchError(f"run prefix {str(run_id)!r} is ambiguous: it matches {len(matches)} runs in {runs} "
                                f"({shown}); give more of the run id")
        hint = f"; latest: {known[-1]}" if known else ""
        raise AdvbenchError(f"run {run_id!r} not found in {runs}{hint}")
    return p


def load_run(path: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    try:
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise AdvbenchError(f"cannot read run {path}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(summary, dict) or "threats" not in summary:
        raise AdvbenchError(f"run {path} is incomplete (config.yaml / summary.json)")
    if not (path / "outcomes.csv").is_file():
        raise AdvbenchError(f"run {path} is incomplete: {path / 'outcomes.csv'} (its per-sample outcomes) is missing")
    return config, summary


# --- plots ----------------------------------------------------------------------------------------
def plot_robustness_curve(summary: Dict[str, Any], out: Path) -> Path:
    """Accuracy vs eps per attack (+ worst case), one panel per norm."""
    plt = pyplot()
    by_norm: Dict[str, List[Dict[str, Any]]] = {}
    for t in summary["threats"]:
        by_norm.setdefault(t["norm"], []).append(t)
    clean = summary.get("clean_acc", 0.0)
    fig, axes = plt.subplots(1, len(by_norm), figsize=(5.5 * len(by_norm), 4), squeeze=False)
    for ax, (norm, ts) in zip(axes[0], sorted(by_norm.items())):
        ts = sorted(ts, key=lambda t: t["eps"])
        eps = [0.0] + [t["eps"] for t in ts]
        labels = list(ts[0]["attacks"])
        # the worst case underneath (thick, grey) so that the attack equal to it stays visible
        ax.plot(eps, [100 * clean] + [100 * t["worst_case"]["robust_acc"] for t in ts], color="grey", alpha=0.6,
                linewidth=5, marker="s", markersize=9, label="worst case", zorder=1)
        for k, lab in enumerate(labels):
            ax.plot(eps, [100 * clean] + [100 * t["attacks"][lab]["robust_acc"] for t in ts], marker="o",
                    linestyle=("-", "--", "-.", ":")[k % 4], label=lab, zorder=2)
        ax.set_xlabel(f"{norm} eps")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_xticks(eps)
        ax.set_xticklabels([format_eps(e) for e in eps], rotation=45 if len(eps) > 5 else 0)
        ax.grid(alpha=0.3)
        ax.set_title(f"robustness curve ({norm})")
        ax.legend(fontsize=8)
    fig.suptitle(f"{summary.get('model')} on {summary.get('dataset')} (n={summary.get('n_examples')})")
    return _save(plt, fig, out)


def _strongest(summary: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    norm0 = summary["threats"][0]["norm"]
    t = max((t for t in summary["threats"] if t["norm"] == norm0), key=lambda t: t["eps"])
    lab = min(t["attacks"], key=lambda k: (t["attacks"][k]["robust_acc"], list(t["attacks"]).index(k)))
    return t, lab


def adversarial_examples(config: Dict[str, Any], summary: Dict[str, Any], run_path: Path, n: int = 8,
                         device: str = "cpu"):
    """Re-run the run's strongest attack on ``n`` clean-correct samples (fooled ones first).
    Returns dict(x, x_adv, y, clean_pred, adv_pred, ids, label, threat)."""
    ckpt = config.get("checkpoint") or None
    source = {k: v for k, v in (config.get("model_source") or {}).items() if k in ("weights", "model_dir", "normalize")}
    if ckpt is None and not source.get("weights") and not str(config.get("model", "")).lower().startswith("rb:"):
        raise AdvbenchError("the run's model was built in Python: cannot re-run the attack for the examples")
    if ckpt is not None and not Path(ckpt).is_file():
        raise AdvbenchError(f"checkpoint {ckpt!r} of the run is not there: cannot re-run the attack for the examples")
    t, lab = _strongest(summary)
    threat = ThreatModel(t["norm"], t["eps"])
    spec = next(a for a in config["attacks"] if a["label"] == lab)
    ds = load_dataset(config["dataset"], data_dir=config.get("data_dir"), image_size=config.get("image_size"))
    model, _ = load_model(config.get("model"), ckpt, ds, norm=t["norm"], **source)  # as the run loaded it
    model.to(device).eval()
    # which samples: from outcomes.csv (this threat), fooled ones first
    rows = []
    with open(run_path / "outcomes.csv", newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["norm"] == t["norm"] and math.isclose(float(r["eps"]), t["eps"], rel_tol=1e-9) \
                    and r["clean_pred"] == r["label"]:
                rows.append(r)
    rows.sort(key=lambda r: (r.get(f"{lab}_fooled") != "1", int(r["sample_id"])))
    rows = rows[:n]
    if not rows:
        raise AdvbenchError("no clean-correct sample in the run: nothing to show")
    ids = torch.tensor([int(r["sample_id"]) for r in rows])
    x, y = ds.x_test[ids].to(device), ds.y_test[ids].to(device)
    atk = AttackSpec(spec["name"], dict(spec.get("params") or {}), lab).build(threat, int(config.get("seed", 0)))
    xa = atk(model, x, y, sample_ids=ids.to(device))
    with torch.no_grad():
        cp, ap = model(x).argmax(1), model(xa).argmax(1)
    return {"x": x.cpu(), "x_adv": xa.detach().cpu(), "y": y.cpu(), "clean_pred": cp.cpu(), "adv_pred": ap.cpu(),
            "ids": ids, "label": lab, "threat": threat}


def plot_examples(ex: Dict[str, Any], out: Path) -> Path:
    """3 rows (clean, adversarial, amplified perturbation) x n samples, with predictions."""
    plt = pyplot()
    x, xa = ex["x"], ex["x_adv"]
    n = x.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n + 1.2, 5.6), squeeze=False)

    def img(t):
        t = t.detach().float()
        return t[0].numpy() if t.shape[0] == 1 else t.permute(1, 2, 0).clamp(0, 1).numpy()

    for j in range(n):
        d = (xa[j] - x[j]).float()
        m = float(d.abs().max()) or 1.0
        grey = x.shape[1] == 1
        axes[0, j].imshow(img(x[j]), cmap="gray" if grey else None, vmin=0, vmax=1)
        axes[0, j].set_title(f"y={int(ex['y'][j])} pred={int(ex['clean_pred'][j])}", fontsize=8)
        axes[1, j].imshow(img(xa[j]), cmap="gray" if grey else None, vmin=0, vmax=1)
        fooled = int(ex["adv_pred"][j]) != int(ex["y"][j])
        axes[1, j].set_title(f"adv pred={int(ex['adv_pred'][j])}", fontsize=8, color="red" if fooled else "green")
        if grey:
            axes[2, j].imshow(d[0].numpy(), cmap="seismic", vmin=-m, vmax=m)
        else:
            axes[2, j].imshow((0.5 + d / (2 * m)).permute(1, 2, 0).clamp(0, 1).numpy())
        axes[2, j].set_title(f"δ in ±{m:.3g}", fontsize=8)
        for i in range(3):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    for i, name in enumerate(("clean", "adversarial", "perturbation\n(amplified)")):
        axes[i, 0].set_ylabel(name, fontsize=9)
    fig.suptitle(f"{ex['label']} at {ex['threat']} (sample ids {', '.join(str(int(i)) for i in ex['ids'])})",
                 fontsize=9)
    return _save(plt, fig, out)


def read_training_csv(path) -> Dict[str, List[float]]:
    p = Path(path)
    if not p.is_file():
        raise AdvbenchError(f"training metrics CSV not found: {p}")
    try:
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise AdvbenchError(f"cannot read training metrics {p}: {exc}") from None
    if not rows or "epoch" not in rows[0]:
        raise AdvbenchError(f"training metrics {p} need an 'epoch' column and at least one row")
    cols: Dict[str, List[float]] = {}
    for k in rows[0]:
        if k == "epoch" or k.endswith("acc"):
            try:
                cols[k] = [float(r[k]) if r.get(k) not in (None, "") else math.nan for r in rows]
            except ValueError:
                continue
    if len(cols) < 2:
        raise AdvbenchError(f"training metrics {p} have no accuracy column (*acc)")
    return cols


def plot_training(path, out: Path) -> Path:
    """Clean vs adversarial accuracy per epoch (solid: clean, dashed: adversarial)."""
    plt = pyplot()
    cols = read_training_csv(path)
    ep = cols.pop("epoch")
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, v in cols.items():
        adv = "adv" in k
        ax.plot(ep, [100 * a for a in v], marker="o", linestyle="--" if adv else "-", label=k)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"training curves ({Path(path).name})")
    return _save(plt, fig, out)


# --- RobustBench-style JSON -------------------------------------------------------------------------
def _versions() -> Dict[str, str]:
    return {"advbench": version(), "torch": torch.__version__, "python": platform.python_version(),
            "numpy": np.__version__}


def autoattack_like(config: Dict[str, Any]) -> bool:
    """Whether a run's worst case may be called ``autoattack_acc``: its attacks cover a reportable
    suite (specs.evaluation_kind: AutoAttack's standard set on our engine, `--suite standard`) run
    as a cascade, as AutoAttack runs it, or are the reference implementation (`--suite autoattack`)."""
    kind = _evaluation(config)
    return kind != WEAK and (config.get("mode") == CASCADE or kind == REFERENCE_SUITE)


def _evaluation(config: Dict[str, Any]) -> str:
    return evaluation_kind(a.get("resolved") or {} for a in config.get("attacks", []))


def _footnote(config: Dict[str, Any], attacks: List[str], warnings: List[str]) -> str:
    """What the worst case is over, and what it is worth (the suite's description, or an upper bound)."""
    kind = _evaluation(config)
    if kind == WEAK:
        worth = " (not AutoAttack: weak attacks only, treat it as an upper bound)"
    else:
        worth = f" ({ATTACK_SUITES[kind].description}" + ("" if autoattack_like(config) else
                                                          "; each attack run on every clean-correct sample") + ")"
    masking = f"; masking warnings: {len(warnings)}" if warnings else ""
    return "worst case over " + ", ".join(attacks) + worth + masking


def robustbench_info(config: Dict[str, Any], summary: Dict[str, Any]) -> Dict[str, Any]:
    """RobustBench's model_info fields (name, dataset, eps, clean_acc, architecture,
    number_forward_passes, ...), for the run's primary threat model (the first norm's largest eps),
    plus ``advbench``: every threat, attack settings, seed, versions. The worst case is
    ``worst_case_acc`` with the ``attacks`` it is over; ``autoattack_acc`` (RobustBench's name) is
    added only for an AutoAttack-style run (autoattack_like), never for e.g. a PGD-only worst case."""
    t, _ = _strongest(summary)
    aa_like = autoattack_like(config)
    worst = f"{100 * t['worst_case']['robust_acc']:.2f}"
    fwd = sum(int(a.get("stats", {}).get("forward_samples", 0)) for th in summary["threats"]
              for a in th["attacks"].values())
    defense = config.get("defense") or summary.get("defense") or ""
    return {
        "link": "", "name": f"{config.get('model')} ({defense or 'standard'})", "authors": "", "additional_data": False,
        "number_forward_passes": 1, "dataset": config.get("dataset"), "venue": "", "architecture": config.get("model"),
        "eps": format_eps(t["eps"]), "norm": "Linf" if t["norm"] == "linf" else "L2",
        "clean_acc": f"{100 * summary['clean_acc']:.2f}",
        "reported": "", "worst_case_acc": worst, "attacks": list(t["attacks"]),
        **({"autoattack_acc": worst} if aa_like else {}),
        "unreliable": bool(summary.get("warnings")),
        "footnote": _footnote(config, list(t["attacks"]), summary.get("warnings") or []),
        "advbench": {
            "run_id": config.get("run_id"), "timestamp": config.get("timestamp"), "seed": config.get("seed"),
            "n_examples": summary.get("n_examples"), "device": config.get("device"),
            "checkpoint": config.get("checkpoint"), "checkpoint_sha256": config.get("checkpoint_sha256"),
            "defense": defense, "activation": config.get("activation"), "versions": _versions(),
            "attacks": [{"label": a["label"], "name": a["name"], "settings": a.get("resolved", {})}
                        for a in config.get("attacks", [])],
            "threats": [{"norm": th["norm"], "eps": th["eps"], "eps_label": th.get("eps_label"),
                         "robust_acc": {lab: a["robust_acc"] for lab, a in th["attacks"].items()},
                         "worst_case_acc": th["worst_case"]["robust_acc"]} for th in summary["threats"]],
            "attack_forward_passes": fwd, "flags": config.get("flags", []),
            "warnings": summary.get("warnings", []),
        },
    }


# --- report -----------------------------------------------------------------------------------------
def _training_csv_for(config: Dict[str, Any]) -> Optional[Path]:
    ck = config.get("checkpoint")
    if not ck:
        return None
    p = Path(ck)
    for cand in (p.with_suffix(".metrics.csv"), p.parent / (p.name.split(".")[0] + ".metrics.csv")):
        if cand.is_file():
            return cand
    return None


def write_report(run_id: str, results_dir="results", training_csv=None, robustbench_json=None,
                 n_images: int = 8, device: str = "cpu") -> Dict[str, Any]:
    """Write the plots, robustbench.json and report.md into the run folder; returns
    {"run_dir", "files", "notes"}. Every destination is checked first, and a write that fails all the
    same (a full disk, a read-only folder) is an AdvbenchError naming the file."""
    path = run_dir(run_id, results_dir)
    config, summary = load_run(path)
    tcsv = Path(training_csv) if training_csv else _training_csv_for(config)
    ensure_dir(path)
    for dest in [path / name for name in REPORT_FILES] + ([Path(robustbench_json)] if robustbench_json else []):
        what = not_a_file(dest)
        if what:
            raise AdvbenchError(f"cannot write the report: {dest} is {what}")
    try:
        return _write_report(path, config, summary, tcsv, robustbench_json, n_images, device)
    except OSError as exc:
        where = exc.filename or path
        raise AdvbenchError(f"cannot write the report: {where}: {exc.strerror or exc}") from None


REPORT_FILES = ("robustness_curve.png", "examples.png", "training_curves.png", "robustbench.json", "report.md",
                "report.html")


def _write_report(path: Path, config: Dict[str, Any], summary: Dict[str, Any], tcsv: Optional[Path],
                  robustbench_json, n_images: int, device: str) -> Dict[str, Any]:
    files: List[Path] = []
    notes: List[str] = []
    files.append(plot_robustness_curve(summary, path / "robustness_curve.png"))
    ex = None
    try:
        ex = adversarial_examples(config, summary, path, n=n_images, device=device)
        files.append(plot_examples(ex, path / "examples.png"))
    except AdvbenchError as exc:
        notes.append(f"no example images: {exc}")
    if tcsv is not None:
        files.append(plot_training(tcsv, path / "training_curves.png"))
    text = json.dumps(robustbench_info(config, summary), indent=2) + "\n"
    for dest in [path / "robustbench.json"] + ([Path(robustbench_json)] if robustbench_json else []):
        atomic_write_text(dest, text)
        files.append(dest)
    md = "\n".join(report_markdown(config, summary, ex, tcsv, notes))
    atomic_write_text(path / "report.md", md)
    files.append(path / "report.md")
    # the same text as one page, its plots embedded (a link, robustbench.json, stays relative)
    atomic_write_text(path / "report.html", page(md, image=lambda src: data_uri(path / src)))
    files.append(path / "report.html")
    return {"run_dir": str(path), "files": [str(f) for f in files], "notes": notes}


def _evaluation_line(summary: Dict[str, Any]) -> str:
    """How the attacks ran and what the worst case is worth (runs older than these fields: per-attack, weak)."""
    mode, kind = summary.get("mode", PER_ATTACK), summary.get("evaluation", WEAK)
    how = ("each attack on the samples the ones before it failed to fool; its accuracy is the one after it"
           if mode == CASCADE else "each attack on every clean-correct sample")
    worth = ("an upper bound from weak attacks only (AutoAttack's standard set: `--suite standard`)" if kind == WEAK
             else f"reportable ({ATTACK_SUITES[kind].description})")
    return f"- evaluation: {kind}, {mode} ({how}); the worst case is {worth}"


def report_markdown(config: Dict[str, Any], summary: Dict[str, Any], ex: Optional[Dict[str, Any]],
                    tcsv: Optional[Path], notes: List[str]) -> List[str]:
    """The lines of report.md: the run, masking warnings, robust accuracy per threat, the attacks'
    settings, the plots (linked by relative path) and the notes."""
    lines = [f"# advbench run {config.get('run_id')}", "",
             f"- model: **{config.get('model')}** ({config.get('defense') or 'standard'}, "
             f"activation {config.get('activation')}), checkpoint `{config.get('checkpoint')}` "
             f"(sha256 {config.get('checkpoint_sha256')})",
             f"- dataset: {config.get('dataset')} test split, n={summary.get('n_examples')}, "
             f"seed {config.get('seed')}, device {config.get('device')}, advbench {config.get('version')}",
             f"- clean accuracy: **{pct(summary.get('clean_acc'))}**", _evaluation_line(summary), ""]
    warns = summary.get("warnings") or []
    if warns:
        lines += ["## Gradient-masking warnings", ""] + [f"- ⚠ {w}" for w in warns] + [""]
    elif summary.get("masking", {}).get("checked"):
        lines += ["Gradient-masking checks: none fired.", ""]
    lines += ["## Robust accuracy", ""]
    labels = list(summary["threats"][0]["attacks"])
    lines.append("| threat | " + " | ".join(labels) + " | worst case |")
    lines.append("|---|" + "---:|" * (len(labels) + 1))
    for t in summary["threats"]:
        lines.append(f"| {t['norm']} {t.get('eps_label') or format_eps(t['eps'])} | " +
                     " | ".join(pct(t["attacks"][lab]["robust_acc"]) for lab in labels) +
                     f" | **{pct(t['worst_case']['robust_acc'])}** |")
    t0 = summary["threats"][0]
    lines += ["", "## Attacks", "", f"Settings as resolved at {t0['norm']} eps={t0.get('eps_label') or t0['eps']} "
              f"(step sizes scale with eps):", ""]
    for a in config.get("attacks", []):
        shown = {k: v for k, v in a.get("resolved", {}).items() if k not in ("attack", "norm", "eps")}
        lines.append(f"- `{a['label']}`: {a['name']} " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    lines += ["", "## Plots", "", "![robustness curve](robustness_curve.png)", ""]
    if ex is not None:
        lines += [f"Strongest attack `{ex['label']}` at {ex['threat']}, re-run on {len(ex['ids'])} samples "
                  f"(top: clean, middle: adversarial, bottom: perturbation, amplified):", "",
                  "![examples](examples.png)", ""]
    if tcsv is not None:
        lines += [f"Training curves from `{tcsv}`:", "", "![training curves](training_curves.png)", ""]
    lines += [f"- {n}" for n in notes]
    return lines + ["", "RobustBench-style metadata: [robustbench.json](robustbench.json)", ""]
