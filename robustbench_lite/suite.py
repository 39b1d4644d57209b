"""Benchmark runs and suites.

A *run* evaluates one model (a checkpoint, or the zoo baseline) on a dataset under threat models
x attacks and records it: ``<results>/runs/<run_id>/`` and rows in the leaderboard. `advbench
attack` is one run; `advbench run SUITE.yaml` is a run per model of the suite:

    name: mnist-quick                 # optional
    dataset: mnist-5k                 # default dataset of the models
    n_examples: 200                   # null = the whole test split
    batch_size: 200
    seed: 0
    device: auto                      # auto | cpu | cuda
    masking_checks: true              # optional: the gradient-masking checks after each run
    channels_last: false              # optional fast paths, as the CLI's flags
    compile: false
    models:
      - name: smallcnn                # zoo baseline (trained and cached when missing)
      - name: smallcnn
        checkpoint: models/smallcnn-mnist-5k-pgd-at.pt   # e.g. train-robust --out models/...
        dataset: mnist-5k             # optional, per model
    threats:
      - {norm: linf, eps: 0.1}
      - {norm: linf, eps: [0.2, 0.3]} # a list is an eps sweep
    attacks:
      - fgsm
      - {name: pgd, steps: 40, restarts: 2, loss: margin, label: pgd-40-margin}
      - {name: apgd-t, steps: 100, n_target_classes: 3, rho: 0.75}   # an attack's own parameters too

Suites are read with yaml.safe_load (tags such as !!python/... are refused) and validated with
errors that name the file, the line and the bad key. Paths are relative to the current directory.
"""
from __future__ import annotations

import difflib
import json
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import AdvbenchError
from .evaluator import AttackSpec, EvalResult, build_attacks, evaluate, parse_attack_specs
from .threat import ThreatModel, check_norm, format_eps, parse_eps

DEFAULT_DATASET = "mnist-5k"


# --- one run -----------------------------------------------------------------------------------
@dataclass
class RunSpec:
    model: Optional[str] = None
    checkpoint: Optional[str] = None
    dataset: Optional[str] = None           # None: the checkpoint's dataset, else mnist-5k
    threats: List[ThreatModel] = field(default_factory=list)
    attacks: List[AttackSpec] = field(default_factory=list)
    n_examples: Optional[int] = 1000        # None: the whole test split
    batch_size: int = 256
    device: str = "auto"
    seed: int = 0
    results_dir: str = "results"
    data_dir: Optional[str] = None
    download: bool = False
    amp: Optional[str] = None               # "bf16": attack forward passes under torch.autocast
    channels_last: bool = False             # NHWC memory format for model and inputs
    compile: bool = False                   # torch.compile the model
    source: str = "advbench attack"         # what started the run (recorded in config.yaml)
    flags: List[str] = field(default_factory=list)
    masking_checks: bool = True             # gradient-masking checks after the evaluation (masking.py)
    resume: Optional[str] = None            # id (or unique prefix) of an unfinished run to continue (runs.py)
    suite_entry: str = ""                   # "<suite key>:<model index>" for a suite's run (runs.py)


@dataclass
class RunRecord:
    run_id: str
    run_dir: Path
    result: EvalResult
    info: Dict[str, Any]

    def summary(self) -> Dict[str, Any]:
        keep = ("model", "checkpoint", "checkpoint_sha256", "dataset", "dataset_sha256", "defense", "activation",
                "version", "warnings")
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), **{k: self.info.get(k) for k in keep},
                **self.result.summary()}


def cli_attack_specs(names: str, steps: Optional[int] = None, alpha: Optional[str] = None,
                     restarts: Optional[int] = None, loss: Optional[str] = None,
                     amp: Optional[str] = None) -> List[AttackSpec]:
    """Attack specs for `advbench attack`: --steps and --alpha go to the iterative attacks (not to
    single-step ones such as fgsm), --restarts to the random-start ones (pgd), --loss and --amp
    to all."""
    import attacks

    specs = parse_attack_specs(names)
    alpha_v = parse_eps(alpha, what="--alpha") if alpha is not None else None
    out, used = [], {"--steps": False, "--alpha": False, "--restarts": False}
    for s in specs:
        d = attacks.defaults(s.name)
        params = dict(s.params)
        iterative = d.get("steps", 1) != 1
        if steps is not None and iterative:
            params["steps"], used["--steps"] = steps, True
        if alpha_v is not None and iterative:
            params["alpha"], used["--alpha"] = alpha_v, True
        if restarts is not None and iterative and d.get("random_start"):
            params["restarts"], used["--restarts"] = restarts, True
        if loss is not None:
            params["loss"] = loss
        if amp is not None:
            params["amp"] = amp
        out.append(AttackSpec(s.name, params, s.label, s.factory))
    for opt, given in (("--steps", steps), ("--alpha", alpha), ("--restarts", restarts)):
        if given is not None and not used[opt]:
            kind = "random-start (pgd)" if opt == "--restarts" else "iterative (bim, pgd)"
            raise AdvbenchError(f"{opt} applies to {kind} attacks only, and none of "
                                f"{', '.join(s.label for s in specs)} is one")
    return out


# Named attack lists for `advbench attack --suite NAME`.
#   standard: APGD-CE + APGD-T (100 iterations each, 9 target classes): a fast AutoAttack-style
#             worst case (Croce & Hein, ICML 2020; AutoAttack without FAB-T and Square).
#   quick:    FGSM + PGD-20: a cheap sanity check.
ATTACK_SUITES: Dict[str, List[Dict[str, Any]]] = {
    "standard": [{"name": "apgd-ce", "steps": 100, "label": "apgd-ce"},
                 {"name": "apgd-t", "steps": 100, "n_target_classes": 9, "label": "apgd-t"}],
    "quick": [{"name": "fgsm", "label": "fgsm"}, {"name": "pgd", "steps": 20, "label": "pgd-20"}],
}


def suite_attack_specs(name: str, amp: Optional[str] = None) -> List[AttackSpec]:
    """The attack specs of a named attack suite (ATTACK_SUITES); ``amp`` goes to every attack."""
    key = str(name).strip().lower()
    if key not in ATTACK_SUITES:
        close = difflib.get_close_matches(key, list(ATTACK_SUITES), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise AdvbenchError(f"unknown attack suite {name!r}{hint}: expected one of {', '.join(ATTACK_SUITES)}")
    specs = []
    for item in ATTACK_SUITES[key]:
        d = dict(item)
        label = d.pop("label")
        if amp is not None:
            d["amp"] = amp
        specs.append(AttackSpec(d.pop("name"), d, label))
    return parse_attack_specs(specs)


def validate_run(spec: RunSpec) -> None:
    """Cheap checks before any data loading or training (names, attacks x threats, device)."""
    from .models import MODELS
    from .runtime import check_positive, check_seed, resolve_device

    check_seed(spec.seed)
    if not spec.model and not spec.checkpoint:
        raise AdvbenchError("give --model (the zoo baseline is used) or --checkpoint")
    if spec.model:
        MODELS.canonical(spec.model)
    if spec.dataset:
        from .data import DATASETS

        DATASETS.canonical(spec.dataset)
    if spec.checkpoint and not Path(spec.checkpoint).is_file():
        raise AdvbenchError(f"checkpoint not found: {spec.checkpoint}")
    if not spec.threats:
        raise AdvbenchError("no threat model given")
    if not spec.attacks:
        raise AdvbenchError("no attacks given")
    check_positive("--batch-size", spec.batch_size)
    if spec.n_examples is not None:
        check_positive("--n-examples", spec.n_examples)
    build_attacks(spec.attacks, spec.threats, spec.seed)
    resolve_device(spec.device)


def dataset_reason(spec: RunSpec, dataset: str) -> str:
    """Why a run evaluates on ``dataset``: the first line of `advbench attack` says it, since a
    model name alone means the default, MNIST-like mnist-5k, whatever the architecture."""
    if spec.dataset:
        return "given with --dataset"
    if spec.checkpoint and dataset != DEFAULT_DATASET:
        return "the checkpoint's dataset"
    if spec.checkpoint:
        return f"the checkpoint's dataset, or the default {DEFAULT_DATASET} when it names none"
    return f"the default: no --dataset given and no checkpoint naming one; see `advbench attack --help`"


def _defense(ckpt: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    d = ckpt.get("defense")
    if isinstance(d, dict):
        d = dict(d)
        return str(d.pop("method", "") or ""), d
    return (str(d) if d else ""), {}


def activation_label(ckpt, model) -> str:
    """The leaderboard's activation: e.g. silu, or relu-sb-softplus for ReLU with a smooth backward
    pass (the name the model zoo gives such checkpoints)."""
    spec = getattr(model, "spec", {}) or {}
    act = ckpt.get("activation") or spec.get("activation") or ""
    sb = ckpt.get("smooth_backward") or spec.get("smooth_backward")
    return f"{act}-sb-{sb}" if sb else act


def _check_data(spec: RunSpec, ds) -> None:
    """The run's settings against its data, before a model is loaded or a baseline trained:
    --n-examples within the test split, and no L2 eps larger than any distance between two images
    of this size."""
    from .data import check_n_examples

    check_n_examples(spec.n_examples, len(ds.y_test), f"the test split of {ds.name}")
    for t in spec.threats:
        t.check_input_shape(ds.input_shape)


def load_model(spec: RunSpec, console=None, quiet: bool = False):
    """(model, dataset, info) for a run: the checkpoint, or the zoo baseline (trained when missing).
    The dataset is loaded and checked against --n-examples (and a baseline's model against its images)
    before any baseline is trained."""
    from .checkpoint import file_sha256, model_from_checkpoint, read_checkpoint
    from .data import load_dataset
    from .runtime import resolve_device
    from .zoo import get_or_train, zoo_path

    flags = []
    if spec.checkpoint:
        path = Path(spec.checkpoint)
        ckpt = read_checkpoint(path)
        dataset = spec.dataset or ckpt.get("dataset") or DEFAULT_DATASET
        ds = load_dataset(dataset, data_dir=spec.data_dir, download=spec.download)
        _check_data(spec, ds)
        model, ckpt = model_from_checkpoint(path, spec.model, ds)
    else:
        dataset = spec.dataset or DEFAULT_DATASET
        ds = load_dataset(dataset, data_dir=spec.data_dir, download=spec.download)
        _check_data(spec, ds)
        if console is not None and not quiet and not zoo_path(spec.model, ds).is_file():
            # the baseline is trained first: say now what it is trained and evaluated on
            console.print(f"dataset {ds.name} ({dataset_reason(spec, ds.name)})", markup=False, highlight=False)
        dev = resolve_device(spec.device)
        model, path, _ = get_or_train(spec.model, dataset, seed=spec.seed, device=str(dev), console=console,
                                      quiet=quiet, data_dir=spec.data_dir, download=spec.download)
        ckpt = read_checkpoint(path)
        flags.append("zoo")
    model.eval()
    defense, defense_params = _defense(ckpt)
    name = ckpt.get("model") or spec.model or model.spec.get("name")
    info = {"model": name, "checkpoint": str(path), "checkpoint_sha256": file_sha256(path),
            "dataset": ds.name, "dataset_sha256": ds.fingerprint,
            "defense": defense or ("standard" if ckpt.get("format") else ""),
            "defense_params": json.dumps(defense_params, sort_keys=True) if defense_params else "",
            "activation": activation_label(ckpt, model),
            "checkpoint_metrics": ckpt.get("metrics") or {}, "flags": flags}
    return model, ds, info


def execute_run(spec: RunSpec, console=None, progress_console=None, quiet: bool = False) -> RunRecord:
    """Load the model and data, evaluate, write the run folder and append to the leaderboard.

    The run folder is created when the evaluation starts and every finished batch is saved in it
    (runs.py); ``spec.resume`` continues an unfinished run instead. Ctrl-C / SIGTERM during the
    evaluation raise runs.RunInterrupted."""
    from rich.markup import escape

    from . import leaderboard
    from .fileio import ensure_dir
    from .runs import RunFolder
    from .runtime import accelerate, progress_bar, resolve_device, to_memory_format
    from . import distributed

    validate_run(spec)
    ensure_dir(spec.results_dir)  # an unwritable results dir fails before any work
    leaderboard.read(spec.results_dir)  # so does a corrupt leaderboard (the append would refuse it)
    leaderboard.check_writable(spec.results_dir)  # and a leaderboard.md that is a directory
    resumed = RunFolder.find(spec.results_dir, spec.resume) if spec.resume else None
    if resumed is not None:
        resumed.check_resumable()
    device = resolve_device(spec.device)
    ctx = distributed.init(device)  # under torchrun: one process per device, each attacks its shard
    if resumed is not None and ctx.enabled:
        raise AdvbenchError(f"--resume {spec.resume}: evaluations under torchrun are not journaled; resume run "
                            f"{resumed.run_id} in one process")
    device = distributed.local_device(device)
    quiet = quiet or not ctx.is_main
    # a missing zoo baseline is trained by all ranks together (DDP; rank 0 writes it)
    model, ds, info = load_model(spec, console=console, quiet=quiet)
    model = accelerate(model, device, channels_last=spec.channels_last, compile=spec.compile)
    x, y, ids = ds.subset("test", spec.n_examples, spec.seed)
    x = to_memory_format(x, spec.channels_last)
    n_total = len(y)
    if ctx.enabled:
        mine = distributed.shard(len(y), ctx)
        x, y, ids = x[mine], y[mine], ids[mine]
    if console is not None and not quiet:
        where = f"{ctx.world_size} x {device.type} (DDP)" if ctx.enabled else str(device)
        console.print(f"attacking {info['model']} ({info['checkpoint']}) on {n_total} {info['dataset']} test "
                      f"images ({dataset_reason(spec, info['dataset'])}): {', '.join(a.label for a in spec.attacks)} x "
                      f"{', '.join(str(t) for t in spec.threats)} on {where}", markup=False, highlight=False)
    config = _run_config(spec, info, n_total, device, ctx)
    folder = None
    if resumed is not None:
        resumed.check_config(config)  # before any attack: the saved batches are only valid for the same run
        folder = resumed
        config["timestamp"] = info["timestamp"] = resumed.stored_config().get("timestamp", info["timestamp"])
    elif ctx.is_main:
        folder = RunFolder.create(spec.results_dir, config)
    journal = folder.journal() if folder is not None and not ctx.enabled else None  # DDP: no journal
    if folder is not None:
        config["run_id"] = info["run_id"] = folder.run_id
    if resumed is not None and console is not None and not quiet:
        console.print(f"resuming run {folder.run_id}: {journal.count()} finished batches saved", markup=False,
                      highlight=False)

    bars = AttackBars(progress_bar(console=progress_console, quiet=quiet, unit="samples"))
    try:
        with bars.progress:
            result = evaluate(model, x, y, spec.attacks, spec.threats, batch_size=spec.batch_size, device=device,
                              seed=spec.seed, sample_ids=ids, on_progress=bars, journal=journal)
        if ctx.enabled:  # per-sample outcomes are keyed by sample id, so the merge equals a single-process run
            result = EvalResult.merge(distributed.all_gather_objects(result))
        if not ctx.is_main:
            return RunRecord("", Path(spec.results_dir), result, info)  # only rank 0 writes
        masking_warnings = []
        if spec.masking_checks:
            from . import masking

            masking_warnings = masking.check_run(model, x, y, ids, result, device=device, seed=spec.seed)
            if console is not None and not quiet:
                for w in masking_warnings:
                    console.print(f"[yellow]warning: {escape(w.message)}[/yellow]", highlight=False)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (the CLI's handler raises a KeyboardInterrupt)
        if folder is None:
            raise
        from .runs import RunInterrupted

        raise RunInterrupted(folder.run_id, journal.count() if journal else 0,
                             journal.total if journal else None) from exc
    except AdvbenchError:
        if folder is not None and resumed is None:
            folder.discard()  # a fresh run that failed leaves nothing behind
        raise
    budget_warnings = [w for w in (t.atypical(x.shape[1:], info["dataset"]) for t in spec.threats) if w]
    if budget_warnings and not quiet:
        from rich.console import Console

        warn_out = progress_console or Console(stderr=True)  # stderr: the run's output stays a table or JSON
        for w in budget_warnings:
            warn_out.print(f"warning: {w}", markup=False, highlight=False, soft_wrap=True)
    flags = config["flags"] + sorted({w.flag for w in masking_warnings})
    flags += ["atypical-eps"] if budget_warnings else []
    config["flags"] = flags
    info["flags"] = ";".join(flags)
    run_id, run_dir = folder.run_id, folder.path
    info["warnings"] = [w.message for w in masking_warnings]
    record = RunRecord(run_id, run_dir, result, info)
    summary = record.summary()
    summary["checkpoint_metrics"] = info.get("checkpoint_metrics", {})
    summary["flags"] = flags
    summary["masking"] = {"checked": spec.masking_checks, "warnings": [w.to_dict() for w in masking_warnings]}
    try:
        leaderboard.write_run_files(run_dir, config, summary, result.outcome_rows())
        leaderboard.append(spec.results_dir, leaderboard.result_rows(result, info))
    except AdvbenchError:  # not recorded: a fresh run leaves no folder; a resumed one keeps its saved batches
        if resumed is None:
            folder.discard()
        raise
    folder.finish()
    return record


class AttackBars:
    """evaluate()'s ``on_progress``: one bar (or plain line) per (threat, attack), moved per step."""

    def __init__(self, progress):
        self.progress = progress
        self.tasks: Dict[Any, Any] = {}

    def __call__(self, threat: ThreatModel, label: str, done: float, total: int) -> None:
        key = (threat, label)
        if key not in self.tasks:
            from rich.markup import escape

            self.tasks[key] = self.progress.add_task(escape(f"{label} {threat}"), total=max(total, 1))
        self.progress.update(self.tasks[key], completed=done if total else 1)


def _run_config(spec: RunSpec, info: Dict[str, Any], n_total: int, device, ctx) -> Dict[str, Any]:
    """The run's config.yaml (written when the evaluation starts; the run id is filled in then).
    Sets info's timestamp, device, seed and version; moves info's flags into the config's."""
    from . import leaderboard

    if ctx.enabled:
        info["flags"].append(f"ddp={ctx.world_size}")
    amps = sorted({str(a.params.get("amp")) for a in spec.attacks if a.params.get("amp")})
    fast = (["channels_last"] if spec.channels_last else []) + (["compile"] if spec.compile else [])
    flags = info.pop("flags") + list(spec.flags) + [f"amp={a}" for a in amps] + fast + leaderboard.environment_flags()
    info.update(timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"), device=str(device), seed=spec.seed,
                version=leaderboard.version(), flags=";".join(flags))
    resolved = build_attacks(spec.attacks, spec.threats[:1], spec.seed)
    return {
        "run_id": "", "source": spec.source, "timestamp": info["timestamp"], "version": info["version"],
        "model": info["model"], "checkpoint": info["checkpoint"], "checkpoint_sha256": info["checkpoint_sha256"],
        "dataset": info["dataset"], "dataset_sha256": info["dataset_sha256"], "split": "test",
        "n_examples": n_total, "seed": spec.seed, "batch_size": spec.batch_size, "device": str(device),
        "defense": info["defense"], "activation": info["activation"], "flags": flags,
        "threats": [{"norm": t.norm, "eps": t.eps, "eps_label": format_eps(t.eps)} for t in spec.threats],
        "attacks": [{"label": a.label, "name": a.name, "params": dict(a.params),
                     "resolved": resolved[(spec.threats[0], a.label)].config()} for a in spec.attacks],
        **({"suite_entry": spec.suite_entry} if spec.suite_entry else {}),
    }


# --- terminal tables -----------------------------------------------------------------------------
def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def result_tables(record: RunRecord) -> List[Any]:
    """Rich tables for a run: per threat model, clean / each attack / worst case with success
    rate, perturbation norm, seconds and img/s; plus an attack x eps table for a sweep."""
    from rich.markup import escape
    from rich.table import Table

    res, info = record.result, record.info
    out = []
    for t in res.threats:
        tab = Table(title=escape(f"{info['model']} on {info['dataset']} · {t.threat} · n={res.n_total} · "
                                 f"run {record.run_id}"),
                    title_justify="left")
        for col, just in (("", "left"), ("accuracy", "right"), ("success rate", "right"),
                          ("mean ‖δ‖", "right"), ("seconds", "right"), ("img/s", "right")):
            tab.add_column(col, justify=just)
        tab.add_row("clean", _pct(res.clean_acc), "", "", "", "")
        for lab, r in t.attacks.items():
            tab.add_row(escape(lab), _pct(t.robust_acc(lab)), _pct(r.success_rate),
                        "–" if r.mean_norm is None else f"{r.mean_norm:.4g}", f"{r.seconds:.2f}",
                        f"{r.images_per_s:.0f}")
        n_att = max(1, res.n_clean_correct)
        tab.add_row("worst case", _pct(t.worst_case_acc), _pct(1 - int(t.robust_mask().sum()) / n_att), "",
                    f"{t.seconds:.2f}", "", style="bold")
        out.append(tab)
    if len(res.threats) > 1:
        tab = Table(title=escape(f"robust accuracy: attack x eps ({info['model']} on {info['dataset']}, "
                                 f"n={res.n_total})"),
                    title_justify="left")
        tab.add_column("attack")
        for t in res.threats:
            tab.add_column(f"{t.threat.norm} {format_eps(t.threat.eps)}", justify="right")
        tab.add_row("clean", *[_pct(res.clean_acc)] * len(res.threats))
        for lab in res.attack_labels:
            tab.add_row(escape(lab), *[_pct(t.robust_acc(lab)) for t in res.threats])
        tab.add_row("worst case", *[_pct(t.worst_case_acc) for t in res.threats], style="bold")
        out.append(tab)
    return out


# --- suites --------------------------------------------------------------------------------------
TOP_KEYS = ("name", "description", "dataset", "data_dir", "download", "n_examples", "batch_size", "seed", "device",
            "results_dir", "masking_checks", "channels_last", "compile", "models", "threats", "attacks")
MODEL_KEYS = ("name", "checkpoint", "dataset")
THREAT_KEYS = ("norm", "eps")
ATTACK_KEYS = ("name", "label")  # an attack entry's own keys; the others are its parameters (attacks.parameters)
_SAFE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}


class _Loc:
    """Line numbers of a composed YAML node and its children."""

    def __init__(self, node):
        self.node = node
        self.line = node.start_mark.line + 1

    def key_line(self, key: str) -> int:
        for k, _ in getattr(self.node, "value", []):
            if getattr(k, "value", None) == key:
                return k.start_mark.line + 1
        return self.line

    def child(self, key) -> "_Loc":
        import yaml

        if isinstance(self.node, yaml.MappingNode):
            for k, v in self.node.value:
                if k.value == key:
                    return _Loc(v)
        elif isinstance(self.node, yaml.SequenceNode) and isinstance(key, int) and key < len(self.node.value):
            return _Loc(self.node.value[key])
        return self


@dataclass
class Suite:
    path: Path
    name: str
    models: List[Dict[str, Any]]
    threats: List[ThreatModel]
    attacks: List[AttackSpec]
    settings: Dict[str, Any]

    def runs(self, results_dir: Optional[str] = None, device: Optional[str] = None) -> List[RunSpec]:
        s = self.settings
        return [RunSpec(model=m.get("name"), checkpoint=m.get("checkpoint"),
                        dataset=m.get("dataset") or s.get("dataset"), threats=list(self.threats),
                        attacks=list(self.attacks), n_examples=s.get("n_examples", 1000),
                        batch_size=s.get("batch_size", 256), device=device or s.get("device", "auto"),
                        seed=s.get("seed", 0), results_dir=results_dir or s.get("results_dir", "results"),
                        data_dir=s.get("data_dir"), download=bool(s.get("download", False)),
                        source=f"advbench run {self.path}", flags=[f"suite={self.name}"],
                        masking_checks=bool(s.get("masking_checks", True)),
                        channels_last=bool(s.get("channels_last", False)), compile=bool(s.get("compile", False)))
                for m in self.models]


MAX_NODES = 100_000  # a suite is a few hundred nodes; aliases that expand to more are a YAML bomb


def _check_tags(node, where: str) -> None:
    """Walk the composed node graph once (aliases make it a graph: a node reached again is not walked
    again): only plain-data tags, no key twice in a mapping, no alias inside its own anchor (a
    cycle: ``&a [*a]``), and at most MAX_NODES nodes counted with aliases expanded (a "billion
    laughs" suite is refused before yaml.safe_load builds it)."""
    import yaml

    size: Dict[int, int] = {}   # id(node) -> its node count with aliases expanded (once walked)
    on_path: set = set()        # ids of the nodes being walked (the current node's ancestors)
    stack: List[Tuple[Any, Optional[list]]] = [(node, None)]
    while stack:
        n, kids = stack.pop()
        if kids is not None:  # all of n's children are walked
            on_path.discard(id(n))
            size[id(n)] = 1 + sum(size[id(c)] for c in kids)
            if size[id(n)] > MAX_NODES:
                raise AdvbenchError(f"{where}: line {n.start_mark.line + 1}: this node expands to more than "
                                    f"{MAX_NODES:,} YAML nodes through aliases: too large for a suite")
            continue
        if id(n) in size:  # reached again through an alias: walked already
            continue
        if id(n) in on_path:
            raise AdvbenchError(f"{where}: line {n.start_mark.line + 1}: recursive alias: the node anchored here "
                                f"contains an alias of itself")
        if n.tag not in _SAFE_TAGS:
            tag = n.tag.replace("tag:yaml.org,2002:", "!!")
            raise AdvbenchError(f"{where}: line {n.start_mark.line + 1}: tag {tag!r} is not allowed: a suite is plain "
                                f"data (read with yaml.safe_load; python tags are refused)")
        kids = []
        if isinstance(n, yaml.MappingNode):
            seen = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in seen:
                        raise AdvbenchError(f"{where}: line {k.start_mark.line + 1}: key {k.value!r} appears twice "
                                            f"(first on line {seen[k.value]})")
                    seen[k.value] = k.start_mark.line + 1
                kids += [k, v]
        elif isinstance(n, yaml.SequenceNode):
            kids = list(n.value)
        on_path.add(id(n))
        stack.append((n, kids))
        stack += [(c, None) for c in reversed(kids)]


def _unknown(where: str, line: int, key: Any, section: str, allowed: Sequence[str]) -> AdvbenchError:
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return AdvbenchError(f"{where}: line {line}: unknown key {key!r} in {section}{hint} "
                         f"(expected one of: {', '.join(allowed)})")


def load_suite(path) -> Suite:
    """Read and validate a suite file; every error names the file and the line."""
    import yaml

    from .data import DATASETS

    p = Path(path)
    where = str(p)
    if not p.is_file():
        raise AdvbenchError(f"suite file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdvbenchError(f"cannot read suite {p}: {exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_tags(node, where)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}: " if mark is not None else ""
        what = " ".join(str(exc.problem or exc).split())
        raise AdvbenchError(f"{where}: {line}invalid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise AdvbenchError(f"{where}: invalid YAML: {' '.join(str(exc).split())}") from None
    if node is None or data is None:
        raise AdvbenchError(f"{where}: the suite is empty")
    loc = _Loc(node)
    if not isinstance(data, dict):
        raise AdvbenchError(f"{where}: line {loc.line}: a suite is a mapping with models, threats and attacks")
    for k in data:
        if k not in TOP_KEYS:
            raise _unknown(where, loc.key_line(k), k, "the suite", TOP_KEYS)

    def err(line: int, msg: str) -> AdvbenchError:
        return AdvbenchError(f"{where}: line {line}: {msg}")

    def typed(d: dict, dl: _Loc, key: str, kinds, what: str, section: str):
        if key not in d or d[key] is None:
            return None
        v = d[key]
        ok = isinstance(v, bool) if kinds is bool else (isinstance(v, kinds) and not isinstance(v, bool))
        if not ok:
            raise err(dl.child(key).line, f"{section}{key} must be {what} (got {v!r})")
        return v

    settings: Dict[str, Any] = {}
    for key, kinds, what in (("name", str, "a string"), ("description", str, "a string"),
                             ("dataset", str, "a dataset name"), ("data_dir", str, "a path"),
                             ("download", bool, "true or false"), ("n_examples", numbers.Integral, "an integer"),
                             ("batch_size", numbers.Integral, "an integer"), ("seed", numbers.Integral, "an integer"),
                             ("device", str, "auto, cpu or cuda"), ("results_dir", str, "a path"),
                             ("masking_checks", bool, "true or false"), ("channels_last", bool, "true or false"),
                             ("compile", bool, "true or false")):
        v = typed(data, loc, key, kinds, what, "")
        if v is not None:
            settings[key] = v
    for key in ("n_examples", "batch_size"):
        if key in settings and settings[key] < 1:
            raise err(loc.child(key).line, f"{key} must be >= 1 (got {settings[key]})")
    if "seed" in settings:
        from .runtime import check_seed

        _wrap(lambda: check_seed(settings["seed"], "seed"), where, loc.child("seed").line)
    if "n_examples" in data and data["n_examples"] is None:
        settings["n_examples"] = None
    if "dataset" in settings:
        _wrap(lambda: DATASETS.canonical(settings["dataset"]), where, loc.child("dataset").line)
    if "device" in settings:
        d = str(settings["device"]).strip().lower()
        if not (d in ("auto", "cpu") or d.startswith("cuda")):
            raise err(loc.child("device").line, f"device must be auto, cpu or cuda (got {settings['device']!r})")

    def seq(key: str) -> Tuple[list, _Loc]:
        if key not in data or data[key] is None:
            raise err(loc.line, f"missing {key!r} (a list)")
        v = data[key]
        if not isinstance(v, list) or not v:
            raise err(loc.child(key).line, f"{key!r} must be a non-empty list")
        return v, loc.child(key)

    # models
    from .models import MODELS

    models: List[Dict[str, Any]] = []
    items, sl = seq("models")
    for i, m in enumerate(items):
        il = sl.child(i)
        section = f"models[{i}]"
        if isinstance(m, str):
            m = {"name": m}
        if not isinstance(m, dict):
            raise err(il.line, f"{section} must be a model name or a mapping with name / checkpoint / dataset")
        for k in m:
            if k not in MODEL_KEYS:
                raise _unknown(where, il.key_line(k), k, section, MODEL_KEYS)
        for k in MODEL_KEYS:
            typed(m, il, k, str, "a string", f"{section}.")
        if not m.get("name") and not m.get("checkpoint"):
            raise err(il.line, f"{section} needs a name (zoo baseline) or a checkpoint")
        if m.get("name"):
            _wrap(lambda: MODELS.canonical(m["name"]), where, il.child("name").line)
        if m.get("dataset"):
            _wrap(lambda: DATASETS.canonical(m["dataset"]), where, il.child("dataset").line)
        if m.get("checkpoint") and not Path(m["checkpoint"]).is_file():
            raise err(il.child("checkpoint").line, f"{section}: checkpoint not found: {m['checkpoint']}")
        models.append({k: m.get(k) for k in MODEL_KEYS})

    # threat models
    threats: List[ThreatModel] = []
    items, sl = seq("threats")
    for i, t in enumerate(items):
        il = sl.child(i)
        section = f"threats[{i}]"
        if not isinstance(t, dict):
            raise err(il.line, f"{section} must be a mapping such as {{norm: linf, eps: 8/255}}")
        for k in t:
            if k not in THREAT_KEYS:
                raise _unknown(where, il.key_line(k), k, section, THREAT_KEYS)
        if "eps" not in t:
            raise err(il.line, f"{section} needs eps")
        norm = _wrap(lambda: check_norm(t.get("norm", "linf")), where, il.child("norm").line)
        values = t["eps"] if isinstance(t["eps"], list) else [t["eps"]]
        if not values:
            raise err(il.child("eps").line, f"{section}.eps is an empty list")
        for j, e in enumerate(values):
            el = il.child("eps").child(j) if isinstance(t["eps"], list) else il.child("eps")
            if isinstance(e, bool) or not isinstance(e, (int, float, str)):
                raise err(el.line, f"invalid eps {e!r} in {section}: expected a number or a fraction such as 8/255")
            tm = ThreatModel(norm, _wrap(lambda: parse_eps(e, norm), where, el.line))
            if tm not in threats:
                threats.append(tm)

    # attacks
    import attacks as attack_pkg

    raw: List[Any] = []
    items, sl = seq("attacks")
    lines: List[int] = []
    for i, a in enumerate(items):
        il = sl.child(i)
        section = f"attacks[{i}]"
        if isinstance(a, str):
            a = {"name": a}
        if not isinstance(a, dict) or "name" not in a:
            raise err(il.line, f"{section} must be an attack name or a mapping with a name")
        typed(a, il, "name", str, "an attack name", f"{section}.")
        if typed(a, il, "label", str, "a string", f"{section}.") is not None and not a["label"].strip():
            raise err(il.child("label").line, f"{section}.label must not be empty")
        if a.get("seed") is not None:  # the engine takes any integer; a suite's seeds are the CLI's
            from .runtime import check_seed

            _wrap(lambda: check_seed(a["seed"], f"{section}.seed"), where, il.child("seed").line)
        canonical = _wrap(lambda: attack_pkg.ATTACKS.canonical(str(a["name"])), where, il.child("name").line)
        # the engine's parameters, and the attack's own (APGD: rho, momentum, n_target_classes)
        allowed = ATTACK_KEYS + attack_pkg.parameters(canonical)
        for k in a:
            if k not in allowed:
                raise _unknown(where, il.key_line(k), k, section, allowed)
        raw.append(a)
        lines.append(il.line)
    specs = _wrap(lambda: parse_attack_specs(raw), where, sl.line)
    for spec, line in zip(specs, lines):  # build each attack with each threat: bad values fail here
        for tm in threats:
            _wrap(lambda: spec.build(tm, settings.get("seed", 0)), where, line)

    name = settings.get("name") or p.stem
    return Suite(p, name, models, threats, specs, settings)


def _wrap(fn, where: str, line: int):
    try:
        return fn()
    except AdvbenchError as exc:
        raise AdvbenchError(f"{where}: line {line}: {exc}") from None
