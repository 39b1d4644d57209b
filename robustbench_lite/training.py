"""The one training loop, shared by `advbench train` (method "standard") and
`advbench train-robust` (adversarial methods from defenses/).

The loop owns: batching over tensors resident on the device, augmentation, optimiser and
learning-rate schedule, per-epoch evaluation, metrics CSV, atomic checkpoints each epoch and exact
resume. All randomness derives from (seed, epoch), so a resumed run replays the same batches and
ends with the same weights as an uninterrupted one (on CPU).

Hooks used by defenses: ``validate(model, epoch) -> dict`` (any extra per-epoch metrics),
``select`` (the metric that picks best.pt), and ``averager`` (SWA / EMA weight averaging; built
from ``cfg.swa_start`` / ``cfg.ema`` when not given).

Robust early stopping (Rice, Wong & Kolter, "Overfitting in adversarially robust deep learning",
ICML 2020): with ``cfg.val_size = N`` the loop carves N examples off the training split
(deterministically: a permutation seeded with the constant VAL_SPLIT_SEED, so every run and every
--seed holds out the same examples) and never trains on them. With ``robust_val`` it measures clean
and PGD accuracy on them after every epoch (``val_clean_acc``, ``val_pgd_acc``; ``val_fgsm_acc``
too when the method's collapse guard needs it) and keeps the epoch with the best ``val_pgd_acc``.

Files, for ``cfg.out = DIR/NAME.pt``:
  DIR/NAME.pt            the last epoch (resumable: optimiser, averager and history inside)
  DIR/NAME.best.pt       the epoch with the best ``select`` metric (robust training: val_pgd_acc)
  DIR/NAME.metrics.csv   one row per epoch (losses, accuracies, lr, seconds, img/s)
With weight averaging the shipped weights (state_dict) are the averaged ones; the raw weights
travel inside the training state for --resume.

Catastrophic-overfitting guard: a method may define ``check_collapse(history, row)``; when it
returns a message the loop restores the weights, optimiser and averager of the end of the
previous epoch, records the event in the metrics (``rolled_back`` = 1), stops, and says so.
A resumed run that had stopped stays stopped.
"""
from __future__ import annotations

import copy
import csv
import io
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .checkpoint import build_checkpoint, read_checkpoint, save_checkpoint, load_state
from .errors import AdvbenchError
from .fileio import atomic_write_text, ensure_dir
from . import distributed
from .runtime import (parse_amp, check_positive, compile_model, env_rank, progress_bar, seed_everything,
                      to_memory_format)


SCHEDULES = ("cosine", "step", "cyclic", "constant")


@dataclass
class TrainConfig:
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
    amp: Optional[str] = None           # "bf16": forward passes (inner attack included) under torch.autocast
    channels_last: bool = False         # NHWC memory format for model and data
    compile: bool = False               # torch.compile the model used for the training steps

    def validate(self) -> None:
        self.amp = parse_amp(self.amp)
        check_positive("epochs", self.epochs)
        check_positive("batch_size", self.batch_size)
        if self.val_size is None or self.val_size < 0:
            raise AdvbenchError(f"--val-size must be >= 0 (got {self.val_size})")
        if self.swa_start is not None and not (1 <= self.swa_start <= self.epochs):
            raise AdvbenchError(f"--swa-start must be an epoch between 1 and --epochs {self.epochs} "
                                f"(got {self.swa_start})")
        if self.swa_lr is not None:
            if self.swa_start is None:
                raise AdvbenchError("--swa-lr needs --swa-start")
            if not (self.swa_lr > 0 and math.isfinite(self.swa_lr)):
                raise AdvbenchError(f"--swa-lr must be a positive number (got {self.swa_lr})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise AdvbenchError(f"--lr must be a positive number (got {self.lr})")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise AdvbenchError(f"--weight-decay must be a finite number >= 0 (got {self.weight_decay})")
        if not (0 <= self.momentum < 1):
            raise AdvbenchError(f"momentum must be a number in [0, 1) (got {self.momentum})")
        if self.optimizer not in ("sgd", "adam"):
            raise AdvbenchError(f"invalid --optimizer {self.optimizer!r}: expected sgd or adam")
        if self.schedule not in SCHEDULES:
            raise AdvbenchError(f"invalid --schedule {self.schedule!r}: expected cosine, step, cyclic or constant")


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


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500, device=None,
             sharded: bool = False) -> float:
    """Clean accuracy in eval mode. ``sharded``: under torchrun each rank counts its strided share
    of the examples and the counts are all-reduced (every rank returns the same number)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total = len(y)
    if sharded:
        mine = distributed.shard(total)
        x, y = x[mine.to(x.device)], y[mine.to(y.device)]
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, len(y), batch_size):
        xb = x[i:i + batch_size].to(device, non_blocking=True)
        correct += (model(xb).argmax(1) == y[i:i + batch_size].to(device)).sum()
    model.train(was_training)
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
    if not rows:
        return
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


VAL_SPLIT_SEED = 20200220  # fixed: every run holds out the same validation examples


def split_train_val(n: int, val_size: int = 0, n_train: Optional[int] = None, seed: int = 0):
    """(train ids, validation ids) into a training split of ``n`` examples.

    The validation ids are the first ``val_size`` of a permutation seeded with VAL_SPLIT_SEED
    (independent of --seed), sorted; the training ids are the rest, in order. ``n_train`` then
    draws a subset of those with a permutation seeded with ``seed`` (as Dataset.subset does)."""
    from .data import check_n_examples

    if val_size:
        if val_size >= n:
            raise AdvbenchError(f"--val-size {val_size} leaves no training examples (the split has {n})")
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
        check_n_examples(n_train, len(pool), "the training examples" + (" left after --val-size" if val_size else ""),
                         setting="n_train")
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
        """Accuracies on (x, y). ``sharded``: under torchrun each rank attacks its strided share
        (sample ids stay the global indices, so the numbers equal a single-process run) and the
        counts are all-reduced."""
        import attacks

        device = next(model.parameters()).device
        specs = {"pgd": dict(steps=self.steps, restarts=1)}
        for name in self.extra_attacks:
            specs.setdefault(name, {})
        atks = {name: attacks.create(name, threat=self.threat, seed=self.seed, **kw) for name, kw in specs.items()}
        keys = ["clean", *atks]
        correct = torch.zeros(len(keys), dtype=torch.int64, device=device)
        total = len(y)
        mine = distributed.shard(total) if sharded else torch.arange(total)
        was = model.training
        model.eval()
        try:
            for i in range(0, len(mine), self.batch_size):
                ids = mine[i:i + self.batch_size]
                xb, yb = x[ids.to(x.device)].to(device), y[ids.to(y.device)].to(device)
                ids = ids.to(device)
                with torch.no_grad():
                    correct[0] += (model(xb).argmax(1) == yb).sum()
                for k, atk in enumerate(atks.values(), start=1):
                    xa = atk(model, xb, yb, sample_ids=ids)
                    with torch.no_grad():
                        correct[k] += (model(xa).argmax(1) == yb).sum()
        finally:
            model.train(was)
        if sharded:
            correct = distributed.all_reduce_sum(correct)
        return {f"val_{k}_acc": v / max(1, total) for k, v in zip(keys, correct.tolist())}


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch)) % (2 ** 63 - 1)


def _snapshot(model, opt, averager) -> Dict[str, Any]:
    """An in-memory copy (not aliases) of everything an epoch changes, for a rollback."""
    return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
            "averager": copy.deepcopy(averager.state_dict()) if averager is not None else None}


def _has_guard(method) -> bool:
    from defenses.methods import TrainingMethod

    fn = getattr(type(method), "check_collapse", None)
    return fn is not None and fn is not TrainingMethod.check_collapse


def _training_module(model, cfg: TrainConfig, device: torch.device, ctx) -> torch.nn.Module:
    """The module the training steps call: ``model`` itself, torch.compile'd with --compile, wrapped
    in DistributedDataParallel under torchrun. It shares ``model``'s parameters, so the optimiser,
    checkpoints and weight averaging keep working on ``model``; attacks unwrap the DDP layer
    (attacks.engine.unwrap) and so run the compiled local module."""
    net = compile_model(model) if cfg.compile else model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


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


def _reduce_epoch_sums(seen, clean_seen, loss_acc, corr_acc, adv_acc, extra_sums, device):
    """All-reduce the epoch's running sums (one collective; every rank gets the totals)."""
    keys = sorted(extra_sums)
    vals = [float(seen), float(clean_seen), loss_acc, corr_acc, adv_acc, *[extra_sums[k] for k in keys]]
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in vals])
    t = distributed.all_reduce_sum(t).tolist()
    return (int(round(t[0])), int(round(t[1])), torch.tensor(t[2]), torch.tensor(t[3]), torch.tensor(t[4]),
            dict(zip(keys, t[5:])))


def _output_locked(train_fn):
    """Hold a lock on ``cfg.out`` for the whole training (rank 0 only; under torchrun the others follow
    it): a second training of the same output is refused at once instead of re-running its epochs."""
    import contextlib
    import functools

    from .fileio import LockBusy, check_not_directory, locked

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
                    raise AdvbenchError(f"{out} is being trained by another process (lock {out}.lock held); wait "
                                        f"for it to finish or choose another --out") from None
            return train_fn(cfg, *args, **kwargs)

    return wrapper


@_output_locked
def train(cfg: TrainConfig, method=None, *, dataset=None, model=None,
          validate: Optional[Callable[[Any, int], Dict[str, float]]] = None, select: Optional[str] = None,
          averager=None, console=None, quiet: bool = False, x_val=None, y_val=None,
          on_epoch_end: Optional[Callable[[int, Dict[str, Any]], None]] = None,
          robust_val: Optional[RobustValidation] = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.dataset`` with ``method`` (default: standard training).

    Writes ``cfg.out`` (last epoch, with optimiser state) after every epoch, ``<out>.metrics.csv``,
    and ``<out>.best.pt`` when ``select`` names a metric to maximise (default with ``robust_val``:
    val_pgd_acc). ``x_val``/``y_val`` replace the test split for the per-epoch ``test_acc``."""
    from .data import load_dataset
    from .models import model_for_dataset
    from .runtime import resolve_device

    if method is None:
        from defenses.methods import METHODS

        method = METHODS.create("standard")
    cfg.validate()
    if averager is None and (cfg.swa_start is not None or cfg.ema is not None):
        from defenses.averaging import create_averager

        averager = create_averager(cfg.swa_start, cfg.ema)
    if robust_val is not None:
        if not cfg.val_size:
            raise AdvbenchError("robust validation needs held-out training examples: set --val-size > 0")
        extra = tuple(getattr(method, "validation_attacks", ()) or ())
        if extra and not set(extra) <= set(robust_val.extra_attacks):
            robust_val = replace(robust_val, extra_attacks=tuple(robust_val.extra_attacks) + extra)
        select = select or "val_pgd_acc"
    device = resolve_device(cfg.device)
    # under torchrun: one process per device; every rank holds the data and the same weights and
    # trains on its share of each global batch (see the batch loop); only rank 0 writes or prints
    ctx = distributed.init(device)
    device = distributed.local_device(device)
    quiet = quiet or not ctx.is_main
    ds = dataset if dataset is not None else load_dataset(cfg.dataset)
    out = Path(cfg.out)
    ensure_dir(out.parent)
    seed_everything(cfg.seed)
    if model is None:
        model = model_for_dataset(cfg.model, ds, activation=cfg.activation, smooth_backward=cfg.smooth_backward)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, model)

    train_ids, val_ids = split_train_val(len(ds.y_train), cfg.val_size, cfg.n_train, cfg.seed)
    x_train, y_train = ds.x_train[train_ids].to(device), ds.y_train[train_ids].to(device)
    x_hold, y_hold = ds.x_train[val_ids], ds.y_train[val_ids]
    ids_all = train_ids.to(device)  # sample ids for the attacks' random numbers: index in the split
    n = len(y_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    start_epoch, history, best_score, stopped = 1, [], -math.inf, None
    if cfg.resume and out.is_file():
        ck = read_checkpoint(out)
        state = (ck.get("extra") or {}).get("train_state")
        if ck.get("format") is None or state is None:
            raise AdvbenchError(f"--resume: {out} is not a resumable training checkpoint")
        if ck["model"] != model.spec["name"]:
            raise AdvbenchError(f"--resume: {out} holds model {ck['model']!r}, not {model.spec['name']!r}")
        was = (ck.get("defense") or {}).get("method")
        now = method.config().get("method")
        if was and now and was != now:
            raise AdvbenchError(f"--resume: {out} was trained with method {was!r}, not {now!r} "
                                f"(use another --out to start a new run)")
        load_state(model, state.get("raw_state_dict") or ck["state_dict"], source=f"checkpoint {out}")
        if ck.get("optimizer"):
            opt.load_state_dict(ck["optimizer"])
        start_epoch = int(ck["epoch"]) + 1
        history = list(state.get("history", []))
        best_score = float(state.get("best_score", -math.inf))
        stopped = state.get("stopped")
        if averager is not None and state.get("averager") is not None:
            averager.load_state_dict(state["averager"], model)
        if not quiet and console is not None:
            if stopped:
                console.print(f"resuming {out}: training had stopped after epoch {start_epoch - 1} ({stopped}); "
                              f"nothing to do")
            else:
                console.print(f"resuming {out} from epoch {start_epoch} of {cfg.epochs}")
    elif cfg.resume and not quiet and console is not None:
        console.print(f"--resume: {out} does not exist yet, starting from scratch")
    net = _training_module(model, cfg, device, ctx)  # what the steps run: compiled and/or DDP-wrapped

    progress = progress_bar("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1%}  {task.fields[ips]:.0f} img/s",
                            quiet=quiet, unit="images")
    best_out = best_path(out) if select else None
    x_test = x_val if x_val is not None else ds.x_test
    y_test = y_val if y_val is not None else ds.y_test
    guard = _has_guard(method)
    begin_step = getattr(method, "begin_step", None)  # optional: per-step schedules (eps ramp)
    epochs_run = 0
    with progress:
        for epoch in range(start_epoch, cfg.epochs + 1):
            if stopped:
                break
            snapshot = _snapshot(model, opt, averager) if guard else None
            model.train()
            torch.manual_seed(_epoch_seed(cfg.seed, epoch))  # dropout & co: replayed exactly on --resume
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=gen).to(device)
            task = progress.add_task(f"epoch {epoch}/{cfg.epochs}", total=n, loss=0.0, acc=0.0, ips=0.0)
            t0 = time.perf_counter()
            seen, clean_seen, global_seen = 0, 0, 0
            loss_acc = torch.zeros((), device=device)
            corr_acc = torch.zeros((), device=device)
            adv_acc = torch.zeros((), device=device)
            extra_sums: Dict[str, torch.Tensor] = {}
            nonfinite = torch.zeros((), dtype=torch.bool, device=device)
            for b in range(steps_per_epoch):
                idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                xb, yb = x_train[idx], y_train[idx]
                if cfg.augment:
                    xb = augment_batch(xb, gen)  # the whole global batch: same random crops on every rank
                global_bs = len(idx)
                weight = 1.0
                if ctx.enabled:
                    xb, yb, idx, weight = _rank_share(xb, yb, idx, ctx)
                xb = to_memory_format(xb, cfg.channels_last)
                step = (epoch - 1) * steps_per_epoch + b
                for g in opt.param_groups:
                    g["lr"] = lr_at(cfg, step, total_steps, steps_per_epoch)
                if begin_step is not None:
                    begin_step(epoch, b, steps_per_epoch)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                    outp = method.loss(net, xb, yb, ids_all[idx], epoch)
                nonfinite |= ~torch.isfinite(outp.loss.detach())  # checked every 10 steps: no per-step host sync
                opt.zero_grad(set_to_none=True)
                # DDP averages gradients over ranks; weighting each rank's mean loss by its share of
                # the global batch makes that average the gradient of the global batch's mean loss
                (outp.loss * weight if ctx.enabled else outp.loss).backward()
                opt.step()
                if averager is not None:
                    averager.update(model, epoch, step)
                bs = len(yb) if weight else 0  # a rank with no share of a tiny last batch counts nothing
                global_seen += global_bs
                loss_acc += outp.loss.detach().float() * bs
                if outp.logits is not None and bs:
                    yl = getattr(outp, "clean_y", None)
                    yl = yb if yl is None else yl
                    corr_acc += (outp.logits.detach().argmax(1) == yl).sum()
                    clean_seen += len(yl)
                if outp.adv_logits is not None and bs:
                    adv_acc += (outp.adv_logits.detach().argmax(1) == yb).sum()
                for k, v in outp.stats.items():
                    v = v.detach().to(device=device, dtype=torch.float64) if torch.is_tensor(v) else float(v)
                    extra_sums[k] = extra_sums.get(k, 0.0) + v * bs
                seen += bs
                if b % 10 == 0 or b == steps_per_epoch - 1:
                    if nonfinite.item():  # every rank sees it at the same step (DDP averages NaN gradients)
                        raise AdvbenchError(f"training diverged at epoch {epoch}: the loss is not finite by step "
                                            f"{b + 1} of {steps_per_epoch}; lower --lr")
                    el = time.perf_counter() - t0
                    shown = corr_acc.item() / clean_seen if clean_seen else adv_acc.item() / max(1, seen)
                    progress.update(task, completed=global_seen, loss=loss_acc.item() / max(1, seen),
                                    acc=shown, ips=global_seen / max(el, 1e-9))
            if ctx.enabled:  # the epoch's sums over all ranks (also a sync point, so the time is the slowest rank's)
                seen, clean_seen, loss_acc, corr_acc, adv_acc, extra_sums = _reduce_epoch_sums(
                    seen, clean_seen, loss_acc, corr_acc, adv_acc, extra_sums, device)
            seconds = time.perf_counter() - t0
            progress.remove_task(task)
            row: Dict[str, Any] = {
                "epoch": epoch,
                "lr": opt.param_groups[0]["lr"],
                "train_loss": loss_acc.item() / seen,
                "train_acc": corr_acc.item() / clean_seen if clean_seen else float("nan"),
            }
            if method.adversarial:
                row["train_adv_acc"] = adv_acc.item() / seen
            for k, v in extra_sums.items():
                row[f"train_{k}"] = float(v) / seen
            row["seconds"] = seconds
            row["img_per_s"] = seen / max(seconds, 1e-9)
            eval_model = averager.averaged_model(model, x_train) if averager is not None else model
            row["test_acc"] = accuracy(eval_model, x_test, y_test, cfg.eval_batch_size, device, sharded=ctx.enabled)
            if robust_val is not None:
                row.update(robust_val(eval_model, x_hold, y_hold, sharded=ctx.enabled))
            if validate is not None:
                row.update(validate(eval_model, epoch))
            epochs_run += 1

            collapse = method.check_collapse(history, row) if guard else None
            if collapse:  # roll back to the end of the previous epoch, record it, stop
                model.load_state_dict(snapshot["model"])
                opt.load_state_dict(snapshot["opt"])
                if averager is not None:
                    averager.load_state_dict(snapshot["averager"], model)
                row["rolled_back"] = 1
                history.append(row)
                stopped = collapse + f"; rolled back to the weights of epoch {epoch - 1} and stopped"
                if console is not None and not quiet:
                    console.print(_epoch_line(row, cfg.epochs))
                    console.print(stopped, style="bold red", markup=False, highlight=False)
                if ctx.is_main:  # rank 0 writes; the others roll back in memory only
                    _write_metrics(metrics_path(out), history)
                    if epoch > 1:
                        ck = read_checkpoint(out)  # the previous epoch's, still on disk
                        ck["extra"]["train_state"].update(history=history, stopped=stopped)
                        save_checkpoint(out, ck)
                    else:  # nothing worth shipping was trained: keep the initial weights, marked stopped
                        state0 = {"history": history, "best_score": best_score, "config": asdict(cfg),
                                  "averager": averager.state_dict() if averager is not None else None,
                                  "stopped": stopped}
                        ck = build_checkpoint(model, dataset=ds.name,
                                              defense=_defense_config(method, averager, cfg), metrics={}, epoch=0,
                                              optimizer=opt.state_dict(), extra={"train_state": state0})
                        save_checkpoint(out, ck)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, row)
                break

            history.append(row)
            improved = False
            if select:
                score = float(row.get(select, -math.inf))
                if score > best_score:
                    best_score, improved = score, True
            if ctx.is_main:  # the end-of-epoch files: best.pt (if improved), the resumable last checkpoint, metrics
                metrics = {k: v for k, v in row.items() if k != "epoch"}
                train_state = {"history": history, "best_score": best_score,
                               "averager": averager.state_dict() if averager is not None else None,
                               "config": asdict(cfg), "stopped": None}
                ck = build_checkpoint(eval_model, dataset=ds.name, defense=_defense_config(method, averager, cfg),
                                      metrics=metrics, epoch=epoch, optimizer=opt.state_dict(),
                                      extra={"train_state": train_state})
                if eval_model is not model:  # resume needs the raw weights; the averaged ones are what we ship
                    ck["extra"]["train_state"]["raw_state_dict"] = {k: v.detach().cpu() for k, v in
                                                                     model.state_dict().items()}
                # best.pt first: the last checkpoint records best_score, so once it is written a resume
                # will not rewrite best.pt for this epoch
                if improved and best_out is not None:
                    save_checkpoint(best_out, {**ck, "optimizer": None, "extra": {"best_epoch": epoch}})
                save_checkpoint(out, ck)
                _write_metrics(metrics_path(out), history)
            if console is not None and not quiet:
                console.print(_epoch_line(row, cfg.epochs))
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
    distributed.barrier()  # the other ranks read what rank 0 wrote (best.pt, the last checkpoint)
    final = averager.averaged_model(model, x_train) if averager is not None else model
    final.eval()
    return TrainResult(out=out, epochs_run=epochs_run, metrics=history, model=final,
                       best_out=best_out if best_out is not None and best_out.exists() else None,
                       stopped=stopped)


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
