"""Trained models from elsewhere, loaded with their weights (zoo.load_model, the one resolver, calls
these; the architectures are in models.py):

    tv:NAME   --weights DEFAULT | ENUM | PATH   torchvision's pretrained weights, from the torch hub cache
                                              (TORCH_HOME/hub/checkpoints) or a state_dict file
    timm:NAME --weights DEFAULT | PATH          timm's pretrained weights, from the Hugging Face hub cache,
                                              or a state_dict / .safetensors file (extra advbench[timm])
    rb:NAME   --model-dir DIR                   RobustBench's model zoo (extra advbench[robustbench]): the
                                              architecture from robustbench.model_zoo, the weights from
                                              DIR/<dataset>/<threat>/<NAME>.pt, RobustBench's own layout

The weights' own preprocessing mean / std becomes our Normalize layer (tv:, timm:; ``normalize``
overrides it), so the model still takes images in [0, 1]. RobustBench's models normalise inside
themselves, like ours: they get the [0, 1] images as they are (an identity Normalize layer).

Nothing here touches the network unless ``download`` is set: a missing file is one AdvbenchError
naming the path where it is expected. Files are read with weights_only=True (or as .safetensors):
loading weights never runs code. (file: models run the user's code: models.py.)
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlparse

import torch

from .checkpoint import FORMAT, load_state, read_checkpoint
from .data import known_normalization
from .errors import AdvbenchError, SettingError, first_line
from .models import Classifier, check_installed, check_takes, optional_import, user_source
from .registry import suggest

Normalization = Tuple[Tuple[float, ...], Tuple[float, ...]]

# ImageNet's mean / std, as torchvision's and timm's ImageNet weights expect them
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RB_DATASETS = ("cifar10", "cifar100", "imagenet")
RB_THREATS = {"linf": "Linf", "l2": "L2", "corruptions": "corruptions"}
PRETRAINED = "DEFAULT"
LINE_LIMIT = 200  # characters of a third-party error quoted in ours


def kind(name: Optional[str]) -> str:
    """'tv', 'timm', 'rb', 'file' for a prefixed name, else 'registry' (a name of models.MODELS)."""
    key = (name or "").strip().lower()
    for prefix in ("tv", "timm", "rb", "file"):
        if key.startswith(prefix + ":"):
            return prefix
    return "registry"


def _rest(name: str) -> str:
    return name.strip().split(":", 1)[1]


# --- settings --------------------------------------------------------------------------------------
def parse_normalize(text: Optional[str]) -> Optional[Normalization]:
    """``MEAN/STD`` (one number, or one per channel, comma-separated: ``0.5/0.25``,
    ``0.4914,0.4822,0.4465/0.2471,0.2435,0.2616``) or a dataset name (``cifar10``, ``imagenet``)."""
    if text is None:
        return None
    t = str(text).strip()
    named = IMAGENET if t.lower() == "imagenet" else known_normalization(t)
    if named is not None:
        return tuple(map(float, named[0])), tuple(map(float, named[1]))
    mean, sep, std = t.partition("/")
    try:
        m = tuple(float(v) for v in mean.split(","))
        s = tuple(float(v) for v in std.split(",")) if sep else ()
    except ValueError:
        m = s = ()
    if not sep or not m or not s or len(m) != len(s) or any(v != v or abs(v) == float("inf") for v in m + s):
        raise SettingError(f"{{normalize}} must be MEAN/STD (e.g. 0.5/0.25, or one value per channel: "
                           f"0.4914,0.4822,0.4465/0.2471,0.2435,0.2616) or a dataset name such as cifar10 or "
                           f"imagenet (got {t!r})", "normalize")
    if any(v <= 0 for v in s):
        raise SettingError(f"{{normalize}}: every std must be > 0 (got {t!r})", "normalize")
    return m, s


def _is_path(weights: str) -> bool:
    w = weights.strip()
    return ("/" in w or "\\" in w or w.startswith("~") or Path(w).suffix.lower() in
            (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar") or Path(w).expanduser().is_file())


def check_source(model: Optional[str], checkpoint: Optional[str] = None, weights: Optional[str] = None,
                 model_dir: Optional[str] = None, normalize: Optional[str] = None) -> None:
    """The model settings agree with each other and with the model's source (cheap checks only: files
    exist, optional packages are installed; nothing is imported or loaded)."""
    k = kind(model)
    if weights is not None:
        if k not in ("tv", "timm"):
            raise SettingError(f"{{weights}} takes a tv:NAME or timm:NAME model (got {model!r}); your own "
                               f"network's state_dict goes with {{checkpoint}}", "weights", "checkpoint")
        if checkpoint:
            raise SettingError("{weights} and {checkpoint} conflict: give the pretrained weights once",
                               "weights", "checkpoint")
        if not str(weights).strip():
            raise SettingError("{weights} is empty: give DEFAULT, a weights name or a file", "weights")
        if _is_path(weights) and not Path(weights).expanduser().is_file():
            raise AdvbenchError(f"weights file not found: {Path(weights).expanduser()}")
    if model_dir is not None and k != "rb":
        raise SettingError(f"{{model_dir}} is where rb:NAME models (RobustBench's zoo) keep their weights (got "
                           f"model {model!r})", "model_dir")
    if k == "rb":
        if checkpoint:
            raise SettingError(f"{model} loads its weights from {{model_dir}} (RobustBench's layout): drop "
                               f"{{checkpoint}}", "model_dir", "checkpoint")
        if normalize is not None:
            raise SettingError(f"{model} normalises its inputs inside itself (RobustBench's models take images "
                               f"in [0, 1]): drop {{normalize}}", "normalize")
        check_installed("robustbench", "robustbench", f"model {model}")
    if k == "timm":
        check_installed("timm", "timm", f"model {model}")
    if k == "file":
        user_source(_rest(model))
    if normalize is not None:
        if not checkpoint and weights is None:
            raise SettingError("{normalize} states what the network of {checkpoint} or {weights} expects (the zoo "
                               "baseline uses its dataset's)", "normalize", "checkpoint", "weights")
        parse_normalize(normalize)


# --- torchvision ------------------------------------------------------------------------------------
def _torchvision_weights(tv_name: str, weights: str):
    import torchvision.models as tvm  # heavy, on this optional path only

    if tv_name not in tvm.list_models(module=tvm):
        close = suggest(tv_name, tvm.list_models(module=tvm), n=3, show=lambda c: f"tv:{c}")
        raise AdvbenchError(f"unknown torchvision model {tv_name!r}" + (f"; {close}" if close else ""))
    enum = tvm.get_model_weights(tv_name)
    if _is_path(weights):
        return tvm, enum, enum.DEFAULT, Path(weights).expanduser()
    key = weights.strip().split(".")[-1]
    names = [m.name for m in enum]
    if key.upper() == PRETRAINED:
        w = enum.DEFAULT
    elif key in names:
        w = enum[key]
    else:
        raise SettingError(f"tv:{tv_name} has no {{weights}} {weights!r} (known: DEFAULT, {', '.join(names)}, or a "
                           f"file)", "weights")
    return tvm, enum, w, None


def weights_image_size(model: Optional[str], weights: Optional[str]) -> Optional[int]:
    """The crop size of tv:NAME's pretrained ``weights`` (a file: the DEFAULT weights'), what an image
    folder is cropped to for it; None for other models (timm's config is not read here)."""
    if not weights or kind(model) != "tv":
        return None
    _, _, w, _ = _torchvision_weights(_rest(model), weights)
    return _first(w.transforms().crop_size)


def hub_path(url: str) -> Path:
    """Where torch.hub keeps the file of ``url``: $TORCH_HOME/hub/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def load_torchvision(tv_name: str, weights: str, ds, normalize: Optional[Normalization] = None,
                     download: bool = False) -> Tuple[Classifier, Path, List[str]]:
    """(model, weights file, flags) of tv:NAME with pretrained ``weights``: DEFAULT or an enum name (the
    file from the torch hub cache; fetched only with ``download``), or a state_dict file. The weights'
    preprocessing mean / std (``normalize`` overrides it) is the model's Normalize layer."""
    tvm, enum, w, path = _torchvision_weights(tv_name, weights)
    label = "file" if path is not None else w.name
    if path is None:
        path = hub_path(w.url)
        if not path.is_file():
            if not download:
                raise SettingError(f"tv:{tv_name} weights {w.name} not found at {path} (no download without "
                                   f"{{download}}; offline, put the file {path.name} there, or give the file with "
                                   f"{{weights}} PATH)", "download", "weights")
            _fetch(lambda: torch.hub.download_url_to_file(w.url, str(path), progress=False), f"tv:{tv_name}", path)
    sd = _plain_state_dict(path, f"tv:{tv_name}")
    c = ds.input_shape[0]
    if c != 3:
        raise AdvbenchError(f"tv:{tv_name} pretrained weights take 3-channel images, dataset {ds.name} has {c}")
    classes = len(w.meta.get("categories") or []) if label != "file" else ds.num_classes
    net = tvm.get_model(tv_name, weights=None, num_classes=classes or ds.num_classes)
    pre = w.transforms()
    mean, std = normalize or (tuple(pre.mean), tuple(pre.std))
    model = Classifier(net, mean, std, dict(name=f"tv:{tv_name}", in_channels=c, num_classes=ds.num_classes,
                                            input_size=ds.input_shape[1], activation="relu", smooth_backward=None,
                                            weights=label, weights_input_size=_first(pre.crop_size),
                                            weights_resize_size=_first(pre.resize_size)))
    load_state(model, sd, source=f"weights {path}")
    check_takes(model, f"tv:{tv_name}", ds)
    return model.eval(), path, [f"weights={label}"] + (["normalize"] if normalize else [])


def _first(v):
    return int(v[0]) if isinstance(v, (list, tuple)) and v else (int(v) if v else None)


def _fetch(download, what: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the run's stdout stays its table or JSON
            download()
    except Exception as exc:  # offline: URLError / ConnectionError / gdown's errors
        raise AdvbenchError(f"could not download the weights of {what} to {path} ({type(exc).__name__}: "
                            f"{first_line(exc, LINE_LIMIT)})") from None


def _plain_state_dict(path: Path, what: str) -> Dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        st = optional_import("safetensors.torch", "timm", f"{what} weights {path}")
        try:
            return st.load_file(str(path), device="cpu")
        except Exception as exc:
            raise AdvbenchError(f"weights {path} are corrupt or truncated "
                                f"({first_line(exc, LINE_LIMIT)})") from None
    ck = read_checkpoint(path)
    if ck.get("format") == FORMAT:
        raise SettingError(f"{path} is an advbench checkpoint: evaluate it with {{checkpoint}}", "checkpoint")
    return ck["state_dict"]


# --- timm -------------------------------------------------------------------------------------------
def load_timm(timm_name: str, weights: str, ds, normalize: Optional[Normalization] = None,
              download: bool = False) -> Tuple[Classifier, Path, List[str]]:
    """(model, weights file, flags) of timm:NAME with ``weights``: DEFAULT (timm's pretrained weights from
    the Hugging Face hub cache; fetched only with ``download``) or a state_dict / .safetensors file."""
    timm = optional_import("timm", "timm", f"model timm:{timm_name}")
    if not timm.is_model(timm_name):
        close = suggest(timm_name, timm.list_models(), n=3, show=lambda c: f"timm:{c}")
        raise AdvbenchError(f"unknown timm model {timm_name!r}" + (f"; {close}" if close else ""))
    c = ds.input_shape[0]
    if _is_path(weights):
        path = Path(weights).expanduser()
        sd = _plain_state_dict(path, f"timm:{timm_name}")
        net = timm.create_model(timm_name, pretrained=False, num_classes=ds.num_classes, in_chans=c)
        label, load_into_body = "file", sd
    elif weights.strip().upper() == PRETRAINED:
        path, sd = _timm_cached(timm, timm_name, download)
        try:
            net = timm.create_model(timm_name, pretrained=True, in_chans=c, pretrained_cfg_overlay=dict(state_dict=sd))
        except Exception as exc:  # timm's own adaptation of the file failed: the file is not these weights
            raise AdvbenchError(f"weights {path} do not fit timm:{timm_name} "
                                f"({first_line(exc, LINE_LIMIT)})") from None
        label, load_into_body = "pretrained", None
    else:
        raise SettingError(f"timm:{timm_name} takes {{weights}} DEFAULT (timm's pretrained weights) or a file "
                           f"(got {weights!r}; a pretrained tag goes in the name: timm:resnet18.a1_in1k)", "weights")
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    mean, std = normalize or (tuple(cfg.get("mean") or IMAGENET[0]), tuple(cfg.get("std") or IMAGENET[1]))
    size = cfg.get("input_size")
    model = Classifier(net, _channels(mean, c), _channels(std, c),
                       dict(name=f"timm:{timm_name}", in_channels=c, num_classes=ds.num_classes,
                            input_size=ds.input_shape[1], activation="relu", smooth_backward=None, weights=label,
                            weights_input_size=int(size[-1]) if size else None))
    if load_into_body is not None:
        load_state(model, load_into_body, source=f"weights {path}")
    check_takes(model, f"timm:{timm_name}", ds)
    return model.eval(), path, [f"weights={label}"] + (["normalize"] if normalize else [])


def _channels(v, c: int):
    v = list(v)
    return v * c if len(v) == 1 else v


def _timm_cached(timm, timm_name: str, download: bool) -> Tuple[Path, Dict[str, torch.Tensor]]:
    """(file, state_dict) of timm's pretrained weights of ``timm_name`` in the Hugging Face hub cache."""
    cfg = timm.models.get_pretrained_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        raise AdvbenchError(f"timm:{timm_name} has no pretrained weights on the Hugging Face hub: give the file with "
                            f"--weights PATH")
    hf = optional_import("huggingface_hub", "timm", f"model timm:{timm_name}")
    files = ("model.safetensors", "pytorch_model.bin")
    for fname in files:
        found = hf.try_to_load_from_cache(hub_id, fname)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found), _plain_state_dict(Path(found), f"timm:{timm_name}")
    where = Path(hf.constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}"
    if not download:
        raise SettingError(f"timm:{timm_name} pretrained weights not found in the Hugging Face hub cache at {where} "
                           f"(no download without {{download}}; offline, give the file with {{weights}} PATH)",
                           "download", "weights")
    got: Dict[str, Path] = {}
    _fetch(lambda: got.setdefault("p", Path(hf.hf_hub_download(hub_id, files[0]))), f"timm:{timm_name}", where)
    return got["p"], _plain_state_dict(got["p"], f"timm:{timm_name}")


# --- RobustBench ------------------------------------------------------------------------------------
def robustbench_dataset(ds) -> str:
    """RobustBench's name of ``ds``: cifar10, cifar100 or imagenet (an npz file counts by its file name,
    e.g. npz:../shared/data/cifar10.npz)."""
    name = ds.name.strip().lower()
    candidates = [name, name.split(":", 1)[0]]
    if name.startswith("npz:"):
        candidates.append(Path(ds.name[4:]).stem.lower())
    for cand in candidates:
        if cand in RB_DATASETS:
            return cand
    raise AdvbenchError(f"RobustBench's models are for cifar10, cifar100 and imagenet: dataset {ds.name} is none of "
                        f"them (an npz file counts by its name, e.g. npz:DIR/cifar10.npz)")


def _split_rb(rb_name: str, norm: str) -> Tuple[str, str]:
    """'Standard' -> (Standard, the threat of ``norm``); 'corruptions/Name' -> (Name, corruptions)."""
    threat, sep, name = rb_name.strip().rpartition("/")
    key = (threat if sep else norm).strip().lower()
    if key not in RB_THREATS:
        raise AdvbenchError(f"rb:{rb_name}: unknown RobustBench threat model {threat or norm!r} (known: Linf, L2, "
                            f"corruptions)")
    return name, RB_THREATS[key]


def _import_robustbench(what: str):
    """robustbench.utils and robustbench.model_zoo. robustbench 1.1.1 imports AutoAttack as `autoattack`,
    which PyPI's pyautoattack provides as `pyautoattack`: that module stands in for it when needed."""
    try:
        has_aa = importlib.util.find_spec("autoattack") is not None
    except (ImportError, ValueError):
        has_aa = False
    if not has_aa and "autoattack" not in sys.modules:
        try:
            pyaa = importlib.import_module("pyautoattack")
            sys.modules["autoattack"] = pyaa
            sys.modules.setdefault("autoattack.state", importlib.import_module("pyautoattack.state"))
        except ImportError:
            pass
    # optional_import silences the import's warnings (robustbench's about deprecated torch APIs)
    return tuple(optional_import(m, "robustbench", what)
                 for m in ("robustbench.utils", "robustbench.model_zoo", "robustbench.model_zoo.enums"))


def robustbench_path(model_dir, dataset: str, threat: str, name: str) -> Path:
    """RobustBench's layout: <model_dir>/<dataset>/<threat>/<name>.pt."""
    return Path(model_dir).expanduser() / dataset / threat / f"{name}.pt"


def load_robustbench(rb_name: str, ds, model_dir: Optional[str] = None, norm: str = "linf",
                     download: bool = False) -> Tuple[Classifier, Path, List[str]]:
    """(model, weights file, flags) of rb:NAME for ``ds`` (cifar10, cifar100, imagenet) and the threat
    model of ``norm`` (or rb:THREAT/NAME): robustbench builds the architecture and loads the file of
    RobustBench's layout under ``model_dir`` (default ./models, RobustBench's own default), downloading
    it only with ``download``. The model normalises inside itself: it gets the images in [0, 1]."""
    what = f"model rb:{rb_name}"
    name, threat = _split_rb(rb_name, norm)
    dataset = robustbench_dataset(ds)
    utils, zoo, enums = _import_robustbench(what)
    models = zoo.model_dicts[enums.BenchmarkDataset(dataset)][enums.ThreatModel(threat)]
    if name not in models:
        close = suggest(name, list(models), n=3, show=lambda c: f"rb:{c}")
        raise AdvbenchError(f"unknown RobustBench model {name!r} for {dataset} {threat}"
                            + (f"; {close}" if close else "") + " (RobustBench's leaderboard lists its models)")
    root = model_dir if model_dir is not None else "models"
    path = robustbench_path(root, dataset, threat, name)
    ids = models[name].get("gdrive_id")
    files = [Path(f"{path}_m{i}.pt") for i in range(len(ids))] if isinstance(ids, list) else [path]
    timm_name = f"{name.lower().replace('-', '_')}_{dataset}_{threat.lower()}"
    hosted = bool(getattr(utils, "timm", None) and utils.timm.is_model(timm_name))
    missing = [f for f in files if not f.is_file()]
    if hosted and not download:
        raise SettingError(f"rb:{name} is kept on the Hugging Face hub (timm model {timm_name}), not in "
                           f"{{model_dir}}: pass {{download}} to fetch it", "download", "model_dir")
    if missing and not download:
        raise SettingError(f"rb:{name} weights not found at {missing[0]} (RobustBench's layout "
                           f"<model-dir>/{dataset}/{threat}/{name}.pt; no download without {{download}}; offline, "
                           f"put the file there)", "download")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            net = utils.load_model(name, model_dir=str(Path(root).expanduser()), dataset=dataset, threat_model=threat)
    except RuntimeError as exc:  # load_state_dict: the file is not this architecture's
        if "state_dict" in str(exc):
            raise AdvbenchError(f"{files[0]} does not match RobustBench's rb:{name} architecture "
                                f"({_state_dict_error(exc)})") from None
        raise AdvbenchError(f"rb:{name}: {files[0]} could not be loaded "
                            f"({first_line(exc, LINE_LIMIT)})") from None
    except Exception as exc:  # a damaged file, or (download) no network
        if missing:
            raise AdvbenchError(f"could not download the weights of rb:{name} to {missing[0]} "
                                f"({type(exc).__name__}: {first_line(exc, LINE_LIMIT)})") from None
        raise AdvbenchError(f"rb:{name}: {files[0]} could not be loaded ({type(exc).__name__}: "
                            f"{first_line(exc, LINE_LIMIT)})") from None
    c = ds.input_shape[0]
    model = Classifier(net, (0.0,) * c, (1.0,) * c,  # identity: RobustBench's models normalise inside themselves
                       dict(name=f"rb:{name}", in_channels=c, num_classes=ds.num_classes,
                            input_size=ds.input_shape[1], activation="", smooth_backward=None,
                            robustbench=f"{dataset}/{threat}"))
    check_takes(model, f"rb:{name}", ds)
    return model.eval(), files[0], [f"robustbench={dataset}/{threat}"]


def _state_dict_error(exc: BaseException) -> str:
    """torch's load_state_dict error in one short line: its missing / unexpected / mis-shaped keys."""
    parts = []
    for line in str(exc).splitlines()[1:]:
        line = re.sub(r"\s+", " ", line).strip().rstrip(".")
        if line:
            parts.append(line if len(line) <= 160 else line[:157] + "...")
    return "; ".join(parts[:3]) or first_line(exc, LINE_LIMIT)


# --- the resolver's entry point ----------------------------------------------------------------------
def load_pretrained(name: str, ds, *, weights: Optional[str] = None, model_dir: Optional[str] = None,
                    normalize: Optional[str] = None, norm: str = "linf", download: bool = False
                    ) -> Tuple[Classifier, Path, List[str]]:
    """(model in eval mode, its weights file, flags) of a model from elsewhere: rb:NAME, or tv:NAME /
    timm:NAME with ``weights``."""
    k = kind(name)
    norm_stats = parse_normalize(normalize)
    if k == "rb":
        return load_robustbench(_rest(name), ds, model_dir, norm, download)
    if k == "tv" and weights is not None:
        return load_torchvision(_rest(name), weights, ds, norm_stats, download)
    if k == "timm" and weights is not None:
        return load_timm(_rest(name), weights, ds, norm_stats, download)
    raise AssertionError(f"load_pretrained: {name!r} with weights={weights!r} is not a pretrained source")


def is_pretrained(name: Optional[str], weights: Optional[str]) -> bool:
    """Whether ``name`` (with ``weights``) loads through load_pretrained rather than a checkpoint or the zoo."""
    k = kind(name)
    return k == "rb" or (k in ("tv", "timm") and weights is not None)


__all__ = ["check_source", "is_pretrained", "kind", "load_pretrained", "load_robustbench", "load_timm",
           "load_torchvision", "parse_normalize", "robustbench_dataset", "robustbench_path"]
