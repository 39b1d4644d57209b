"""The model zoo: trained checkpoints in one user cache, shared by every results folder:

    $ADVBENCH_HOME/models/MODEL-DATASETTAG-FINGERPRINT-DEFENSE[-ACT].pt

ADVBENCH_HOME defaults to $XDG_CACHE_HOME/advbench, else ~/.cache/advbench (home()). DATASETTAG is
the dataset's name made file-name safe (npz:PATH gives npz-STEM) and FINGERPRINT the first 12 hex of
Dataset.fingerprint (a sha256 of the arrays): an entry belongs to the data, not to a file name, so
npz files with the same stem but other contents get entries of their own.

A run's model comes from here (load_model, the one resolver of model names): a model from elsewhere
(rb:NAME from RobustBench's zoo, tv:NAME / timm:NAME with pretrained weights: sources.py), a
checkpoint file (an advbench checkpoint, or a plain state_dict of the named architecture, e.g. the
user's own file:PATH.py:NAME), or without one the zoo entry of the model name, and when there is
none a standard baseline is trained first (and the narrator says so). Checking for the entry,
training it and writing it happen under a lock on the entry: concurrent runs train it once, the
others wait and then use it. model_info describes a loaded
model as the leaderboard records it (name, checkpoint sha256, dataset sha256, defense, activation)."""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from torch import nn

from . import distributed
from .checkpoint import file_sha256, model_from_checkpoint, read_checkpoint
from .data import Dataset, load_dataset
from .fileio import check_not_directory, locked
from .models import model_for_dataset
from .runtime import SILENT, Narrator
from .sources import is_pretrained, load_pretrained, parse_normalize
from .training import TrainConfig, train

# Baseline budgets that reach sane clean accuracy on 2 CPU cores in reasonable time.
BASELINE = {
    "smallcnn": dict(epochs=3, batch_size=64, lr=0.05),
    "lenet": dict(epochs=5, batch_size=64, lr=0.05),
}
DEFAULT_BASELINE = dict(epochs=2, batch_size=128, lr=0.05)


def home() -> Path:
    """$ADVBENCH_HOME, else $XDG_CACHE_HOME/advbench (an absolute XDG_CACHE_HOME), else ~/.cache/advbench."""
    env = os.environ.get("ADVBENCH_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "advbench"


def dataset_tag(dataset: str) -> str:
    """A file-name-safe tag: 'npz:../shared/data/cifar10.npz' -> 'npz-cifar10'."""
    if dataset.lower().startswith("npz:"):
        return "npz-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(dataset[4:]).stem)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset)


def zoo_path(model: str, dataset: Union[str, Dataset], defense: str = "standard", activation: str = "relu") -> Path:
    """The zoo entry of ``model`` trained with ``defense`` on ``dataset`` (a Dataset, or a name that
    loads without --data-dir: mnist-5k, npz:PATH)."""
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", model)
    act = "" if activation == "relu" else f"-{activation}"
    return home() / "models" / f"{name}-{dataset_tag(ds.name)}-{ds.fingerprint[:12]}-{defense}{act}.pt"


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
    return TrainConfig.from_dict(stored)


def get_or_train(model: str, ds: Dataset, seed: int = 0, device: str = "cpu",
                 narrator: Narrator = SILENT) -> Tuple[nn.Module, Path, bool]:
    """Return (model, checkpoint path, trained_now) for the zoo baseline of ``model`` on ``ds``.

    A zoo checkpoint left by an interrupted baseline training (e.g. `advbench attack` killed while
    it trained the baseline) is not used as it is: its training is resumed to the end first.
    Under torchrun only rank 0 takes the lock; the ranks follow its view of the entry."""
    path = zoo_path(model, ds, "standard")
    check_not_directory(path, "zoo entry")
    if not path.is_file():
        model_for_dataset(model, ds)  # a model that cannot take these images: refused before any lock or training

    def waiting():
        narrator.say(f"waiting for another process training {path}")

    with locked(path, on_wait=waiting) if distributed.context().is_main else contextlib.nullcontext():
        # under torchrun every rank takes rank 0's view (they then train together, or all load)
        if distributed.broadcast_object(path.is_file()):
            ck = read_checkpoint(path)
            unfinished = interrupted_config(ck)
            if unfinished is None:
                net, _ = model_from_checkpoint(path, model, ds)
                return net, path, False
            cfg = replace(unfinished, out=str(path), resume=True, device=device)
            narrator.say(f"zoo checkpoint {path} is from an interrupted training (epoch {ck.get('epoch')} of "
                         f"{cfg.epochs}): resuming it first")
        else:
            cfg = baseline_config(model, ds.name, path, seed=seed, device=device)
            narrator.say(f"no zoo checkpoint {path}: training a standard {model} baseline on {ds.name} first "
                         f"({cfg.epochs} epochs)")
        res = train(cfg, dataset=ds, narrator=narrator)
        return res.model, path, True


def load_model(name: Optional[str], checkpoint: Optional[str], ds: Dataset, *, seed: int = 0, device: str = "cpu",
               narrator: Narrator = SILENT, weights: Optional[str] = None, model_dir: Optional[str] = None,
               normalize: Optional[str] = None, norm: str = "linf", download: bool = False
               ) -> Tuple[nn.Module, Dict[str, Any]]:
    """(model in eval mode, model_info) for a run on ``ds``:

    * rb:NAME: RobustBench's model for ``ds`` and ``norm`` with its weights from ``model_dir``;
    * tv:NAME / timm:NAME with ``weights`` (DEFAULT, a weights name, or a file): pretrained weights;
    * the ``checkpoint`` file (its architecture from the file, or ``name`` for a plain state_dict, whose
      network expects inputs normalised with ``normalize``: MEAN/STD or a dataset name);
    * else the zoo baseline of ``name`` (trained first when missing, with ``seed`` on ``device``).

    Weights are fetched from the network only with ``download``; a missing file is one error naming it."""
    if is_pretrained(name, weights):
        model, path, flags = load_pretrained(name, ds, weights=weights, model_dir=model_dir, normalize=normalize,
                                             norm=norm, download=download)
        ckpt: Dict[str, Any] = {"format": None, "model": name}
    elif checkpoint:
        path = Path(checkpoint)
        model, ckpt = model_from_checkpoint(path, name, ds, normalize=parse_normalize(normalize))
        flags = ["normalize"] if normalize else []
    else:
        model, path, _ = get_or_train(name, ds, seed=seed, device=device, narrator=narrator)
        ckpt = read_checkpoint(path)
        flags = ["zoo"]
    model.eval()
    return model, model_info(path, ckpt, model, ds, name, flags)


def uses_zoo(name: Optional[str], checkpoint: Optional[str], weights: Optional[str] = None) -> bool:
    """Whether load_model takes ``name``'s zoo baseline (neither a checkpoint nor pretrained weights)."""
    return not checkpoint and not is_pretrained(name, weights)


def model_info(path: Path, ckpt: Dict[str, Any], model: nn.Module, ds: Dataset, name: Optional[str] = None,
               flags=()) -> Dict[str, Any]:
    """A model as the leaderboard records it: name, checkpoint and its sha256, dataset and its sha256,
    defense (method and parameters), activation label, the checkpoint's metrics, flags."""
    defense, defense_params = _defense(ckpt)
    return {"model": ckpt.get("model") or name or model.spec.get("name"), "checkpoint": str(path),
            "checkpoint_sha256": file_sha256(path), "dataset": ds.name, "dataset_sha256": ds.fingerprint,
            "defense": defense or ("standard" if ckpt.get("format") else ""),
            "defense_params": json.dumps(defense_params, sort_keys=True) if defense_params else "",
            "activation": activation_label(ckpt, model),
            "checkpoint_metrics": ckpt.get("metrics") or {}, "flags": list(flags)}


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
