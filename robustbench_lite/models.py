"""Model registry. Every model takes in_channels, num_classes, input_size, mean/std and an
activation name, and starts with a Normalize layer: models eat images in [0, 1].

Built-in: smallcnn (Madry et al. MNIST net), lenet, resnet18/34/50 (CIFAR-style 3x3 stem),
preact-resnet18, wrn-28-10, wrn-34-10, and any torchvision classifier as tv:NAME. quantized:NAME is
NAME behind 4-level input quantisation, a deliberately gradient-masked model (below).

Architectures from elsewhere, by prefix: file:PATH.py:NAME or file:module.sub:NAME (the user's own
nn.Module class or zero-argument factory: this imports and runs the user's code), timm:NAME (any timm
classifier; the optional extra advbench[timm]) and rb:NAME (RobustBench's zoo: a trained model only,
loaded with its weights by robustbench_lite.sources, never built here). Pretrained weights (tv:/timm:
--weights, rb:) are loaded by robustbench_lite.sources.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from attacks.engine import attack_mode
from defenses.activations import ACTIVATIONS

from .errors import AdvbenchError, SettingError, first_line
from .registry import Registry, suggest

MODELS = Registry("model", entry_point_group="advbench.models")

ActFactory = Callable[[], nn.Module]


def activation_factory(name: str = "relu", smooth_backward: Optional[str] = None) -> ActFactory:
    """Validate an activation spec and return a factory building one module per call."""
    key = ACTIVATIONS.canonical(name)
    if smooth_backward:
        ACTIVATIONS.canonical(smooth_backward)
        if key != "relu":
            raise SettingError(f"{{smooth_backward}} keeps ReLU in the forward pass; it cannot be combined "
                               f"with {{activation}} {name}", "smooth_backward", "activation")
        return lambda: ACTIVATIONS.create("relu", smooth_backward=smooth_backward)
    return lambda: ACTIVATIONS.create(key)


class Normalize(nn.Module):
    """(x - mean) / std per channel: the first layer of every model, so eps stays in pixel units."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Normalize followed by a network; ``spec`` records how to rebuild it (for checkpoints)."""

    def __init__(self, body: nn.Module, mean: Sequence[float], std: Sequence[float], spec: Dict[str, Any]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.spec = spec

    def forward(self, x):
        return self.body(self.normalize(x))


# --- small nets -------------------------------------------------------------------------------
def _small_cnn(in_channels, num_classes, input_size, act: ActFactory):
    """Madry et al. (2018) MNIST network: conv5x5-32, pool, conv5x5-64, pool, fc1024."""
    h = input_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 5, padding=2), act(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), act(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * h * h, 1024), act(), nn.Linear(1024, num_classes))


def _lenet(in_channels, num_classes, input_size, act: ActFactory):
    """LeNet-5 (LeCun et al. 1998) with max pooling."""
    h = (input_size // 2 - 4) // 2
    if h < 1:
        raise AdvbenchError(f"lenet needs inputs of at least 12x12 (got {input_size})")
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), act(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), act(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * h * h, 120), act(), nn.Linear(120, 84), act(), nn.Linear(84, num_classes))


# --- ResNets (CIFAR-style: 3x3 stem, no max-pool; work on 28x28 and 32x32) --------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride, act: ActFactory):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act1, self.act2 = act(), act()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, act: ActFactory):
        super().__init__()
        cout = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.act1, self.act2, self.act3 = act(), act(), act()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016), as used by Wong et al. 2020 fast AT."""

    expansion = 1

    def __init__(self, cin, cout, stride, act: ActFactory):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.act1, self.act2 = act(), act()
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = self.act1(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + shortcut


class ResNet(nn.Module):
    def __init__(self, block, layers, in_channels, num_classes, act: ActFactory, preact=False):
        super().__init__()
        self.preact = preact
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64) if not preact else nn.Identity()
        self.act1 = act() if not preact else nn.Identity()
        cin, stages = 64, []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, (1 if i == 0 else 2) if j == 0 else 1, act))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn_final = nn.BatchNorm2d(cin) if preact else nn.Identity()
        self.act_final = act() if preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.act_final(self.bn_final(out))
        return self.fc(torch.flatten(self.pool(out), 1))


class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride, act: ActFactory):
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(cin), act()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(cout), act()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = self.act1(self.bn1(x))
        y = self.conv2(self.act2(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-widen (Zagoruyko & Komodakis 2016), the RobustBench CIFAR workhorse."""

    def __init__(self, depth, widen, in_channels, num_classes, act: ActFactory):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                layers.append(WideBlock(cin, w, (1 if i == 0 else 2) if j == 0 else 1, act))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.bn, self.act = nn.BatchNorm2d(cin), act()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.act(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


_BODIES: Dict[str, Callable[..., nn.Module]] = {
    "smallcnn": lambda c, k, s, a: _small_cnn(c, k, s, a),
    "lenet": lambda c, k, s, a: _lenet(c, k, s, a),
    "resnet18": lambda c, k, s, a: ResNet(BasicBlock, (2, 2, 2, 2), c, k, a),
    "resnet34": lambda c, k, s, a: ResNet(BasicBlock, (3, 4, 6, 3), c, k, a),
    "resnet50": lambda c, k, s, a: ResNet(Bottleneck, (3, 4, 6, 3), c, k, a),
    "preact-resnet18": lambda c, k, s, a: ResNet(PreActBlock, (2, 2, 2, 2), c, k, a, preact=True),
    "wrn-28-10": lambda c, k, s, a: WideResNet(28, 10, c, k, a),
    "wrn-34-10": lambda c, k, s, a: WideResNet(34, 10, c, k, a),
}
_HELP = {
    "smallcnn": "Madry et al. MNIST CNN: conv32-conv64-fc1024",
    "lenet": "LeNet-5",
    "resnet18": "ResNet-18, CIFAR-style 3x3 stem",
    "resnet34": "ResNet-34, CIFAR-style 3x3 stem",
    "resnet50": "ResNet-50 (bottleneck), CIFAR-style 3x3 stem",
    "preact-resnet18": "pre-activation ResNet-18 (fast AT, Wong et al. 2020)",
    "wrn-28-10": "WideResNet-28-10",
    "wrn-34-10": "WideResNet-34-10 (Madry / TRADES CIFAR model)",
}


def _make_builder(name: str):
    def build(in_channels: int = 3, num_classes: int = 10, input_size: int = 32,
              mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
              activation: str = "relu", smooth_backward: Optional[str] = None) -> Classifier:
        act = activation_factory(activation, smooth_backward)
        body = _BODIES[name](in_channels, num_classes, input_size, act)
        return Classifier(body, _per_channel(mean, in_channels), _per_channel(std, in_channels),
                          dict(name=name, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                               activation=activation, smooth_backward=smooth_backward))

    build.__doc__ = _HELP[name]
    return build


for _n in _BODIES:
    MODELS.register(_n, _make_builder(_n), help=_HELP[_n])


def _per_channel(v: Sequence[float], c: int):
    v = list(v)
    if len(v) == 1 and c > 1:
        v = v * c
    if len(v) != c:
        raise AdvbenchError(f"normalisation has {len(v)} channels, the model {c}")
    return v


class _RepeatChannels(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        return x.expand(-1, self.n, -1, -1) if x.shape[1] == 1 else x


def _torchvision_model(tv_name: str, in_channels: int = 3, num_classes: int = 10, input_size: int = 32,
                       mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                       activation: str = "relu", smooth_backward: Optional[str] = None) -> Classifier:
    """any torchvision classifier, random init (e.g. tv:resnet50, tv:vit_b_16); pretrained: --weights"""
    import torchvision.models as tvm

    if tv_name not in tvm.list_models(module=tvm):
        close = suggest(tv_name, tvm.list_models(module=tvm), n=3, show=lambda c: f"tv:{c}")
        hint = f"; {close}" if close else ""
        raise AdvbenchError(f"unknown torchvision model {tv_name!r}{hint}")
    if in_channels not in (1, 3):
        raise AdvbenchError(f"tv:{tv_name} takes 1- or 3-channel images (got {in_channels})")
    net = tvm.get_model(tv_name, weights=None, num_classes=num_classes)
    act = activation_factory(activation, smooth_backward)
    if ACTIVATIONS.canonical(activation) != "relu" or smooth_backward:
        _replace_relu(net, act)
    body = nn.Sequential(_RepeatChannels(3), net) if in_channels == 1 else net
    return Classifier(body, _per_channel(mean, in_channels), _per_channel(std, in_channels),
                      dict(name=f"tv:{tv_name}", in_channels=in_channels, num_classes=num_classes,
                           input_size=input_size, activation=activation, smooth_backward=smooth_backward))


def _replace_relu(module: nn.Module, act: ActFactory) -> None:
    for child_name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, child_name, act())
        else:
            _replace_relu(child, act)


MODELS.register_prefix("tv:", _torchvision_model)


class Quantized(Classifier):
    """A Classifier whose inputs are rounded to ``levels`` grey levels (k / (levels - 1)) before
    Normalize: a deliberately gradient-masked model. Rounding has a zero derivative, so the input
    gradient is zero everywhere ("shattered gradients", Athalye et al. 2018): gradient attacks see
    nothing to climb and report a robustness that a score-based attack (square) shows to be false."""

    def __init__(self, inner: Classifier, levels: int = 4):
        super().__init__(inner.body, inner.normalize.mean.flatten().tolist(), inner.normalize.std.flatten().tolist(),
                         dict(inner.spec, name=f"quantized:{inner.spec['name']}"))
        self.levels = levels

    def forward(self, x):
        k = self.levels - 1
        return super().forward(torch.round(x * k) / k)


def _quantized_model(inner_name: str, **kwargs) -> Classifier:
    """NAME behind 4-level input quantisation: gradient-masked on purpose (e.g. quantized:smallcnn)"""
    return Quantized(create_model(inner_name, **kwargs))


MODELS.register_prefix("quantized:", _quantized_model)


# --- architectures from elsewhere ------------------------------------------------------------------
def optional_import(module: str, extra: str, what: str):
    """Import an optional package; missing, it is one line saying how to install it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. timm's and robustbench's imports warn about torch APIs
            return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module
        why = "" if module == missing or module.startswith(missing + ".") else f" (importing it failed: {exc})"
        raise extra_missing(module, extra, what, why) from None


def extra_missing(module: str, extra: str, what: str, why: str = "") -> AdvbenchError:
    """The one line of a missing optional package: what needs it and how to install it."""
    package = module.split(".")[0]
    return AdvbenchError(f"{what} needs the optional package {package}{why}: pip install 'advbench[{extra}]'")


def check_installed(module: str, extra: str, what: str) -> None:
    """``module`` can be imported (found without importing it), else the install hint."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise extra_missing(module, extra, what)


_USER_MODULES: Dict[Tuple[str, int], Any] = {}


def split_user_ref(ref: str) -> Tuple[str, str, bool]:
    """'net.py:Net' -> ('net.py', 'Net', True: a file); 'pkg.nets:make' -> ('pkg.nets', 'make', False)."""
    target, sep, attr = ref.strip().rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise AdvbenchError(f"model 'file:{ref}' must name a file and what it defines, file:PATH.py:NAME "
                            f"(or an importable module, file:module.sub:NAME)")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    if not is_file and not all(p.isidentifier() for p in target.split(".")):
        raise AdvbenchError(f"model 'file:{ref}': {target!r} is neither a .py file nor a module name")
    return target, attr, is_file


def user_source(ref: str) -> Optional[Path]:
    """The file that defines file:REF (a module's file when it has one), for the record; the file must exist."""
    target, _, is_file = split_user_ref(ref)
    if is_file:
        p = Path(target).expanduser()
        if not p.is_file():
            raise AdvbenchError(f"model file not found: {p}")
        return p
    spec = importlib.util.find_spec(target.split(".")[0]) if target else None
    if spec is None:
        raise AdvbenchError(f"model 'file:{ref}': no module named {target.split('.')[0]!r} can be imported")
    return None


def _import_user(target: str, is_file: bool):
    """The module of a file:REF, imported once per process (a file again when it changed): runs its code."""
    if is_file:
        p = Path(target).expanduser().resolve()
        if not p.is_file():
            raise AdvbenchError(f"model file not found: {Path(target).expanduser()}")
        key = (str(p), p.stat().st_mtime_ns)
        if key in _USER_MODULES:
            return _USER_MODULES[key]
        name = "advbench_user_" + hashlib.sha1(str(p).encode()).hexdigest()[:12]
        try:
            spec = importlib.util.spec_from_file_location(name, p)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and pickling in the user's file look themselves up
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's code: any failure is their file's, reported in one line
            sys.modules.pop(name, None)
            raise AdvbenchError(f"model file {Path(target).expanduser()} could not be imported "
                                f"({type(exc).__name__}: {first_line(exc)})") from None
        _USER_MODULES[key] = module
        return module
    try:
        return importlib.import_module(target)
    except Exception as exc:
        raise AdvbenchError(f"module {target} could not be imported ({type(exc).__name__}: {first_line(exc)})"
                            ) from None


def build_user_network(ref: str) -> nn.Module:
    """NAME of file:REF called with no arguments: an nn.Module class or a factory returning an nn.Module."""
    target, attr, is_file = split_user_ref(ref)
    module = _import_user(target, is_file)
    where = f"model file {Path(target).expanduser()}" if is_file else f"module {target}"
    obj = getattr(module, attr, None)
    if obj is None:
        defined = sorted(n for n, v in vars(module).items()
                         if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
                         and (inspect.isfunction(v) or (isinstance(v, type) and issubclass(v, nn.Module))))
        close = suggest(attr, defined)
        raise AdvbenchError(f"{where} does not define {attr}" + (f"; {close}" if close else "")
                            + (f" (it defines {', '.join(defined)})" if defined else ""))
    what = f"{attr} of {where}"
    if not callable(obj):
        raise AdvbenchError(f"{what} is a {type(obj).__name__}, not an nn.Module class or a factory")
    try:
        required = [p.name for p in inspect.signature(obj).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        required = []
    if required:
        raise AdvbenchError(f"{what} needs arguments ({', '.join(required)}): name a class or a factory that takes "
                            f"none (e.g. def make(): return {attr}(...))")
    try:
        net = obj()
    except Exception as exc:  # the user's constructor
        raise AdvbenchError(f"{what}() failed ({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(net, nn.Module):
        raise AdvbenchError(f"{what}() returned a {type(net).__name__}, not a torch.nn.Module")
    return net


def _own_activations(name: str, activation: str, smooth_backward: Optional[str]) -> None:
    if ACTIVATIONS.canonical(activation) != "relu" or smooth_backward:
        raise SettingError(f"{name} keeps its own activations: drop {{activation}} / {{smooth_backward}}",
                           "activation", "smooth_backward")


def _user_model(ref: str, in_channels: int = 3, num_classes: int = 10, input_size: int = 32,
                mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), activation: str = "relu",
                smooth_backward: Optional[str] = None) -> Classifier:
    """your own nn.Module class or zero-argument factory NAME of PATH.py (or module.sub:NAME): runs your code"""
    _own_activations(f"file:{ref}", activation, smooth_backward)
    net = build_user_network(ref)
    return Classifier(net, _per_channel(mean, in_channels), _per_channel(std, in_channels),
                      dict(name=f"file:{ref}", in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                           activation=activation, smooth_backward=smooth_backward))


MODELS.register_prefix("file:", _user_model, placeholder="PATH.py:NAME")


def _timm_model(timm_name: str, in_channels: int = 3, num_classes: int = 10, input_size: int = 32,
                mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), activation: str = "relu",
                smooth_backward: Optional[str] = None) -> Classifier:
    """any timm classifier, random init (pip install 'advbench[timm]'; pretrained: --weights)"""
    _own_activations(f"timm:{timm_name}", activation, smooth_backward)
    timm = optional_import("timm", "timm", f"model timm:{timm_name}")
    if not timm.is_model(timm_name):
        close = suggest(timm_name, timm.list_models(), n=3, show=lambda c: f"timm:{c}")
        raise AdvbenchError(f"unknown timm model {timm_name!r}" + (f"; {close}" if close else ""))
    net = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    return Classifier(net, _per_channel(mean, in_channels), _per_channel(std, in_channels),
                      dict(name=f"timm:{timm_name}", in_channels=in_channels, num_classes=num_classes,
                           input_size=input_size, activation=activation, smooth_backward=smooth_backward))


MODELS.register_prefix("timm:", _timm_model)


def _robustbench_model(rb_name: str, **kwargs) -> Classifier:
    """a trained model of RobustBench's zoo, with its weights from --model-dir (pip install 'advbench[robustbench]')"""
    raise AdvbenchError(f"rb:{rb_name} is a trained model of RobustBench's zoo: it is loaded with its weights "
                        f"(advbench attack --model rb:{rb_name} --model-dir DIR), not built or trained here")


MODELS.register_prefix("rb:", _robustbench_model)


def create_model(name: str, *, in_channels: int = 3, num_classes: int = 10, input_size: int = 32,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), activation: str = "relu",
                 smooth_backward: Optional[str] = None) -> Classifier:
    model = MODELS.create(name, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                          mean=mean, std=std, activation=activation, smooth_backward=smooth_backward)
    if not isinstance(model, Classifier):  # third-party model: wrap so it still starts with Normalize
        model = Classifier(model, _per_channel(mean, in_channels), _per_channel(std, in_channels),
                           dict(name=name, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                                activation=activation, smooth_backward=smooth_backward))
    return model


# The smallest images a built-in model takes (its pooling leaves no pixel below that); the ResNets and
# WideResNets end in adaptive pooling and take any size. Other models are tried with one image.
MIN_INPUT_SIZE = {"smallcnn": 4, "lenet": 12}


def model_for_dataset(name: str, dataset, activation: str = "relu", smooth_backward: Optional[str] = None,
                      normalize: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> Classifier:
    """Build ``name`` sized for a robustbench_lite.data.Dataset, normalising with ``normalize`` (mean, std)
    or else the dataset's. A model that cannot take the dataset's images is refused here, with the size
    it needs (or the reason its one-image trial forward gave)."""
    c, h, w = dataset.input_shape
    key = MODELS.canonical(name)
    need = MIN_INPUT_SIZE.get(key)
    if need and min(h, w) < need:
        raise AdvbenchError(f"model {name!r} needs inputs of at least {need}x{need} pixels, dataset {dataset.name} "
                            f"has {h}x{w}")
    mean, std = normalize if normalize is not None else (dataset.mean, dataset.std)
    model = create_model(name, in_channels=c, num_classes=dataset.num_classes, input_size=h,
                         mean=mean, std=std, activation=activation, smooth_backward=smooth_backward)
    check_takes(model, name, dataset)
    return model


def check_takes(model: nn.Module, name: str, dataset) -> None:
    """One image of ``dataset`` through ``model`` (eval mode, no gradients): it must give one logit per
    class. Anything else is one AdvbenchError naming the model and the dataset."""
    c, h, w = dataset.input_shape
    device = next(iter(model.parameters()), torch.empty(0)).device
    try:
        with attack_mode(model, "eval"), torch.no_grad():
            out = model(torch.zeros(1, c, h, w, device=device))
    except Exception as exc:  # e.g. a ViT built for 224 px, non-square images, a user's forward
        raise AdvbenchError(f"model {name!r} cannot take the {c}x{h}x{w} images of dataset {dataset.name} "
                            f"({first_line(exc)})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise AdvbenchError(f"model {name!r} must return logits of shape (batch, classes); on one image of dataset "
                            f"{dataset.name} it returned {got}")
    if out.shape[1] != dataset.num_classes:
        raise AdvbenchError(f"model {name!r} gives {out.shape[1]} logits per image, dataset {dataset.name} has "
                            f"{dataset.num_classes} classes")
