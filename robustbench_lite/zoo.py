"""The local model zoo: trained checkpoints under <results>/models/<model>-<dataset>-<defense>.pt.

`advbench attack` uses the zoo entry when no --checkpoint is given and, when there is none,
trains a standard baseline first (and says so)."""
from __future__ import annotations

import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional

from .training import TrainConfig

# Baseline budgets that reach sane clean accuracy on 2 CPU cores in reasonable time.
BASELINE = {
    "smallcnn": dict(epochs=3, batch_size=64, lr=0.05),
    "lenet": dict(epochs=5, batch_size=64, lr=0.05),
}
DEFAULT_BASELINE = dict(epochs=2, batch_size=128, lr=0.05)


def dataset_tag(dataset: str) -> str:
    """A file-name-safe tag: 'npz:../shared/data/cifar10.npz' -> 'npz-cifar10'."""
    if dataset.lower().startswith("npz:"):
        return "npz-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(dataset[4:]).stem)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset)


def zoo_path(model: str, dataset: str, defense: str = "standard", results_dir: str = "results",
             activation: str = "relu") -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", model)
    act = "" if activation == "relu" else f"-{activation}"
    return Path(results_dir) / "models" / f"{name}-{dataset_tag(dataset)}-{defense}{act}.pt"


def baseline_config(model: str, dataset: str, out: Path, seed: int = 0, device: str = "cpu") -> TrainConfig:
    budget = BASELINE.get(model.lower(), DEFAULT_BASELINE)
    return TrainConfig(model=model, dataset=dataset, out=str(out), seed=seed, device=device, **budget)


def interrupted_config(ckpt) -> Optional[TrainConfig]:
    """The training configuration of a checkpoint whose training was interrupted (killed before its
    last epoch: the loop writes the checkpoint after every epoch), else None."""
    state = (ckpt.get("extra") or {}).get("train_state") or {}
    stored = state.get("config")
    if not isinstance(stored, dict) or state.get("stopped"):
        return None
    epochs = stored.get("epochs")
    if not isinstance(epochs, int) or int(ckpt.get("epoch") or 0) >= epochs:
        return None
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in stored.items() if k in known})


def get_or_train(model: str, dataset: str, results_dir: str = "results", seed: int = 0, device: str = "cpu",
                 console=None, quiet: bool = False, data_dir: Optional[str] = None, download: bool = False):
    """Return (model, checkpoint path, trained_now).

    A zoo checkpoint left by an interrupted baseline training (e.g. `advbench attack` killed while
    it trained the baseline) is not used as it is: its training is resumed to the end first."""
    from .checkpoint import model_from_checkpoint, read_checkpoint
    from .data import load_dataset
    from . import distributed
    from .training import train

    ds = load_dataset(dataset, data_dir=data_dir, download=download)
    path = zoo_path(model, dataset, "standard", results_dir)
    # under torchrun every rank takes rank 0's view (they then train together, or all load)
    if distributed.broadcast_object(path.is_file()):
        ck = read_checkpoint(path)
        unfinished = interrupted_config(ck)
        if unfinished is None:
            net, _ = model_from_checkpoint(path, model, ds)
            return net, path, False
        cfg = replace(unfinished, out=str(path), resume=True, device=device)
        if console is not None and not quiet:
            console.print(f"zoo checkpoint {path} is from an interrupted training (epoch {ck.get('epoch')} of "
                          f"{cfg.epochs}): resuming it first", markup=False, highlight=False)
        res = train(cfg, dataset=ds, console=console, quiet=quiet)
        return res.model, path, True
    cfg = baseline_config(model, dataset, path, seed=seed, device=device)
    if console is not None and not quiet:
        console.print(f"no zoo checkpoint {path}: training a standard {model} baseline on {ds.name} first "
                      f"({cfg.epochs} epochs)")
    res = train(cfg, dataset=ds, console=console, quiet=quiet)
    return res.model, path, True
