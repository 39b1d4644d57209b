"""The one training loop, shared by `advbench train` (method "standard") and
`advbench train-robust` (adversarial methods from defenses/).

The loop owns: batching over tensors resident on the device, augmentation, optimiser and
learning-rate schedule, per-epoch evaluation, metrics CSV, atomic checkpoints each epoch and exact
resume. All randomness derives from (seed, epoch), so a resumed run replays the same batches and
ends with the same weights as an uninterrupted one (on CPU).

Hooks used by defenses: ``validate(model, epoch) -> dict`` (e.g. PGD accuracy on a held-out split),
``select`` (the metric that picks best.pt), and ``averager`` (SWA / EMA weight averaging).
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .checkpoint import build_checkpoint, read_checkpoint, save_checkpoint, load_state
from .errors import AdvbenchError
from .fileio import atomic_write_text, ensure_dir
from .runtime import check_positive, seed_everything


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

    def validate(self) -> None:
        check_positive("--epochs", self.epochs)
        check_positive("--batch-size", self.batch_size)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise AdvbenchError(f"--lr must be a positive number (got {self.lr})")
        if self.optimizer not in ("sgd", "adam"):
            raise AdvbenchError(f"invalid --optimizer {self.optimizer!r}: expected sgd or adam")
        if self.schedule not in ("cosine", "step", "constant"):
            raise AdvbenchError(f"invalid --schedule {self.schedule!r}: expected cosine, step or constant")


@dataclass
class TrainResult:
    out: Path
    epochs_run: int
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    model: Any = None
    best_out: Optional[Path] = None


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate at optimisation step ``step`` of ``total`` (per-iteration schedule)."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
    if cfg.schedule == "step":  # /10 at 50% and 75% of training (Madry et al. / Rice et al. style)
        frac = step / max(1, total)
        return cfg.lr * (0.1 if frac >= 0.5 else 1.0) * (0.1 if frac >= 0.75 else 1.0)
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
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500, device=None) -> float:
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    correct = 0
    for i in range(0, len(y), batch_size):
        xb = x[i:i + batch_size].to(device, non_blocking=True)
        correct += (model(xb).argmax(1).cpu() == y[i:i + batch_size].cpu()).sum().item()
    model.train(was_training)
    return correct / max(1, len(y))


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


def train(cfg: TrainConfig, method=None, *, dataset=None, model=None,
          validate: Optional[Callable[[Any, int], Dict[str, float]]] = None, select: Optional[str] = None,
          averager=None, console=None, quiet: bool = False, x_val=None, y_val=None,
          on_epoch_end: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.dataset`` with ``method`` (default: standard training).

    Writes ``cfg.out`` (last epoch, with optimiser state) after every epoch, ``<out>.metrics.csv``,
    and ``<out>.best.pt`` when ``select`` names a metric to maximise."""
    from .data import load_dataset
    from .models import model_for_dataset
    from .runtime import resolve_device

    if method is None:
        from defenses import METHODS

        method = METHODS.create("standard")
    cfg.validate()
    device = resolve_device(cfg.device)
    ds = dataset if dataset is not None else load_dataset(cfg.dataset)
    out = Path(cfg.out)
    ensure_dir(out.parent)
    seed_everything(cfg.seed)
    if model is None:
        model = model_for_dataset(cfg.model, ds, activation=cfg.activation, smooth_backward=cfg.smooth_backward)
    model.to(device)
    opt = make_optimizer(cfg, model)

    x_train, y_train = ds.x_train, ds.y_train
    if cfg.n_train is not None:
        x_train, y_train, _ = ds.subset("train", cfg.n_train, cfg.seed)
    x_train, y_train = x_train.to(device), y_train.to(device)
    ids_all = torch.arange(len(y_train), device=device)
    n = len(y_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    start_epoch, history, best_score = 1, [], -math.inf
    if cfg.resume and out.is_file():
        ck = read_checkpoint(out)
        state = (ck.get("extra") or {}).get("train_state")
        if ck.get("format") is None or state is None:
            raise AdvbenchError(f"--resume: {out} is not a resumable training checkpoint")
        if ck["model"] != model.spec["name"]:
            raise AdvbenchError(f"--resume: {out} holds model {ck['model']!r}, not {model.spec['name']!r}")
        load_state(model, state.get("raw_state_dict") or ck["state_dict"], source=f"checkpoint {out}")
        if ck.get("optimizer"):
            opt.load_state_dict(ck["optimizer"])
        start_epoch = int(ck["epoch"]) + 1
        history = list(state.get("history", []))
        best_score = float(state.get("best_score", -math.inf))
        if averager is not None and state.get("averager") is not None:
            averager.load_state_dict(state["averager"], model)
        if not quiet and console is not None:
            console.print(f"resuming {out} from epoch {start_epoch} of {cfg.epochs}")
    elif cfg.resume and not quiet and console is not None:
        console.print(f"--resume: {out} does not exist yet, starting from scratch")

    progress = _progress(console, quiet)
    best_out = best_path(out) if select else None
    x_val = x_val if x_val is not None else ds.x_test
    y_val = y_val if y_val is not None else ds.y_test
    with progress:
        for epoch in range(start_epoch, cfg.epochs + 1):
            model.train()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=gen).to(device)
            task = progress.add_task(f"epoch {epoch}/{cfg.epochs}", total=n, loss=0.0, acc=0.0, ips=0.0)
            t0 = time.perf_counter()
            sums = {"loss": 0.0, "correct": 0.0, "adv_correct": 0.0, "seen": 0}
            extra_sums: Dict[str, float] = {}
            loss_acc = torch.zeros((), device=device)
            corr_acc = torch.zeros((), device=device)
            adv_acc = torch.zeros((), device=device)
            for b in range(steps_per_epoch):
                idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                xb, yb = x_train[idx], y_train[idx]
                if cfg.augment:
                    xb = augment_batch(xb, gen)
                step = (epoch - 1) * steps_per_epoch + b
                for g in opt.param_groups:
                    g["lr"] = lr_at(cfg, step, total_steps)
                outp = method.loss(model, xb, yb, ids_all[idx], epoch)
                if not torch.isfinite(outp.loss):
                    raise AdvbenchError(f"training diverged at epoch {epoch} step {b} (loss is {outp.loss.item()}); "
                                        f"lower --lr")
                opt.zero_grad(set_to_none=True)
                outp.loss.backward()
                opt.step()
                if averager is not None:
                    averager.update(model, epoch, step)
                bs = len(yb)
                loss_acc += outp.loss.detach() * bs
                corr_acc += (outp.logits.detach().argmax(1) == yb).sum()
                if outp.adv_logits is not None:
                    adv_acc += (outp.adv_logits.detach().argmax(1) == yb).sum()
                for k, v in outp.stats.items():
                    extra_sums[k] = extra_sums.get(k, 0.0) + float(v) * bs
                sums["seen"] += bs
                if b % 10 == 0 or b == steps_per_epoch - 1:
                    el = time.perf_counter() - t0
                    progress.update(task, completed=sums["seen"], loss=loss_acc.item() / sums["seen"],
                                    acc=corr_acc.item() / sums["seen"], ips=sums["seen"] / max(el, 1e-9))
            seconds = time.perf_counter() - t0
            progress.remove_task(task)
            seen = sums["seen"]
            row: Dict[str, Any] = {
                "epoch": epoch,
                "lr": opt.param_groups[0]["lr"],
                "train_loss": loss_acc.item() / seen,
                "train_acc": corr_acc.item() / seen,
            }
            if method.adversarial:
                row["train_adv_acc"] = adv_acc.item() / seen
            for k, v in extra_sums.items():
                row[f"train_{k}"] = v / seen
            row["seconds"] = seconds
            row["img_per_s"] = seen / max(seconds, 1e-9)
            eval_model = averager.averaged_model(model, x_train) if averager is not None else model
            row["test_acc"] = accuracy(eval_model, x_val, y_val, cfg.eval_batch_size, device)
            if validate is not None:
                row.update(validate(eval_model, epoch))
            history.append(row)
            improved = False
            if select:
                score = float(row.get(select, -math.inf))
                if score > best_score:
                    best_score, improved = score, True
            metrics = {k: v for k, v in row.items() if k != "epoch"}
            train_state = {"history": history, "best_score": best_score,
                           "averager": averager.state_dict() if averager is not None else None,
                           "config": asdict(cfg)}
            ck = build_checkpoint(eval_model, dataset=ds.name, defense=method.config(), metrics=metrics, epoch=epoch,
                                  optimizer=opt.state_dict(), extra={"train_state": train_state})
            if eval_model is not model:  # resume needs the raw weights; the averaged ones are what we ship
                ck["extra"]["train_state"]["raw_state_dict"] = {k: v.detach().cpu() for k, v in
                                                                 model.state_dict().items()}
            save_checkpoint(out, ck)
            if improved and best_out is not None:
                save_checkpoint(best_out, {**ck, "optimizer": None, "extra": {}})
            _write_metrics(metrics_path(out), history)
            if console is not None and not quiet:
                console.print(_epoch_line(row, cfg.epochs))
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
    final = averager.averaged_model(model, x_train) if averager is not None else model
    final.eval()
    return TrainResult(out=out, epochs_run=cfg.epochs - start_epoch + 1, metrics=history, model=final,
                       best_out=best_out if best_out is not None and best_out.exists() else None)


def _epoch_line(row: Dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}", f"train acc {row['train_acc']:.2%}"]
    if "train_adv_acc" in row:
        parts.append(f"train adv acc {row['train_adv_acc']:.2%}")
    parts.append(f"test acc {row['test_acc']:.2%}")
    for k, v in row.items():
        if k.startswith("val_"):
            parts.append(f"{k.replace('_', ' ')} {v:.2%}" if "acc" in k else f"{k} {v:.4g}")
    parts.append(f"{row['seconds']:.1f} s ({row['img_per_s']:.0f} img/s)")
    return "  ".join(parts)


def _progress(console, quiet: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1%}  {task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(), console=Console(stderr=True), transient=True, disable=quiet)
