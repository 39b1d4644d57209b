"""Runs: the only code that both evaluates and records, or trains and then evaluates.

An *evaluation run* (``execute_run``; `advbench attack`, each model of `advbench run SUITE`)
evaluates one model (a checkpoint, or the zoo baseline) on a dataset under threat models x
attacks and records it: ``<results>/runs/<run_id>/`` (runfolder.RunFolder, journaled batch by
batch so that an interrupted run resumes) and rows in the leaderboard. Its steps:

    check the settings and the destinations        (RunSpec, before anything expensive)
    load the data and the model                    (zoo.load_model: a baseline may be trained first)
    open the run folder                            (fresh, or the one being resumed)
    evaluate, then the gradient-masking checks     (evaluator.evaluate, masking.check_run)
    record: run files, then the leaderboard rows   (all or nothing)

A *robust-training run* (``run_robust_training``; `advbench train-robust`) trains with a defense
(training.train) and then evaluates the last and the best checkpoints with PGD as evaluation runs.

Everything a run says goes through a runtime.Narrator (the CLI's consoles, or silence).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from defenses.methods import MethodConfig

from . import distributed, leaderboard, masking
from .checkpoint import file_sha256, read_checkpoint
from .data import DATASETS, DEFAULT_DATASET, check_image_size, check_n_examples, is_streamed, load_dataset
from .errors import AdvbenchError, SettingError
from .evaluator import EvalResult, evaluate
from .fileio import ensure_dir
from .models import MODELS, check_takes
from .runfolder import RunFolder, RunInterrupted
from .runtime import (SILENT, AttackBars, FastPaths, Narrator, check_positive, check_seed, env_rank,
                      resolve_device)
from .sources import check_source, kind, weights_image_size
from .specs import AttackSpec, build_attacks, mode_name
from .threat import ThreatModel, check_norm, format_eps, parse_eps
from .training import RobustValidation, TrainConfig, TrainResult, train
from .zoo import load_model, uses_zoo, zoo_path


# --- an evaluation run ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One evaluation run, checked when built (names, counts, the attacks for every threat model, the
    device): nothing expensive happens before these checks pass.

    ``network``: a model built in Python (a torch.nn.Module taking images in [0, 1]) instead of a zoo
    name or a checkpoint; ``model`` is then its name in the leaderboard (default: its class name).
    ``results_dir`` None: nothing is recorded (no run folder, no leaderboard rows)."""

    model: Optional[str] = None
    checkpoint: Optional[str] = None
    dataset: Optional[str] = None           # None: the checkpoint's dataset, else data.DEFAULT_DATASET
    threats: Tuple[ThreatModel, ...] = ()
    attacks: Tuple[AttackSpec, ...] = ()
    cascade: bool = False                   # each attack only on the samples the earlier ones failed to fool
    n_examples: Optional[int] = 1000        # None: the whole test split
    batch_size: int = 256
    device: str = "auto"
    seed: int = 0
    results_dir: Optional[str] = "results"  # None: evaluate only, record nothing
    data_dir: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None        # an image folder's crop; None: the checkpoint's input size, else 224
    fast: FastPaths = FastPaths()           # channels_last, compile (amp is an attack setting: AttackSpec params)
    source: str = "advbench attack"         # what started the run (recorded in config.yaml)
    flags: Tuple[str, ...] = ()
    masking_checks: bool = True             # gradient-masking checks after the evaluation (masking.py)
    resume: Optional[str] = None            # id (or unique prefix) of an unfinished run to continue (runfolder.py)
    suite_entry: str = ""                   # "<suite key>:<model index>" for a suite's run (runfolder.py)
    network: Optional[torch.nn.Module] = field(default=None, compare=False, repr=False)  # a model built in Python
    weights: Optional[str] = None           # tv:/timm: pretrained weights: DEFAULT, a weights name, or a file
    model_dir: Optional[str] = None         # rb: RobustBench's layout <model_dir>/<dataset>/<threat>/<NAME>.pt
    normalize: Optional[str] = None         # MEAN/STD (or a dataset name) the checkpoint's network expects

    def __post_init__(self):
        for name in ("threats", "attacks", "flags"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check_seed(self.seed)
        if not isinstance(self.cascade, bool):
            raise SettingError(f"{{cascade}} must be True or False (got {self.cascade!r})", "cascade")
        if self.network is not None:
            if not isinstance(self.network, torch.nn.Module):
                raise SettingError(f"{{model}} must be a torch.nn.Module or a model name (got "
                                   f"{type(self.network).__name__})", "model")
            if self.checkpoint:
                raise SettingError("give a model built in Python or {checkpoint}, not both", "checkpoint")
            object.__setattr__(self, "model", self.model or type(self.network).__name__)
        elif not self.model and not self.checkpoint:
            raise SettingError("give {model} (the zoo baseline is used) or {checkpoint}", "model", "checkpoint")
        elif self.model:
            MODELS.canonical(self.model)
        if self.results_dir is None and self.resume:
            raise SettingError("{resume} needs the results folder the run was recorded in", "resume")
        if self.dataset:
            DATASETS.canonical(self.dataset)
        check_image_size(self.image_size)
        if self.image_size is not None and self.dataset and not is_streamed(self.dataset):
            raise SettingError(f"{{image_size}} applies to image folders (imagenet, imagefolder:PATH), not to "
                               f"{self.dataset}", "image_size")
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise AdvbenchError(f"checkpoint not found: {self.checkpoint}")
        check_source(self.model, self.checkpoint, self.weights, self.model_dir, self.normalize)
        if kind(self.model) == "rb" and len({t.norm for t in self.threats}) > 1:
            raise SettingError(f"{self.model} is RobustBench's model for one threat model: give one {{norm}} per run "
                               f"(got {', '.join(sorted({t.norm for t in self.threats}))})", "norm")
        if not self.threats:
            raise AdvbenchError("no threat model given")
        if not self.attacks:
            raise AdvbenchError("no attacks given")
        check_positive("batch_size", self.batch_size)
        check_positive("n_examples", self.n_examples)
        build_attacks(self.attacks, self.threats, self.seed)
        resolve_device(self.device)

    def dataset_reason(self, dataset: str, narrator: Narrator = SILENT) -> str:
        """Why the run evaluates on ``dataset``: the first line of a run says it, since a model name
        alone means the default, MNIST-like mnist-5k, whatever the architecture."""
        if self.dataset:
            return f"given with {narrator.setting('dataset')}"
        if self.checkpoint and dataset != DEFAULT_DATASET:
            return "the checkpoint's dataset"
        if self.checkpoint:
            return f"the checkpoint's dataset, or the default {DEFAULT_DATASET} when it names none"
        return (f"the default: no {narrator.setting('dataset')} given and no checkpoint naming one; "
                f"{narrator.help_hint}")


@dataclass
class RunRecord:
    """An evaluation run: its id and folder ("" and None when nothing was recorded), its EvalResult and
    what the leaderboard records of the model. ``clean_acc``, ``robust_acc`` (attack label -> robust
    accuracy) and ``worst_case_acc`` read the first threat model (``result`` holds them all)."""

    run_id: str
    run_dir: Optional[Path]
    result: EvalResult
    info: Dict[str, Any]

    @property
    def clean_acc(self) -> float:
        return self.result.clean_acc

    @property
    def robust_acc(self) -> Dict[str, float]:
        t = self.result.threats[0]
        return {label: t.robust_acc(label) for label in t.attacks}

    @property
    def worst_case_acc(self) -> float:
        return self.result.threats[0].worst_case_acc

    @property
    def evaluation(self) -> str:
        """What the worst case is worth: a reportable suite's name, or weak (an upper bound)."""
        return self.result.evaluation

    def summary(self) -> Dict[str, Any]:
        keep = ("model", "checkpoint", "checkpoint_sha256", "dataset", "dataset_sha256", "defense", "activation",
                "version", "warnings")
        return {"run_id": self.run_id, "run_dir": str(self.run_dir) if self.run_dir is not None else None,
                **{k: self.info.get(k) for k in keep},
                **self.result.summary()}


def execute_run(spec: RunSpec, narrator: Narrator = Narrator()) -> RunRecord:
    """Load the model and data, evaluate, write the run folder and append to the leaderboard.

    The run folder is created when the evaluation starts and every finished batch is saved in it
    (runfolder.py); ``spec.resume`` continues an unfinished run instead. Ctrl-C / SIGTERM during the
    evaluation raise runfolder.RunInterrupted. ``spec.results_dir`` None: evaluate only (no run
    folder, no leaderboard rows; the record's run_id is "" and its run_dir None)."""
    recording = spec.results_dir is not None
    if recording:
        check_destinations(spec.results_dir)
    resumed = _resumed_folder(spec)
    device = resolve_device(spec.device)
    ctx = distributed.init(device)  # under torchrun: one process per device, each attacks its shard
    if resumed is not None and ctx.enabled:
        raise SettingError(f"{{resume}} {spec.resume}: evaluations under torchrun are not "
                           f"journaled; resume run {resumed.run_id} in one process", "resume")
    device = distributed.local_device(device)
    narrator = narrator.quieter(not ctx.is_main)
    # a missing zoo baseline is trained by all ranks together (DDP; rank 0 writes it)
    model, ds, info = _load(spec, device, narrator)
    model = spec.fast.accelerate(model, device)
    data, n_total = _test_data(spec, ds, ctx)
    where = f"{ctx.world_size} x {device.type} (DDP)" if ctx.enabled else str(device)
    narrator.say(f"attacking {info['model']} ({info['checkpoint'] or 'a model built in Python'}) on {n_total} {info['dataset']} test images "
                 f"({spec.dataset_reason(info['dataset'], narrator)}): {', '.join(a.label for a in spec.attacks)} "
                 f"({mode_name(spec.cascade)}) x {', '.join(str(t) for t in spec.threats)} on {where}")
    config = _run_config(spec, info, n_total, device, ctx)
    if ds.streamed:  # what reloads its images (advbench report): the folder and the crop
        config.update(data_dir=spec.data_dir, image_size=int(ds.input_shape[1]))
    folder = _open_folder(spec, config, info, resumed, ctx, narrator) if recording else None
    journal = folder.journal() if folder is not None and not ctx.enabled else None  # DDP: no journal
    try:
        result, warnings = _evaluate(spec, model, data, device, ctx, journal, narrator)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (the CLI's handler raises a KeyboardInterrupt)
        if folder is None:
            raise
        raise RunInterrupted(folder.run_id, journal.count() if journal else 0,
                             journal.total if journal else None, journal.exact if journal else True) from exc
    except AdvbenchError:
        if folder is not None and resumed is None:
            folder.discard()  # a fresh run that failed leaves nothing behind
        raise
    if not ctx.is_main:
        return RunRecord("", Path(spec.results_dir) if recording else None, result, info)  # only rank 0 writes
    budget = [w for w in (t.atypical(data[0].shape[1:], info["dataset"]) for t in spec.threats) if w]
    for w in budget:  # on stderr: the run's output stays a table or JSON
        narrator.notice(f"warning: {w}")
    if not recording:
        info["flags"] = ";".join(config["flags"] + sorted({w.flag for w in warnings}))
        info["warnings"] = [w.message for w in warnings]
        return RunRecord("", None, result, info)
    return _record(spec, folder, resumed is not None, config, info, result, warnings, bool(budget))


def check_destinations(results_dir: str) -> None:
    """Everything a run records into can take it, checked before any work: the results dir is
    writable, its leaderboard is readable (the append refuses a corrupt one) and neither
    leaderboard.csv nor leaderboard.md is a directory."""
    ensure_dir(results_dir)
    leaderboard.read(results_dir)
    leaderboard.check_writable(results_dir)


def _resumed_folder(spec: RunSpec) -> Optional[RunFolder]:
    if not spec.resume:
        return None
    folder = RunFolder.find(spec.results_dir, spec.resume)
    folder.check_resumable()
    return folder


def _load(spec: RunSpec, device: torch.device, narrator: Narrator):
    """(model, dataset, info): the data is loaded and checked against the run's settings (n_examples
    within the test split, no L2 eps beyond any image distance) before a model is loaded or a
    baseline trained; a baseline about to be trained is announced with the dataset and why. A model
    built in Python (``spec.network``) is tried on one test image."""
    ckpt = read_checkpoint(spec.checkpoint) if spec.checkpoint else {}
    name = spec.dataset or ckpt.get("dataset") or DEFAULT_DATASET
    ds = load_dataset(name, data_dir=spec.data_dir, download=spec.download,
                      image_size=_image_size(spec, ckpt) if is_streamed(name) else spec.image_size)
    check_n_examples(spec.n_examples, len(ds.y_test), f"the test split of {ds.name}")
    for t in spec.threats:
        t.check_input_shape(ds.input_shape)
    if ds.name == "imagenet" and not ds.first_n:
        narrator.say(f"imagenet: the package robustbench is not installed, so the test split is all "
                     f"{len(ds.y_test):,} images (seeded subsets), not RobustBench's list of 5,000 (pip install "
                     f"'advbench[robustbench]')")
    if spec.network is not None:
        check_takes(spec.network, spec.model, ds)
        return spec.network, ds, network_info(spec.model, spec.network, ds)
    if uses_zoo(spec.model, spec.checkpoint, spec.weights) and not zoo_path(spec.model, ds).is_file():
        narrator.say(f"dataset {ds.name} ({spec.dataset_reason(ds.name, narrator)})")
    model, info = load_model(spec.model, spec.checkpoint, ds, seed=spec.seed, device=str(device), narrator=narrator,
                             weights=spec.weights, model_dir=spec.model_dir, normalize=spec.normalize,
                             norm=spec.threats[0].norm if spec.threats else "linf", download=spec.download)
    return model, ds, info


def network_info(name: str, network: torch.nn.Module, ds) -> Dict[str, Any]:
    """A model built in Python as the leaderboard records it: its name, no checkpoint file, and as
    checkpoint_sha256 the sha256 of its weights (names, dtypes, shapes, bytes), so that two models of
    the same class are two entries."""
    h = hashlib.sha256()
    for key, t in network.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
    return {"model": name, "checkpoint": "", "checkpoint_sha256": h.hexdigest(), "dataset": ds.name,
            "dataset_sha256": ds.fingerprint, "defense": "", "defense_params": "", "activation": "",
            "checkpoint_metrics": {}, "flags": ["python-model"]}


def _image_size(spec: RunSpec, ckpt) -> Optional[int]:
    """An image folder's crop: the run's image_size, else the checkpoint's input size (square), else the
    crop of tv:NAME's pretrained weights, else None (the dataset's default)."""
    if spec.image_size is not None:
        return spec.image_size
    shape = ckpt.get("input_shape") or []
    if len(shape) == 3 and isinstance(shape[1], int) and shape[1] == shape[2] and shape[1] >= 8:
        return int(shape[1])
    return weights_image_size(spec.model, spec.weights)


def _test_data(spec: RunSpec, ds, ctx) -> Tuple[Tuple[torch.Tensor, torch.Tensor, torch.Tensor], int]:
    """((x, y, sample ids) this process attacks, the run's number of examples): the seeded test
    subset, under torchrun this rank's strided shard of it; an image folder's x stays streamed."""
    x, y, ids = ds.subset("test", spec.n_examples, spec.seed)
    if not ds.streamed:
        x = spec.fast.inputs(x)
    n_total = len(y)
    if ctx.enabled:
        mine = distributed.shard(len(y), ctx)
        x, y, ids = x[mine], y[mine], ids[mine]
    return (x, y, ids), n_total


def _run_config(spec: RunSpec, info: Dict[str, Any], n_total: int, device, ctx) -> Dict[str, Any]:
    """The run's config.yaml (written when the evaluation starts; the run id is filled in then).
    Sets info's timestamp, device, seed and version; moves info's flags into the config's."""
    if ctx.enabled:
        info["flags"].append(f"ddp={ctx.world_size}")
    amps = sorted({str(a.params.get("amp")) for a in spec.attacks if a.params.get("amp")})
    flags = (info.pop("flags") + list(spec.flags) + [f"amp={a}" for a in amps] + spec.fast.flags()
             + leaderboard.environment_flags())
    info.update(timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"), device=str(device), seed=spec.seed,
                version=leaderboard.version(), flags=";".join(flags))
    resolved = build_attacks(spec.attacks, spec.threats[:1], spec.seed)
    source = {k: v for k, v in (("weights", spec.weights), ("model_dir", spec.model_dir),
                                ("normalize", spec.normalize)) if v is not None}
    if source:
        info["model_source"] = dict(source)  # how the model was loaded: the reportable command repeats it
    return {
        "run_id": "", "source": spec.source, "timestamp": info["timestamp"], "version": info["version"],
        "model": info["model"], "checkpoint": info["checkpoint"], "checkpoint_sha256": info["checkpoint_sha256"],
        "dataset": info["dataset"], "dataset_sha256": info["dataset_sha256"], "split": "test",
        "n_examples": n_total, "seed": spec.seed, "batch_size": spec.batch_size, "device": str(device),
        "mode": mode_name(spec.cascade),
        "defense": info["defense"], "activation": info["activation"], "flags": flags,
        "threats": [{"norm": t.norm, "eps": t.eps, "eps_label": format_eps(t.eps)} for t in spec.threats],
        "attacks": [{"label": a.label, "name": a.name, "params": dict(a.params),
                     "resolved": resolved[(spec.threats[0], a.label)].config()} for a in spec.attacks],
        **({"suite_entry": spec.suite_entry} if spec.suite_entry else {}),
        **({"model_source": source} if source else {}),
    }


def _open_folder(spec: RunSpec, config: Dict[str, Any], info: Dict[str, Any], resumed: Optional[RunFolder], ctx,
                 narrator: Narrator) -> Optional[RunFolder]:
    """The run folder: the resumed one (its stored configuration must match, before any attack: the
    saved batches are only valid for the same run), else a fresh one (rank 0 only)."""
    folder = None
    if resumed is not None:
        resumed.check_config(config)
        folder = resumed
        config["timestamp"] = info["timestamp"] = resumed.stored_config().get("timestamp", info["timestamp"])
    elif ctx.is_main:
        folder = RunFolder.create(spec.results_dir, config)
    if folder is not None:
        config["run_id"] = info["run_id"] = folder.run_id
    if resumed is not None:
        narrator.say(f"resuming run {folder.run_id}: {folder.journal().count()} finished batches saved")
    return folder


def _evaluate(spec: RunSpec, model, data, device, ctx, journal, narrator: Narrator):
    """(EvalResult of the whole run, masking warnings): the evaluation with its progress bars, the
    shards merged under torchrun (outcomes are keyed by sample id, so the merge equals a single-process
    run), then on rank 0 the gradient-masking checks."""
    x, y, ids = data
    bars = AttackBars(narrator.progress(unit="samples"))
    with bars.progress:
        result = evaluate(model, x, y, spec.attacks, spec.threats, batch_size=spec.batch_size, device=device,
                          seed=spec.seed, sample_ids=ids, cascade=spec.cascade, on_progress=bars, journal=journal)
    if ctx.enabled:
        result = EvalResult.merge(distributed.all_gather_objects(result))
    warnings = []
    if ctx.is_main and spec.masking_checks:
        warnings = masking.check_run(model, x, y, ids, result.cumulative(), device=device, seed=spec.seed)
        for w in warnings:
            narrator.warn(w.message)
    return result, warnings


def _record(spec: RunSpec, folder: RunFolder, resumed: bool, config, info, result: EvalResult, warnings,
            atypical_eps: bool) -> RunRecord:
    """Write the run files and append the leaderboard rows (all or nothing: a fresh run that cannot
    be recorded leaves no folder, a resumed one keeps its saved batches)."""
    flags = config["flags"] + sorted({w.flag for w in warnings}) + (["atypical-eps"] if atypical_eps else [])
    config["flags"] = flags
    info["flags"] = ";".join(flags)
    info["warnings"] = [w.message for w in warnings]
    record = RunRecord(folder.run_id, folder.path, result, info)
    summary = record.summary()
    summary["checkpoint_metrics"] = info.get("checkpoint_metrics", {})
    summary["flags"] = flags
    summary["masking"] = {"checked": spec.masking_checks, "warnings": [w.to_dict() for w in warnings]}
    try:
        leaderboard.write_run_files(folder.path, config, summary, result.outcome_rows())
        leaderboard.append(spec.results_dir, leaderboard.result_rows(result, info))
    except AdvbenchError:
        if not resumed:
            folder.discard()
        raise
    folder.finish()
    return record


# --- `advbench train-robust`: method + validation + training + final evaluation -----------------
# --- a robust-training run ------------------------------------------------------------------------
# `advbench train-robust`'s training defaults (the loop's own defaults are `advbench train`'s)
ROBUST_TRAINING = TrainConfig(epochs=10, batch_size=32, lr=0.001, optimizer="adam", weight_decay=0.0, val_size=500,
                              device="auto")


@dataclass(frozen=True)
class RobustTraining:
    """`advbench train-robust`: a training with a defense, then the PGD evaluation of its last and
    best checkpoints, recorded in the leaderboard. Checked when built.

    ``train``: the loop's settings (``out`` "": the zoo entry MODEL-DATASET-FINGERPRINT-METHOD...);
    ``method``: the defense (its seed is the training's); ``eps`` None: 0.3 for grey-scale images,
    8/255 for colour ones (default_eps); ``val_steps``: PGD steps of the per-epoch validation on the
    ``train.val_size`` held-out images; ``eval_steps`` / ``n_eval`` / ``eval_batch_size``: the final
    evaluation (``evaluate`` False: none)."""

    train: TrainConfig = ROBUST_TRAINING
    method: MethodConfig = MethodConfig()
    eps: Union[str, float, None] = None
    norm: str = "linf"
    data_dir: Optional[str] = None
    download: bool = False
    val_steps: int = 10
    evaluate: bool = True
    eval_steps: int = 20
    n_eval: Optional[int] = 1000
    eval_batch_size: int = 500
    results_dir: str = "results"

    def __post_init__(self):
        object.__setattr__(self, "method", replace(self.method, seed=self.train.seed))
        object.__setattr__(self, "norm", check_norm(self.norm))
        for name in ("val_steps", "eval_steps", "n_eval", "eval_batch_size"):
            check_positive(name, getattr(self, name))
        if self.eps is not None:
            parse_eps(self.eps, self.norm)

    def threat(self, ds) -> ThreatModel:
        """The training's threat model on the images of ``ds``."""
        threat = ThreatModel.parse(self.norm, self.eps if self.eps is not None else default_eps(ds))
        threat.check_input_shape(ds.input_shape)
        return threat

    def out(self, ds) -> Path:
        """The checkpoint: ``train.out``, else the zoo entry
        MODEL-DATASET-FINGERPRINT-METHOD[-swa|-ema][-ACT].pt (zoo.zoo_path)."""
        cfg = self.train
        if cfg.out:
            return Path(cfg.out)
        tag = self.method.method + ("-swa" if cfg.swa_start is not None else "") + ("-ema" if cfg.ema is not None else "")
        act = cfg.activation if not cfg.smooth_backward else f"relu-sb-{cfg.smooth_backward}"
        return zoo_path(cfg.model, ds, tag, act)


@dataclass
class RobustTrainReport:
    result: TrainResult
    threat: Any
    out: Path
    best_out: Optional[Path]
    best_epoch: Optional[int]
    evaluations: Dict[str, Any] = field(default_factory=dict)   # "final" / "best" -> RunRecord
    evaluation_skipped: bool = False   # nothing was trained and the leaderboard holds the evaluation already


def default_eps(ds) -> float:
    """0.3 for grey-scale datasets (MNIST-like, Madry et al.), 8/255 for colour ones (CIFAR)."""
    return 0.3 if ds.in_channels == 1 else 8 / 255


def run_robust_training(rt: RobustTraining, narrator: Narrator = Narrator()) -> RobustTrainReport:
    """Train with the defense (training.train; resumable), say how it went, then evaluate the last and
    the best checkpoints with PGD as evaluation runs (unless ``rt.evaluate`` is False)."""
    ds = load_dataset(rt.train.dataset, data_dir=rt.data_dir, download=rt.download)
    threat = rt.threat(ds)
    method = rt.method.build(threat, rt.train.epochs)
    cfg = replace(rt.train, out=str(rt.out(ds)))
    if rt.evaluate:  # the final evaluation records in the results dir (the zoo is elsewhere): check it first
        ensure_dir(rt.results_dir)
    robust_val = RobustValidation(threat, steps=rt.val_steps, seed=cfg.seed) if cfg.val_size else None
    narrator = narrator.quieter(env_rank() != 0)  # under torchrun only rank 0 talks
    _announce(rt, cfg, method, ds.name, threat, narrator)
    res = train(cfg, method, dataset=ds, narrator=narrator, robust_val=robust_val)
    report = _training_report(rt, res, threat, Path(cfg.out), narrator)
    if rt.evaluate:
        _evaluate_checkpoints(rt, report, narrator)
    return report


def _announce(rt: RobustTraining, cfg: TrainConfig, method, dataset: str, threat: ThreatModel,
              narrator: Narrator) -> None:
    """The first lines: what is trained how, its inner attack and its validation."""
    act = cfg.activation + (f" (smooth backward: {cfg.smooth_backward})" if cfg.smooth_backward else "")
    inner = ""
    if hasattr(method, "attack_for"):  # a method with an inner attack
        a = method.attack_for(cfg.epochs)
        inner = (f", inner {a.name} {a.steps} step{'s' if a.steps > 1 else ''} of {a.alpha:.4g}"
                 f"{' from a random start' if a.random_start else ''}, BatchNorm {method.bn_mode}"
                 + (f", eps ramped over {method.eps_warmup} epochs" if method.eps_warmup else ""))
    validation = f"PGD-{rt.val_steps} on {cfg.val_size} held-out training images" if cfg.val_size else "none"
    narrator.say(f"{rt.method.method} training of {cfg.model} ({act}) on {dataset}, {threat}{inner}; {cfg.epochs} "
                 f"epochs; validation: {validation} -> {cfg.out}")
    if not cfg.val_size:
        narrator.say(f"{narrator.setting('val_size')} 0: no held-out validation, so no best-epoch checkpoint "
                     f"(robust early stopping is off)")


def _training_report(rt: RobustTraining, res: TrainResult, threat: ThreatModel, out: Path,
                     narrator: Narrator) -> RobustTrainReport:
    """The report of the training: its last epoch, its best epoch (by validation PGD accuracy) and
    why it stopped early, if it did."""
    best_epoch = None
    if res.best_out is not None:
        best_epoch = (read_checkpoint(res.best_out).get("extra") or {}).get("best_epoch")
    kept = [r for r in res.metrics if not r.get("rolled_back")]
    if kept:
        last = kept[-1]
        msg = f"last epoch {last['epoch']}: test acc {last['test_acc']:.2%}"
        if "val_pgd_acc" in last:
            msg += f", validation PGD-{rt.val_steps} acc {last['val_pgd_acc']:.2%}"
        narrator.say(msg + f" -> {out}")
        best = next((r for r in kept if r["epoch"] == best_epoch), None)
        if best is not None:
            narrator.say(f"best epoch {best_epoch} by validation PGD accuracy ({best['val_pgd_acc']:.2%}) -> "
                         f"{res.best_out}")
    if res.stopped:
        narrator.say(f"stopped early: {res.stopped}")
    return RobustTrainReport(res, threat, out, res.best_out, best_epoch)


def _evaluate_checkpoints(rt: RobustTraining, report: RobustTrainReport, narrator: Narrator) -> None:
    """The final evaluation: the last checkpoint and the best one (once when they ship the same
    weights), each an evaluation run recorded in the leaderboard; none when nothing was trained in
    this invocation and the leaderboard already holds it, or when no epoch was kept."""
    res, out = report.result, report.out
    if res.epochs_run == 0 and _final_eval_recorded(out, rt.results_dir):
        narrator.say("nothing was trained in this invocation: not evaluating again (its evaluation is in the "
                     "leaderboard)")
        report.evaluation_skipped = True
        return
    if int(read_checkpoint(out).get("epoch", 0)) < 1:
        narrator.say("no epoch was kept (collapse in the first epoch): nothing to evaluate")
        return
    targets = [("final", out)] + ([("best", res.best_out)] if res.best_out is not None else [])
    if res.best_out is not None and _same_weights(out, res.best_out):
        narrator.say("best epoch is the last one: evaluated once")
        targets = [("final+best", out)]
    for label, path in targets:
        record = evaluate_and_record(rt, path, report.threat, label, narrator)
        for key in label.split("+"):
            report.evaluations[key] = record
        r = record.result
        narrator.say(f"{label} model ({path}): clean {r.clean_acc:.2%}, PGD-{rt.eval_steps} "
                     f"{r.threats[0].robust_acc('pgd'):.2%} on {r.n_total} test images "
                     f"(leaderboard run {record.run_id})")


def evaluate_and_record(rt: RobustTraining, checkpoint: Path, threat: ThreatModel, label: str,
                        narrator: Narrator = SILENT) -> RunRecord:
    """The PGD-``eval_steps`` evaluation of a checkpoint of the training on the test split, recorded in
    the leaderboard with the checkpoint's defense and activation (one evaluation run, flagged
    ``train-robust:LABEL``). It takes the training's channels_last and compile, and stays float32."""
    cfg = rt.train
    spec = RunSpec(checkpoint=str(checkpoint), dataset=cfg.dataset, threats=(threat,),
                   attacks=(AttackSpec("pgd", {"steps": int(rt.eval_steps)}, "pgd"),), n_examples=rt.n_eval,
                   batch_size=rt.eval_batch_size, device=cfg.device, seed=cfg.seed, results_dir=rt.results_dir,
                   data_dir=rt.data_dir, download=rt.download, source="advbench train-robust",
                   flags=(f"train-robust:{label}",), fast=replace(cfg.fast, amp=None))
    return execute_run(spec, narrator)


def _final_eval_recorded(checkpoint: Path, results_dir: str) -> bool:
    """Whether the leaderboard already holds this checkpoint's final evaluation (a resume after a
    kill during the evaluation must run it again)."""
    try:
        df = leaderboard.read(results_dir)
    except AdvbenchError:
        return False
    if df.empty or "checkpoint_sha256" not in df.columns:
        return False
    digest = file_sha256(checkpoint)  # rows before the full hashes hold its first 12 hex
    return any(len(h) >= 12 and digest.startswith(h) for h in df["checkpoint_sha256"].astype(str))


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two checkpoints ship the same weights (their state_dicts, tensor by tensor)."""
    sa, sb = read_checkpoint(a).get("state_dict") or {}, read_checkpoint(b).get("state_dict") or {}
    return sa.keys() == sb.keys() and all(
        torch.is_tensor(sa[k]) and torch.is_tensor(sb[k]) and sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype
        and torch.equal(sa[k], sb[k]) for k in sa)
