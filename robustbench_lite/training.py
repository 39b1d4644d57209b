"""The one training loop, shared by `advbench train` (method "standard") and
`advbench train-robust` (adversarial methods from defenses/).

The loop owns: batching over tensors resident on the device, augmentation, optimiser and
learning-rate schedule, per-epoch evaluation, metrics CSV, atomic checkpoints each epoch and exact
resume. All randomness derives from (seed, epoch) through rng.epoch_seed (and the inner attack's
through rng.attack_seed), so a resumed run replays the same batches and ends with the same weights
as an uninterrupted one (on CPU).

``train(cfg, method, ...)`` takes one frozen TrainConfig (its checks run when it is built) and
talks through a runtime.Narrator. A Trainer does the work in named steps: ``resume()`` (the last
epoch's weights, optimiser, averager and history), then per epoch ``run_epoch()`` (the batch loop:
batch, learning rate, method loss, backward and step, weight averaging, running sums),
``evaluate_epoch()`` (test accuracy and robust validation of the model to ship), and
``save_epoch()`` or, when the method's collapse guard fires, ``roll_back()``. The method may
define ``begin_step`` (per-step schedules such as the eps ramp) and ``check_collapse``; SWA / EMA
weight averaging is built from ``cfg.swa_start`` / ``cfg.ema`` (defenses.averaging).

Robust early stopping (Rice, Wong & Kolter, "Overfitting in adversarially robust deep learning",
ICML 2020): with ``cfg.val_size = N`` the loop carves N examples off the training split
(deterministically: a permutation seeded with the constant VAL_SPLIT_SEED, so every run and every
seed holds out the same examples) and never trains on them. With ``robust_val`` it measures clean
and PGD accuracy on them after every epoch (``val_clean_acc``, ``val_pgd_acc``; ``val_fgsm_acc``
too when the method's collapse guard needs it) and keeps the epoch with the best ``val_pgd_acc``.

Files, for ``cfg.out = DIR/NAME.pt``:
  DIR/NAME.pt            the last epoch (resumable: optimiser, averager and history inside)
  DIR/NAME.best.pt       the epoch with the best ``val_pgd_acc`` (with ``robust_val``)
  DIR/NAME.metrics.csv   one row per epoch (losses, accuracies, lr, seconds, img/s)
With weight averaging the shipped weights (state_dict) are the averaged ones; the raw weights
travel inside the training state for resume.

Catastrophic-overfitting guard: a method may define ``check_collapse(history, row)``; when it
returns a message the loop restores the weights, optimiser and averager of the end of the
previous epoch, records the event in the metrics (``rolled_back`` = 1), stops, and says so.
A resumed run that had stopped stays stopped.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import attacks
from attacks.engine import attack_mode
from defenses.averaging import create_averager
from defenses.methods import METHODS, StepOutput, TrainingMethod

from . import distributed, evaluator
from .checkpoint import build_checkpoint, load_state, read_checkpoint, save_checkpoint
from .data import DATASETS, check_n_examples, load_dataset
from .errors import AdvbenchError, SettingError
from .fileio import LockBusy, atomic_write_text, check_not_directory, csv_text, ensure_dir, locked
from .models import MODELS, activation_factory, model_for_dataset
from .rng import epoch_seed
from .runtime import FastPaths, Narrator, check_positive, env_rank, resolve_device, seed_everything


SCHEDULES = ("cosine", "step", "cyclic", "constant")
OPTIMIZERS = ("sgd", "adam")


def _positive_number(value) -> bool:
    return value > 0 and math.isfinite(value)


@dataclass(frozen=True)
class TrainConfig:
    """One training's settings, checked when built (names of the model, dataset and activation;
    numbers: a SettingError names the parameter). ``out``: the checkpoint ("" until a caller has
    chosen one, e.g. the zoo entry)."""

    model: str = "smallcnn"
    dataset: str = "mnist-5k"
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    schedule: str = "cosine"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False
    seed: int = 0
    activation: str = "relu"
    smooth_backward: Optional[str] = None
    out: str = ""
    resume: bool = False
    device: str = "cpu"
    n_train: Optional[int] = None       # use a subset of the training split
    eval_batch_size: int = 500
    val_size: int = 0                   # hold out this many training examples for validation
    swa_start: Optional[int] = None     # SWA from this epoch on (defenses.averaging.SWA)
    swa_lr: Optional[float] = None      # constant learning rate from swa_start on (default: keep schedule)
    ema: Optional[float] = None         # EMA of the weights with this decay (defenses.averaging.EMA)
    fast: FastPaths = FastPaths()       # bf16 autocast (inner attack included), channels_last, torch.compile

    def __post_init__(self):
        MODELS.canonical(self.model)
        DATASETS.canonical(self.dataset)
        activation_factory(self.activation, self.smooth_backward)
        check_positive("epochs", self.epochs)
        check_positive("batch_size", self.batch_size)
        if self.val_size is None or self.val_size < 0:
            raise SettingError(f"{{val_size}} must be >= 0 (got {self.val_size})", "val_size")
        if self.swa_start is not None and not (1 <= self.swa_start <= self.epochs):
            raise SettingError(f"{{swa_start}} must be an epoch between 1 and {{epochs}} {self.epochs} "
                               f"(got {self.swa_start})", "swa_start", "epochs")
        if self.swa_lr is not None:
            if self.swa_start is None:
                raise SettingError("{swa_lr} needs {swa_start}", "swa_lr", "swa_start")
            if not _positive_number(self.swa_lr):
                raise SettingError(f"{{swa_lr}} must be a positive number (got {self.swa_lr})", "swa_lr")
        if not _positive_number(self.lr):
            raise SettingError(f"{{lr}} must be a positive number (got {self.lr})", "lr")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise SettingError(f"{{weight_decay}} must be a finite number >= 0 (got {self.weight_decay})",
                               "weight_decay")
        if not (0 <= self.momentum < 1):
            raise SettingError(f"{{momentum}} must be a number in [0, 1) (got {self.momentum})", "momentum")
        if self.optimizer not in OPTIMIZERS:
            raise SettingError(f"invalid {{optimizer}} {self.optimizer!r}: expected sgd or adam", "optimizer")
        if self.schedule not in SCHEDULES:
            raise SettingError(f"invalid {{schedule}} {self.schedule!r}: expected cosine, step, cyclic or constant",
                               "schedule")

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> "TrainConfig":
        """The configuration ``asdict`` stored in a checkpoint's training state. The fast paths are one
        ``fast`` entry, or (checkpoints of older versions) flat ``amp`` / ``channels_last`` / ``compile``
        keys; unknown keys are left out."""
        own = {f.name for f in fields(cls)} - {"fast"}
        fast = stored["fast"] if isinstance(stored.get("fast"), Mapping) else stored
        fast_keys = {f.name for f in fields(FastPaths)}
        return cls(**{k: v for k, v in stored.items() if k in own},
                   fast=FastPaths(**{k: v for k, v in fast.items() if k in fast_keys}))


@dataclass
class TrainResult:
    out: Path
    epochs_run: int
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    model: Any = None
    best_out: Optional[Path] = None
    stopped: Optional[str] = None      # why training stopped early (catastrophic overfitting), if it did


def lr_at(cfg: TrainConfig, step: int, total: int, steps_per_epoch: Optional[int] = None) -> float:
    """Learning rate at optimisation step ``step`` of ``total`` (per-iteration schedule); with
    ``cfg.swa_lr`` it is constant from epoch ``cfg.swa_start`` on (Izmailov et al.)."""
    if cfg.swa_lr is not None and cfg.swa_start is not None:
        spe = steps_per_epoch or max(1, total // max(1, cfg.epochs))
        if step // spe + 1 >= cfg.swa_start:
            return cfg.swa_lr
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
    if cfg.schedule == "step":  # /10 at 50% and 75% of training (Madry et al. / Rice et al. style)
        frac = step / max(1, total)
        return cfg.lr * (0.1 if frac >= 0.5 else 1.0) * (0.1 if frac >= 0.75 else 1.0)
    if cfg.schedule == "cyclic":  # Wong et al. 2020 (fast AT): linear 0 -> lr at 2/5 of training -> 0,
        frac, peak = (step + 1) / max(1, total), 0.4  # taken after the step, as their code does
        return cfg.lr * (frac / peak if frac <= peak else max(0.0, (1 - frac) / (1 - peak)))
    return cfg.lr


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding 2 for 28px, 4 for 32px) and, for colour images, horizontal flip."""
    n, c, h, w = x.shape
    pad = 4 if h >= 32 else 2
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]
    out = xp.permute(0, 2, 3, 1)[torch.arange(n, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    if c == 3:
        flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.contiguous()


def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500, device=None,
             sharded: bool = False) -> float:
    """Clean accuracy (evaluator.accuracy: eval mode, the model's modes restored after). ``sharded``:
    under torchrun each rank counts its strided share of the examples and the counts are
    all-reduced (every rank returns the same number)."""
    device = device or next(model.parameters()).device
    total = len(y)
    if sharded:
        mine = distributed.shard(total)
        x, y = x[mine.to(x.device)], y[mine.to(y.device)]
    correct = evaluator.accuracy(model, x, y, batch_size, device=device)
    if sharded:
        correct = distributed.all_reduce_sum(correct)
    return correct.item() / max(1, total)


def make_optimizer(cfg: TrainConfig, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=False)


def metrics_path(out: Path) -> Path:
    return out.with_name(out.stem + ".metrics.csv")


def best_path(out: Path) -> Path:
    return out.with_name(out.stem + ".best.pt")


def _write_metrics(path: Path, rows: List[Dict[str, Any]]) -> None:
    if rows:
        atomic_write_text(path, csv_text(rows, float_format="{:.6g}", lineterminator="\r\n"))


VAL_SPLIT_SEED = 20200220  # fixed: every run holds out the same validation examples


def split_train_val(n: int, val_size: int = 0, n_train: Optional[int] = None, seed: int = 0):
    """(train ids, validation ids) into a training split of ``n`` examples.

    The validation ids are the first ``val_size`` of a permutation seeded with VAL_SPLIT_SEED
    (independent of the run's seed), sorted; the training ids are the rest, in order. ``n_train``
    then draws a subset of those with a permutation seeded with ``seed`` (as Dataset.subset does)."""
    if val_size:
        if val_size >= n:
            raise SettingError(f"{{val_size}} {val_size} leaves no training examples (the split has {n})", "val_size")
        g = torch.Generator().manual_seed(VAL_SPLIT_SEED)
        perm = torch.randperm(n, generator=g)
        val_ids = perm[:val_size].sort().values
        keep = torch.ones(n, dtype=torch.bool)
        keep[val_ids] = False
        pool = torch.nonzero(keep).reshape(-1)
    else:
        val_ids = torch.zeros(0, dtype=torch.int64)
        pool = torch.arange(n)
    if n_train is not None:
        check_n_examples(n_train, len(pool), "the training examples" + (" left after {val_size}" if val_size else ""),
                         setting="n_train", mentions=("val_size",))
        if n_train < len(pool):
            g = torch.Generator().manual_seed(int(seed))
            pool = pool[torch.randperm(len(pool), generator=g)[:n_train].sort().values]
    return pool, val_ids


@dataclass
class RobustValidation:
    """Per-epoch robust validation on the held-out split: PGD (``steps`` steps, default step size,
    fixed seed, so epochs are compared on the same attack) and, when asked, FGSM."""

    threat: Any                     # robustbench_lite.threat.ThreatModel
    steps: int = 10
    seed: int = 0
    batch_size: int = 500
    extra_attacks: tuple = ()       # e.g. ("fgsm",) for the catastrophic-overfitting guard

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor, sharded: bool = False) -> Dict[str, float]:
        """Accuracies on (x, y), the model in eval mode (attack_mode). ``sharded``: under torchrun each
        rank attacks its strided share (sample ids stay the global indices, so the numbers equal a
        single-process run) and the counts are all-reduced."""
        device = next(model.parameters()).device
        specs = {"pgd": dict(steps=self.steps, restarts=1)}
        for name in self.extra_attacks:
            specs.setdefault(name, {})
        atks = {name: attacks.create(name, threat=self.threat, seed=self.seed, **kw) for name, kw in specs.items()}
        keys = ["clean", *atks]
        correct = torch.zeros(len(keys), dtype=torch.int64, device=device)
        total = len(y)
        mine = distributed.shard(total) if sharded else torch.arange(total)
        with attack_mode(model, "eval"):
            for i in range(0, len(mine), self.batch_size):
                ids = mine[i:i + self.batch_size]
                xb, yb = x[ids.to(x.device)].to(device), y[ids.to(y.device)].to(device)
                ids = ids.to(device)
                correct[0] += evaluator.accuracy(model, xb, yb, self.batch_size)
                for k, atk in enumerate(atks.values(), start=1):
                    correct[k] += evaluator.accuracy(model, atk(model, xb, yb, sample_ids=ids), yb, self.batch_size)
        if sharded:
            correct = distributed.all_reduce_sum(correct)
        return {f"val_{k}_acc": v / max(1, total) for k, v in zip(keys, correct.tolist())}

    def with_attacks(self, names) -> "RobustValidation":
        """This validation also running the attacks ``names`` (a collapse guard's, e.g. ("fgsm",))."""
        extra = tuple(names or ())
        if not extra or set(extra) <= set(self.extra_attacks):
            return self
        return replace(self, extra_attacks=tuple(self.extra_attacks) + extra)


def _has_guard(method) -> bool:
    fn = getattr(type(method), "check_collapse", None)
    return fn is not None and fn is not TrainingMethod.check_collapse


def _rank_share(xb, yb, idx, ctx):
    """This rank's strided share of a global batch and the weight of its mean loss (share size x
    world size / global size: DDP's gradient average then equals the global batch's gradient, so
    N processes take the same steps as one). A rank left without a share of a tiny last batch runs
    one example with weight 0, so that every rank still joins the gradient all-reduce."""
    n = len(idx)
    sel = torch.arange(ctx.rank, n, ctx.world_size, device=idx.device)
    if len(sel) == 0:
        return xb[:1], yb[:1], idx[:1], 0.0
    return xb[sel], yb[sel], idx[sel], len(sel) * ctx.world_size / n


class _EpochSums:
    """The running sums of one epoch's metrics, kept on the device (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seen = self.clean_seen = self.global_seen = 0
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.adv_correct = torch.zeros((), device=device)
        self.extra: Dict[str, Any] = {}
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def add(self, out: StepOutput, y: torch.Tensor, weight: float, global_bs: int) -> None:
        """One step's output on this rank's ``y`` (weight 0: a rank with no share, which counts nothing)."""
        self.nonfinite |= ~torch.isfinite(out.loss.detach())  # checked every 10 steps (see Trainer.run_epoch)
        bs = len(y) if weight else 0
        self.global_seen += global_bs
        self.loss += out.loss.detach().float() * bs
        if out.logits is not None and bs:
            yl = getattr(out, "clean_y", None)
            yl = y if yl is None else yl
            self.correct += (out.logits.detach().argmax(1) == yl).sum()
            self.clean_seen += len(yl)
        if out.adv_logits is not None and bs:
            self.adv_correct += (out.adv_logits.detach().argmax(1) == y).sum()
        for k, v in out.stats.items():
            v = v.detach().to(device=self.device, dtype=torch.float64) if torch.is_tensor(v) else float(v)
            self.extra[k] = self.extra.get(k, 0.0) + v * bs
        self.seen += bs

    def shown(self) -> Tuple[float, float]:
        """(mean loss, accuracy) so far, for the progress display (clean accuracy, else adversarial)."""
        acc = self.correct.item() / self.clean_seen if self.clean_seen else self.adv_correct.item() / max(1, self.seen)
        return self.loss.item() / max(1, self.seen), acc

    def all_reduce(self) -> None:
        """The sums over all ranks (one collective; every rank gets the totals)."""
        keys = sorted(self.extra)
        vals = [float(self.seen), float(self.clean_seen), self.loss, self.correct, self.adv_correct,
                *[self.extra[k] for k in keys]]
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in vals])
        t = distributed.all_reduce_sum(t).tolist()
        self.seen, self.clean_seen = int(round(t[0])), int(round(t[1]))
        self.loss, self.correct, self.adv_correct = torch.tensor(t[2]), torch.tensor(t[3]), torch.tensor(t[4])
        self.extra = dict(zip(keys, t[5:]))

    def row(self, adversarial: bool) -> Dict[str, Any]:
        """The epoch's training metrics (means over the examples seen)."""
        row: Dict[str, Any] = {
            "train_loss": self.loss.item() / self.seen,
            "train_acc": self.correct.item() / self.clean_seen if self.clean_seen else float("nan"),
        }
        if adversarial:
            row["train_adv_acc"] = self.adv_correct.item() / self.seen
        for k, v in self.extra.items():
            row[f"train_{k}"] = float(v) / self.seen
        return row


PROGRESS_FIELDS = "loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1%}  {task.fields[ips]:.0f} img/s"


class Trainer:
    """One training of ``cfg``: the model (and the module the steps run: compiled, DDP-wrapped), its
    optimiser and weight averager, the data split, the history and the best score so far. Under
    torchrun every rank holds the data and the same weights and trains on its share of each global
    batch; only rank 0 writes files or talks."""

    def __init__(self, cfg: TrainConfig, method: TrainingMethod, dataset=None, narrator: Narrator = Narrator(),
                 robust_val: Optional[RobustValidation] = None, x_val=None, y_val=None):
        self.cfg, self.method = cfg, method
        self.averager = create_averager(cfg.swa_start, cfg.ema)
        if robust_val is not None:
            if not cfg.val_size:
                raise SettingError("robust validation needs held-out training examples: set {val_size} > 0",
                                   "val_size")
            robust_val = robust_val.with_attacks(getattr(method, "validation_attacks", ()))
        self.robust_val = robust_val
        self.select = "val_pgd_acc" if robust_val is not None else None  # the metric that picks best.pt
        device = resolve_device(cfg.device)
        self.ctx = distributed.init(device)
        self.device = distributed.local_device(device)
        self.narrator = narrator.quieter(not self.ctx.is_main)
        self.ds = dataset if dataset is not None else load_dataset(cfg.dataset)
        if len(self.ds.y_train) == 0:  # an image folder (imagenet, imagefolder:PATH) is a test split only
            raise AdvbenchError(f"dataset {self.ds.name} has no training images (an evaluation-only image folder): "
                                f"nothing to train a model on; evaluate a checkpoint instead")
        self.out = Path(cfg.out)
        ensure_dir(self.out.parent)
        seed_everything(cfg.seed)
        self.model = model_for_dataset(cfg.model, self.ds, activation=cfg.activation,
                                       smooth_backward=cfg.smooth_backward)
        self.net = cfg.fast.accelerate(self.model, self.device)  # compiled with fast.compile (lazily)
        self.opt = make_optimizer(cfg, self.model)
        self._split(x_val, y_val)
        self.guard = _has_guard(method)
        self.begin_step = getattr(method, "begin_step", None)  # optional: per-step schedules (eps ramp)
        self.start_epoch, self.epochs_run = 1, 0
        self.history: List[Dict[str, Any]] = []
        self.best_score, self.stopped = -math.inf, None

    def _split(self, x_val, y_val) -> None:
        """The training split on the device (less the held-out examples), the held-out split, the test
        split (or ``x_val``/``y_val``) and the steps per epoch."""
        cfg, ds = self.cfg, self.ds
        train_ids, val_ids = split_train_val(len(ds.y_train), cfg.val_size, cfg.n_train, cfg.seed)
        self.x_train, self.y_train = ds.x_train[train_ids].to(self.device), ds.y_train[train_ids].to(self.device)
        self.x_hold, self.y_hold = ds.x_train[val_ids], ds.y_train[val_ids]
        self.ids = train_ids.to(self.device)  # sample ids for the attacks' random numbers: index in the split
        self.x_test = x_val if x_val is not None else ds.x_test
        self.y_test = y_val if y_val is not None else ds.y_test
        self.n = len(self.y_train)
        self.steps_per_epoch = math.ceil(self.n / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs

    # -- resume ------------------------------------------------------------------------------------
    def resume(self) -> None:
        """With ``cfg.resume``: the weights, optimiser, averager, history and best score of the last
        epoch in ``cfg.out`` (nothing when it does not exist yet)."""
        out, say = self.out, self.narrator.say
        if not self.cfg.resume:
            return
        if not out.is_file():
            say(f"{self.narrator.setting('resume')}: {out} does not exist yet, starting from scratch")
            return
        ck = read_checkpoint(out)
        state = self._resumable_state(ck)
        load_state(self.model, state.get("raw_state_dict") or ck["state_dict"], source=f"checkpoint {out}")
        if ck.get("optimizer"):
            self.opt.load_state_dict(ck["optimizer"])
        self.start_epoch = int(ck["epoch"]) + 1
        self.history = list(state.get("history", []))
        self.best_score = float(state.get("best_score", -math.inf))
        self.stopped = state.get("stopped")
        if self.averager is not None and state.get("averager") is not None:
            self.averager.load_state_dict(state["averager"], self.model)
        if self.stopped:
            say(f"resuming {out}: training had stopped after epoch {self.start_epoch - 1} ({self.stopped}); "
                f"nothing to do")
        else:
            say(f"resuming {out} from epoch {self.start_epoch} of {self.cfg.epochs}")

    def _resumable_state(self, ck: Dict[str, Any]) -> Dict[str, Any]:
        """The training state of checkpoint ``ck`` (a SettingError when it cannot resume this training)."""
        out, model_name = self.out, self.model.spec["name"]
        state = (ck.get("extra") or {}).get("train_state")
        if ck.get("format") is None or state is None:
            raise SettingError(f"{{resume}}: {out} is not a resumable training checkpoint", "resume")
        if ck["model"] != model_name:
            raise SettingError(f"{{resume}}: {out} holds model {ck['model']!r}, not {model_name!r}", "resume")
        was = (ck.get("defense") or {}).get("method")
        now = self.method.config().get("method")
        if was and now and was != now:
            raise SettingError(f"{{resume}}: {out} was trained with method {was!r}, not {now!r} "
                               f"(use another {{out}} to start a new run)", "resume", "out")
        return state

    # -- the epochs --------------------------------------------------------------------------------
    def fit(self, on_epoch_end: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> None:
        """The epochs from ``start_epoch`` on, until the last or a collapse; ``on_epoch_end(epoch, row)``
        after each one's files are written."""
        if self.ctx.enabled:  # the steps' gradients all-reduced across ranks (attacks unwrap this layer)
            cuda = self.device.type == "cuda"
            self.net = DistributedDataParallel(self.net, device_ids=[self.device.index] if cuda else None)
        with self.narrator.progress(PROGRESS_FIELDS, unit="images") as progress:
            for epoch in range(self.start_epoch, self.cfg.epochs + 1):
                if self.stopped:
                    break
                snapshot = self.snapshot() if self.guard else None
                row = self.run_epoch(epoch, progress)
                shipped = self.evaluate_epoch(row)
                self.epochs_run += 1
                collapse = self.method.check_collapse(self.history, row) if self.guard else None
                if collapse:
                    self.roll_back(row, snapshot, collapse)
                else:
                    self.save_epoch(row, shipped)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, row)
        distributed.barrier()  # the other ranks read what rank 0 wrote (best.pt, the last checkpoint)

    def run_epoch(self, epoch: int, progress) -> Dict[str, Any]:
        """One pass over the training split in the order of (seed, epoch), shown on ``progress``: the
        epoch's training metrics."""
        cfg, seed = self.cfg, epoch_seed(self.cfg.seed, epoch)
        self.model.train()
        torch.manual_seed(seed)  # dropout & co: replayed exactly on resume
        gen = torch.Generator().manual_seed(seed)  # batch order and augmentation
        perm = torch.randperm(self.n, generator=gen).to(self.device)
        task = progress.add_task(f"epoch {epoch}/{cfg.epochs}", total=self.n, loss=0.0, acc=0.0, ips=0.0)
        sums, t0 = _EpochSums(self.device), time.perf_counter()
        for b in range(self.steps_per_epoch):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            xb, yb, ids, weight = self.batch(idx, gen)
            step = (epoch - 1) * self.steps_per_epoch + b
            self.set_lr(step)
            if self.begin_step is not None:
                self.begin_step(epoch, b, self.steps_per_epoch)
            out = self.step(xb, yb, ids, epoch, weight)
            if self.averager is not None:
                self.averager.update(self.model, epoch, step)
            sums.add(out, yb, weight, len(idx))
            if b % 10 == 0 or b == self.steps_per_epoch - 1:
                self.report(sums, epoch, b, progress, task, t0)
        if self.ctx.enabled:  # the epoch's sums over all ranks (also a sync point: the slowest rank's time)
            sums.all_reduce()
        seconds = time.perf_counter() - t0
        progress.remove_task(task)
        return {"epoch": epoch, "lr": self.opt.param_groups[0]["lr"], **sums.row(self.method.adversarial),
                "seconds": seconds, "img_per_s": sums.seen / max(seconds, 1e-9)}

    def batch(self, idx: torch.Tensor, gen: torch.Generator):
        """Global batch ``idx`` (augmented as a whole: the same random crops on every rank), this rank's
        share of it: (images, labels, sample ids, weight of the share's mean loss)."""
        xb, yb = self.x_train[idx], self.y_train[idx]
        if self.cfg.augment:
            xb = augment_batch(xb, gen)
        weight = 1.0
        if self.ctx.enabled:
            xb, yb, idx, weight = _rank_share(xb, yb, idx, self.ctx)
        return self.cfg.fast.inputs(xb), yb, self.ids[idx], weight

    def set_lr(self, step: int) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.cfg, step, self.total_steps, self.steps_per_epoch)

    def step(self, xb, yb, ids, epoch: int, weight: float) -> StepOutput:
        """The method's loss on the batch, its gradient, one optimiser step."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.fast.amp == "bf16"):
            out = self.method.loss(self.net, xb, yb, ids, epoch)
        self.opt.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; weighting each rank's mean loss by its share of the
        # global batch makes that average the gradient of the global batch's mean loss
        (out.loss * weight if self.ctx.enabled else out.loss).backward()
        self.opt.step()
        return out

    def report(self, sums: _EpochSums, epoch: int, b: int, progress, task, t0: float) -> None:
        """After step ``b`` (every 10 steps: a host sync): stop on a loss that is not finite, move the
        progress display."""
        if sums.nonfinite.item():  # every rank sees it at the same step (DDP averages NaN gradients)
            raise SettingError(f"training diverged at epoch {epoch}: the loss is not finite by step {b + 1} of "
                               f"{self.steps_per_epoch}; lower {{lr}}", "lr")
        loss, acc = sums.shown()
        ips = sums.global_seen / max(time.perf_counter() - t0, 1e-9)
        progress.update(task, completed=sums.global_seen, loss=loss, acc=acc, ips=ips)

    def shipped(self) -> torch.nn.Module:
        """The model to evaluate and ship: the averaged one with SWA / EMA (once it averages), else the model."""
        return self.averager.averaged_model(self.model, self.x_train) if self.averager is not None else self.model

    def evaluate_epoch(self, row: Dict[str, Any]) -> torch.nn.Module:
        """Test accuracy (and robust validation) of the model to ship, into ``row``; that model."""
        model = self.shipped()
        row["test_acc"] = accuracy(model, self.x_test, self.y_test, self.cfg.eval_batch_size, self.device,
                                   sharded=self.ctx.enabled)
        if self.robust_val is not None:
            row.update(self.robust_val(model, self.x_hold, self.y_hold, sharded=self.ctx.enabled))
        return model

    # -- the end of an epoch: files, or a rollback -------------------------------------------------
    def snapshot(self) -> Dict[str, Any]:
        """An in-memory copy (not aliases) of everything an epoch changes, for a rollback."""
        return {"model": copy.deepcopy(self.model.state_dict()), "opt": copy.deepcopy(self.opt.state_dict()),
                "averager": copy.deepcopy(self.averager.state_dict()) if self.averager is not None else None}

    def checkpoint(self, model, epoch: int, metrics: Dict[str, Any]) -> Dict[str, Any]:
        """A checkpoint of ``model`` after ``epoch`` with the resumable training state."""
        train_state = {"history": self.history, "best_score": self.best_score,
                       "averager": self.averager.state_dict() if self.averager is not None else None,
                       "config": asdict(self.cfg), "stopped": self.stopped}
        defense = _defense_config(self.method, self.averager, self.cfg)
        return build_checkpoint(model, dataset=self.ds.name, defense=defense, metrics=metrics, epoch=epoch,
                                optimizer=self.opt.state_dict(), extra={"train_state": train_state})

    def save_epoch(self, row: Dict[str, Any], shipped: torch.nn.Module) -> None:
        """Record the epoch: history, best score, best.pt (if improved), the last checkpoint, metrics."""
        epoch = row["epoch"]
        self.history.append(row)
        improved = False
        if self.select:
            score = float(row.get(self.select, -math.inf))
            if score > self.best_score:
                self.best_score, improved = score, True
        if self.ctx.is_main:  # rank 0 writes
            ck = self.checkpoint(shipped, epoch, {k: v for k, v in row.items() if k != "epoch"})
            if shipped is not self.model:  # resume needs the raw weights; the averaged ones are what we ship
                ck["extra"]["train_state"]["raw_state_dict"] = {k: v.detach().cpu() for k, v in
                                                                 self.model.state_dict().items()}
            # best.pt first: the last checkpoint records best_score, so once it is written a resume
            # will not rewrite best.pt for this epoch
            if improved:
                save_checkpoint(best_path(self.out), {**ck, "optimizer": None, "extra": {"best_epoch": epoch}})
            save_checkpoint(self.out, ck)
            _write_metrics(metrics_path(self.out), self.history)
        self.narrator.say(_epoch_line(row, self.cfg.epochs))

    def roll_back(self, row: Dict[str, Any], snapshot: Dict[str, Any], collapse: str) -> None:
        """Training collapsed in this epoch: back to the weights, optimiser and averager of the end of
        the previous one; the epoch is recorded as rolled back, and training stops (also on resume)."""
        epoch = row["epoch"]
        self.model.load_state_dict(snapshot["model"])
        self.opt.load_state_dict(snapshot["opt"])
        if self.averager is not None:
            self.averager.load_state_dict(snapshot["averager"], self.model)
        row["rolled_back"] = 1
        self.history.append(row)
        self.stopped = collapse + f"; rolled back to the weights of epoch {epoch - 1} and stopped"
        self.narrator.say(_epoch_line(row, self.cfg.epochs))
        self.narrator.say(self.stopped, style="bold red")
        if not self.ctx.is_main:  # rank 0 writes; the others roll back in memory only
            return
        _write_metrics(metrics_path(self.out), self.history)
        if epoch > 1:
            ck = read_checkpoint(self.out)  # the previous epoch's, still on disk
            ck["extra"]["train_state"].update(history=self.history, stopped=self.stopped)
        else:  # nothing worth shipping was trained: keep the initial weights, marked stopped
            ck = self.checkpoint(self.model, 0, {})
        save_checkpoint(self.out, ck)

    def result(self) -> TrainResult:
        """What the training leaves: its files, its metrics and the shipped model (in eval mode)."""
        final = self.shipped()
        final.eval()
        best = best_path(self.out) if self.select else None
        return TrainResult(out=self.out, epochs_run=self.epochs_run, metrics=self.history, model=final,
                           best_out=best if best is not None and best.exists() else None, stopped=self.stopped)


def _output_locked(train_fn):
    """Hold a lock on ``cfg.out`` for the whole training (rank 0 only; under torchrun the others follow
    it): a second training of the same output is refused at once instead of re-running its epochs."""

    @functools.wraps(train_fn)
    def wrapper(cfg: TrainConfig, *args, **kwargs):
        out = Path(cfg.out)
        check_not_directory(out, "checkpoint")
        ensure_dir(out.parent)
        with contextlib.ExitStack() as stack:
            if env_rank() == 0:
                try:
                    stack.enter_context(locked(out, timeout=0))
                except LockBusy:
                    raise SettingError(f"{out} is being trained by another process (lock {out}.lock held); wait "
                                       f"for it to finish or choose another {{out}}", "out") from None
            return train_fn(cfg, *args, **kwargs)

    return wrapper


@_output_locked
def train(cfg: TrainConfig, method: Optional[TrainingMethod] = None, *, dataset=None,
          narrator: Narrator = Narrator(), robust_val: Optional[RobustValidation] = None, x_val=None, y_val=None,
          on_epoch_end: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> TrainResult:
    """Train ``cfg.model`` on ``dataset`` (default: ``cfg.dataset``) with ``method`` (default: standard
    training), talking through ``narrator`` (default: a progress display on stderr, no lines).

    Writes ``cfg.out`` (last epoch, with optimiser state) after every epoch, ``<out>.metrics.csv``,
    and with ``robust_val`` ``<out>.best.pt`` (the epoch with the best val_pgd_acc). ``x_val``/``y_val``
    replace the test split for the per-epoch ``test_acc``; ``on_epoch_end(epoch, row)`` runs after
    each epoch's files are written."""
    trainer = Trainer(cfg, method if method is not None else METHODS.create("standard"), dataset, narrator,
                      robust_val, x_val, y_val)
    trainer.resume()
    trainer.fit(on_epoch_end)
    return trainer.result()


def _defense_config(method, averager, cfg: Optional[TrainConfig] = None) -> Dict[str, Any]:
    c = dict(method.config())
    if averager is not None:
        c.update(averager.config() if hasattr(averager, "config") else {"averaging": type(averager).__name__})
    if cfg is not None and cfg.smooth_backward:
        c["smooth_backward"] = cfg.smooth_backward
    return c


def _epoch_line(row: Dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}"]
    if not math.isnan(row["train_acc"]):
        parts.append(f"train acc {row['train_acc']:.2%}")
    if "train_adv_acc" in row:
        parts.append(f"train adv acc {row['train_adv_acc']:.2%}")
    parts.append(f"test acc {row['test_acc']:.2%}")
    for k, v in row.items():
        if k.startswith("val_"):
            parts.append(f"{k.replace('_', ' ')} {v:.2%}" if "acc" in k else f"{k} {v:.4g}")
    parts.append(f"{row['seconds']:.1f} s ({row['img_per_s']:.0f} img/s)")
    return "  ".join(parts)
