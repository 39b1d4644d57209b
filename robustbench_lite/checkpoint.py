"""Checkpoints: a dict with a format tag, everything needed to rebuild the model, and the weights.

    {"format": "advbench-checkpoint/1", "model": name, "model_kwargs": {...}, "dataset": ...,
     "num_classes": ..., "input_shape": [C, H, W], "normalization": {"mean": [...], "std": [...]},
     "activation": ..., "defense": {...}, "metrics": {...}, "epoch": ..., "optimizer": state or None,
     "extra": {...}, "state_dict": {...}}

Written atomically; read with torch.load(weights_only=True), so a checkpoint never runs code.
A plain state_dict also loads when the caller names the model: at the top level or nested under
"state_dict", "model" or "net" (other tools' checkpoints), with DataParallel's "module." prefix
stripped. A checkpoint that names a file: model (the user's code) is only rebuilt when the caller
names that model too: reading a checkpoint never imports code it names.
"""
from __future__ import annotations

import hashlib
import math
import pickle
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .errors import AdvbenchError, SettingError
from .fileio import atomic_write
from .models import create_model, model_for_dataset

FORMAT = "advbench-checkpoint/1"


def build_checkpoint(model, *, dataset: str, defense: Optional[Dict[str, Any]] = None,
                     metrics: Optional[Dict[str, Any]] = None, epoch: int = 0,
                     optimizer: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None
                     ) -> Dict[str, Any]:
    spec = dict(model.spec)
    name = spec.pop("name")
    norm = model.normalize
    return {
        "format": FORMAT,
        "model": name,
        "model_kwargs": spec,
        "dataset": dataset,
        "num_classes": spec.get("num_classes"),
        "input_shape": [spec.get("in_channels"), spec.get("input_size"), spec.get("input_size")],
        "normalization": {"mean": norm.mean.reshape(-1).tolist(), "std": norm.std.reshape(-1).tolist()},
        "activation": spec.get("activation", "relu"),
        "smooth_backward": spec.get("smooth_backward"),
        "defense": defense or {"method": "standard"},
        "metrics": metrics or {},
        "epoch": int(epoch),
        "optimizer": optimizer,
        "extra": extra or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def save_checkpoint(path, ckpt: Dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(ckpt, f))


def file_sha256(path) -> str:
    """The full sha256 (64 hex) of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unpickling_reason(text: str) -> str:
    """The informative line of torch's weights_only error (it opens with a generic paragraph about
    the weights_only default; the reason follows "WeightsUnpickler error:")."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    marker = "WeightsUnpickler error:"
    for i, ln in enumerate(lines):
        if marker in ln:
            rest = ln.split(marker, 1)[1].strip()
            if rest:
                return rest
            return next((nxt for nxt in lines[i + 1:] if nxt), ln)
    return lines[0] if lines else ""


def read_checkpoint(path) -> Dict[str, Any]:
    """Load a checkpoint file safely; any failure is an AdvbenchError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise AdvbenchError(f"checkpoint not found: {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": we report the outcome
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = _unpickling_reason(str(exc))
        if "GLOBAL" in str(exc):  # weights_only refused to import a callable: a code payload
            raise AdvbenchError(f"checkpoint {p} was refused: it contains Python objects that would run code "
                                f"when loaded (only tensors and plain data are accepted)") from None
        raise AdvbenchError(f"checkpoint {p} is corrupt or truncated ({first})") from None
    except Exception as exc:  # any failure to parse (zip, pickle stream, storage) means a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AdvbenchError(f"checkpoint {p} is corrupt or truncated ({first})") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if not isinstance(obj.get("state_dict"), dict):
            raise AdvbenchError(f"checkpoint {p} has no state_dict")
        _check_fields(obj, p)
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"format": None, "state_dict": _unwrapped(obj)}
    for key in NESTED:  # e.g. other tools' {"state_dict": ..., "epoch": ...}, {"model": ...}, {"net": ...}
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and obj[key]:
            _check_state_dict(obj[key], p)
            return {"format": None, "state_dict": _unwrapped(obj[key])}
    raise AdvbenchError(f"checkpoint {p} is neither an advbench checkpoint nor a state_dict")


NESTED = ("state_dict", "model", "net")  # where other tools keep the state_dict in a checkpoint dict


def _unwrapped(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A state_dict without DataParallel's "module." prefix (when every key has it)."""
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _check_state_dict(sd: Dict[Any, Any], p: Path) -> None:
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise AdvbenchError(f"checkpoint {p} is corrupt: state_dict entry {k!r} is not a named tensor")


def _check_fields(ck: Dict[str, Any], p: Path) -> None:
    """The fields the code relies on have the right types (a damaged or hand-made file is an
    AdvbenchError naming the field, not a KeyError / TypeError later)."""

    def bad(what: str) -> AdvbenchError:
        return AdvbenchError(f"checkpoint {p} is corrupt: {what}")

    if not isinstance(ck.get("model"), str) or not ck["model"].strip():
        raise bad("it names no model")
    if not isinstance(ck.get("model_kwargs", {}), dict):
        raise bad("model_kwargs is not a mapping")
    norm = ck.get("normalization")
    for key in ("mean", "std"):
        vals = norm.get(key) if isinstance(norm, dict) else None
        if not (isinstance(vals, (list, tuple)) and vals and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals)):
            raise bad(f"normalization.{key} is not a list of numbers")
    if any(v <= 0 for v in norm["std"]):
        raise bad("normalization.std must be > 0")
    if ck.get("dataset") is not None and not isinstance(ck["dataset"], str):
        raise bad("dataset is not a name")
    if isinstance(ck.get("epoch", 0), bool) or not isinstance(ck.get("epoch", 0), int):
        raise bad("epoch is not an integer")
    for key in ("extra", "metrics"):
        if ck.get(key) is not None and not isinstance(ck[key], dict):
            raise bad(f"{key} is not a mapping")
    state = (ck.get("extra") or {}).get("train_state")
    if state is not None and not isinstance(state, dict):
        raise bad("extra.train_state is not a mapping")
    _check_state_dict(ck["state_dict"], p)


def load_state(model, state_dict: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """load_state_dict with an error that names missing / unexpected / mis-shaped keys."""
    own = model.state_dict()
    sd = dict(state_dict)
    if not {"normalize.mean", "normalize.std"} <= set(sd):
        # a plain state_dict of the bare network (whatever its keys: a user's network may well have a
        # module named body): prefix it, keep our normalisation
        sd = {f"body.{k}": v for k, v in sd.items()}
        for k in ("normalize.mean", "normalize.std"):
            sd[k] = own[k]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]

    def brief(keys):
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {brief(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {brief(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch: {brief(shapes)}")
        raise AdvbenchError(f"{source} does not match model {model.spec.get('name')!r}: " + "; ".join(parts))
    model.load_state_dict(sd)


def model_from_checkpoint(path, model_name: Optional[str] = None, dataset=None,
                          normalize: Optional[Tuple[Sequence[float], Sequence[float]]] = None):
    """Rebuild a model from a checkpoint. Returns (model, ckpt).

    An advbench checkpoint carries its own architecture and normalisation; ``model_name`` (if given)
    must agree. A plain state_dict needs ``model_name`` and ``dataset`` (for shapes); its network sees
    inputs normalised with ``normalize`` (mean, std), else for a file: model the raw [0, 1] images,
    else the dataset's mean / std."""
    ckpt = read_checkpoint(path)
    if ckpt["format"] == FORMAT:
        if model_name and model_name.lower() != str(ckpt["model"]).lower():
            raise AdvbenchError(f"checkpoint {path} holds model {ckpt['model']!r}, not {model_name!r}")
        if str(ckpt["model"]).lower().startswith("file:") and not model_name:
            raise SettingError(f"checkpoint {path} holds model {ckpt['model']!r}, your own code: name it with "
                               f"{{model}} {ckpt['model']} to run it (a checkpoint alone never runs code)", "model")
        if normalize is not None:
            raise SettingError(f"checkpoint {path} is an advbench checkpoint with its own normalisation: drop "
                               f"{{normalize}}", "normalize")
        kw = dict(ckpt.get("model_kwargs") or {})
        try:
            model = create_model(ckpt["model"], mean=ckpt["normalization"]["mean"],
                                 std=ckpt["normalization"]["std"], **kw)
        except AdvbenchError as exc:  # e.g. an unknown model or activation: say where it came from
            raise AdvbenchError(f"checkpoint {path}: {exc}") from None
        except (TypeError, ValueError, RuntimeError) as exc:  # settings this code cannot build a model from
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AdvbenchError(f"checkpoint {path}: cannot build model {ckpt['model']!r} from its settings "
                                f"({first})") from None
        if dataset is not None:
            c, h, _ = dataset.input_shape
            if (kw.get("in_channels"), kw.get("input_size")) != (c, h):
                raise AdvbenchError(f"checkpoint {path} expects {kw.get('in_channels')}x{kw.get('input_size')}"
                                    f"x{kw.get('input_size')} inputs, dataset {dataset.name} has {c}x{h}x{h}")
            if kw.get("num_classes") != dataset.num_classes:
                raise AdvbenchError(f"checkpoint {path} has {kw.get('num_classes')} classes, dataset "
                                    f"{dataset.name} has {dataset.num_classes}")
    else:
        if not model_name or dataset is None:
            raise SettingError(f"{path} is a plain state_dict: name its architecture with {{model}}", "model")
        if normalize is None and model_name.strip().lower().startswith("file:"):
            c = dataset.input_shape[0]
            normalize = ((0.0,) * c, (1.0,) * c)  # your own network: the raw [0, 1] images
        model = model_for_dataset(model_name, dataset, normalize=normalize)
    load_state(model, ckpt["state_dict"], source=f"checkpoint {path}")
    model.eval()
    return model, ckpt
