"""The one attack loop: FGSM, BIM and PGD are this loop with different settings.

Projected gradient ascent on a per-sample loss L inside the threat model's eps-ball:

    delta_0     = 0                                     (FGSM, BIM)
                  uniform point of the eps-ball         (PGD, random_start=True)
    delta_{t+1} = clip_[0,1]( Proj_eps( delta_t + alpha * step(grad_delta L(x + delta_t)) ) )

where step() is the steepest-ascent direction of the norm: sign(g) for L-inf (Goodfellow et al.
2015; Kurakin et al. 2016), g / ||g||_2 for L2. With steps=1 and alpha=eps this is FGSM (FGM in
L2); with delta_0 = 0 and alpha < eps it is BIM / I-FGSM; with a random start and restarts it is
PGD (Madry et al., ICLR 2018), the inner maximisation of adversarial training. The geometry
(step, projection, random point) comes from robustbench_lite.threat; the losses from
attacks.losses.

Per-sample bookkeeping. A sample is fooled when argmax z != y (untargeted) or argmax z == target
(targeted), on float32 logits: under amp="bf16" a sample that looks fooled on its bf16 logits is
confirmed by one float32 no-grad forward of the candidates before it counts (confirm_fooled). The
logits of the forward pass that computes the gradient at iterate t already say whether iterate t
fools, so no extra forward is spent on that; only the final iterate needs one no-grad forward, and
only for the samples whose result depends on it. Which iterate is returned per sample is ``keep``:

  first-fool  the first iterate that fools the sample, else the highest-loss iterate (default)
  best-loss   the highest-loss iterate that fools the sample, else the highest-loss iterate visited
  last        the last iterate visited (adversarial training: early_stop=False, keep="last")

A sample counts as fooled when the iterate it keeps fools, so a sample counted fooled is always
returned with a point that fools (and one that is not gets its restarts). Iterate 0 is the
starting point: without a random start, a sample the model already gets wrong is returned
unperturbed under first-fool. With early_stop=True a sample leaves the working batch as soon as
it is fooled (the batch shrinks); restarts run only on samples that are not fooled. Without a
random start, restarts would repeat the same walk and are skipped. The bookkeeping (the kept
iterate per sample, the shrinking working batch) is attacks.bookkeeping's, shared with APGD; a
step of the walk reads: loss and gradient, offer the iterate, drop the fooled, step and project.

Settings. An attack's settings are one frozen AttackConfig (steps, alpha, random_start, restarts,
loss, targeted, seed, early_stop, keep, model_mode, amp, eot): the engine's defaults are its field
defaults, its checks are in __post_init__ and name the parameter. A plugin states its own
defaults (``defaults``) and, for parameters of its own, a config subclass (``config_class``, e.g.
APGD's rho and momentum); alpha=None takes the plugin's ``default_alpha(eps, steps)``.

Randomness (random start, random targets) comes from robustbench_lite.rng keyed by
(seed, stream, sample id): the random start of restart r uses stream ``start_stream + r``, where
each attack has a start_stream of its own (PGD's is 0), so that two attacks never start a sample
at the same point. So attacking sample i inside any batch gives the same result as attacking it
alone with sample_ids=[i].

EOT (expectation over transformation, Athalye, Carlini & Wagner, ICML 2018): against a randomised
model (noise, random transformations inside the forward) one gradient is one random draw; with
``eot`` = k the gradient of an iterate is the mean over k forward/backward passes, while its loss
and whether it fools come from the last of them (as AutoAttack's eot_iter). eot=1 is the plain
attack.

Verdicts. The attack keeps, per sample, the prediction of the forward pass that evaluated the
iterate it returns; with float32 forwards in eval mode (no amp) that is a float32 prediction of
exactly the returned point, which the evaluator takes instead of predicting it again
(``verdicts``).

model_mode="train" (adversarial training with BatchNorm in train mode) makes every forward use
batch statistics, so a sample's result depends on its batch: use it with early_stop=False.

Costs: one step is one forward and one backward to the INPUT (``eot`` of each with EOT;
parameters' requires_grad is off during the attack); the loss is summed over the batch. The
inner loop synchronises with the device only to shrink the batch (early_stop=True), once per
step, and under bf16 to confirm fooling in float32; the input check (images finite and in
[0, 1]) adds one sync per call.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import weakref
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from robustbench_lite import rng
from robustbench_lite.errors import AdvbenchError, SettingError
from robustbench_lite.registry import Registry, suggest
from robustbench_lite.runtime import AMP_CHOICES, parse_amp
from robustbench_lite.threat import ThreatModel

from . import losses
from .bookkeeping import Kept, WorkingBatch

# Every attack by name: the built-ins register in their modules (attacks/__init__.py imports them),
# third-party attacks through the ``advbench.attacks`` entry-point group.
ATTACKS = Registry("attack", entry_point_group="advbench.attacks")

KEEP_CHOICES = ("first-fool", "best-loss", "last")
TARGETED_CHOICES = ("random", "least-likely")
MODEL_MODES = ("eval", "train")
TARGET_STREAM = 1 << 28  # rng stream of random targets (restart r's random start: start_stream + r)
# Upper bounds of the counts: far above any real evaluation (AutoAttack runs 100 steps and 1-5
# restarts; the attack's cost grows linearly in both), so a value above them is a typo or an
# overflow (--steps 1000000000, a suite's `restarts: 1e23`) that would run silently for days.
MAX_STEPS = 10_000
MAX_RESTARTS = 1_000
MAX_EOT = 1_000  # gradient samples per iterate (AutoAttack's rand version: 20)
IMAGE_RANGE_ERROR = "images must be finite and in [0, 1] (normalisation belongs inside the model)"


# -- settings ------------------------------------------------------------------------------------
def _err(attack: str, param: str, value: Any, expected: str) -> AdvbenchError:
    return AdvbenchError(f"invalid {param}={value!r} for attack {attack!r}: {expected}")


def check_count(attack: str, param: str, value: Any, limit: int) -> int:
    """``value`` as an int in [1, limit], else an AdvbenchError naming the parameter and the limit."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= limit:
        raise _err(attack, param, value, f"must be an integer between 1 and {limit}")
    return int(value)


def _word(value: Any) -> str:
    return str(value).strip().lower().replace("_", "-")


def _not_one_of(attack: str, param: str, value: Any, choices: Sequence[str], word: str) -> AdvbenchError:
    hint = suggest(word, choices, cutoff=0.5)
    return _err(attack, param, value, f"expected one of {', '.join(choices)}" + (f" ({hint})" if hint else ""))


def _choice(attack: str, param: str, value: Any, choices: Sequence[str]) -> str:
    if _word(value) in choices:
        return _word(value)
    raise _not_one_of(attack, param, value, choices, _word(value))


@dataclass(frozen=True)
class AttackConfig:
    """The engine's settings of one attack (``attack`` names it in messages). The defaults are the
    engine's; a plugin's ``defaults`` override them. alpha=None: the plugin's default step size,
    which Attack fills in (it depends on eps). Values are checked and normalised on construction."""

    attack: str
    steps: int = 10
    alpha: Optional[float] = None
    random_start: bool = False
    restarts: int = 1
    loss: str = "ce"
    targeted: Union[bool, str] = False  # False, "random" or "least-likely" (alias "ll")
    seed: int = 0
    early_stop: bool = True
    keep: str = "first-fool"  # see the module docstring
    model_mode: str = "eval"
    amp: Optional[str] = None  # None (float32) or "bf16"
    eot: int = 1  # forward/backward passes averaged per gradient (EOT, for randomised models)

    def __post_init__(self) -> None:
        n, put = self.attack, self._put
        put("steps", check_count(n, "steps", self.steps, MAX_STEPS))
        put("restarts", check_count(n, "restarts", self.restarts, MAX_RESTARTS))
        put("eot", check_count(n, "eot", self.eot, MAX_EOT))
        a = self.alpha
        if a is not None:
            if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a) or a < 0:
                raise _err(n, "alpha", a, "the step size must be a finite number >= 0")
            put("alpha", float(a))
        for key in ("random_start", "early_stop"):
            if not isinstance(getattr(self, key), bool):
                raise _err(n, key, getattr(self, key), "must be True or False")
        try:
            put("loss", losses.check_loss(self.loss))
        except AdvbenchError:
            raise _not_one_of(n, "loss", self.loss, losses.LOSSES.names(), str(self.loss).lower()) from None
        put("targeted", self._targets())
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise _err(n, "seed", self.seed, "must be an integer")
        put("seed", int(self.seed))
        put("keep", _choice(n, "keep", self.keep, KEEP_CHOICES))
        put("model_mode", _choice(n, "model_mode", self.model_mode, MODEL_MODES))
        try:
            put("amp", parse_amp(self.amp))
        except SettingError:
            raise _not_one_of(n, "amp", self.amp, AMP_CHOICES, _word(self.amp)) from None

    def _put(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)  # normalising a frozen dataclass in __post_init__

    def _targets(self) -> Union[bool, str]:
        t = self.targeted
        if t is True:
            raise _err(self.attack, "targeted", t, "say which targets: 'random' or 'least-likely' "
                                                   "(or pass target= when calling the attack)")
        if t is False or (isinstance(t, str) and t.strip().lower() in ("", "false", "none", "no")):
            return False
        t = _choice(self.attack, "targeted", t, TARGETED_CHOICES + ("ll",))
        return "least-likely" if t == "ll" else t

    @classmethod
    def parameters(cls) -> Tuple[str, ...]:
        """The settings an attack of this config takes (its fields but ``attack``)."""
        return tuple(f.name for f in fields(cls) if f.name != "attack")

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        return {f.name: f.default for f in fields(cls) if f.name != "attack"}


# -- the model and the inputs ------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise). Attacks
    take gradients to the input only, so they run on the local module: a forward through the
    wrapper would arm DDP's gradient all-reduce (and broadcast buffers) for a backward that never
    comes to the parameters."""
    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


@contextlib.contextmanager
def attack_mode(model: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """Put ``model`` in eval (or train) mode with every parameter's requires_grad off; restore
    each module's ``training`` flag and each parameter's ``requires_grad`` exactly on exit, also
    when the body raises."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.train(mode == "train")
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def check_images(x: torch.Tensor) -> None:
    """Refuse images that are not finite or not in [0, 1] (the project's convention: normalisation
    belongs inside the model). One pass over x and one host sync."""
    if x.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()  # NaN propagates into both
    if not (lo >= 0 and hi <= 1):  # False for NaN; +-inf fall outside [0, 1]
        raise AdvbenchError(IMAGE_RANGE_ERROR)


def random_targets(y: torch.Tensor, num_classes: int, seed: int, sample_ids: torch.Tensor) -> torch.Tensor:
    """One target class per sample, uniform over the classes != y, keyed by (seed, sample id)
    so that it does not depend on batching (what targeted="random" uses)."""
    offset = 1 + rng.randint(seed, TARGET_STREAM, sample_ids, num_classes - 1).to(y.device)
    return (y + offset) % num_classes


class Objective(NamedTuple):
    """What a walk maximises, ``loss(logits, labels)`` per sample, and when a sample counts as
    fooled: its prediction is ``labels`` (targeted) or is not ``y``."""

    loss: losses.LossFn
    targeted: bool

    def fools(self, logits: torch.Tensor, y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.judge(logits, y, labels)[0]

    def judge(self, logits: torch.Tensor, y: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(fool, pred) per sample: whether it is fooled, and the prediction (-1 where the logits
        are not finite: no verdict, the evaluator's check of the logits decides)."""
        pred = logits.argmax(dim=1)
        fool = pred == labels if self.targeted else pred != y
        return fool, torch.where(torch.isfinite(logits).all(dim=1), pred, -1)


class Verdicts(NamedTuple):
    """The per-sample predictions ``pred`` of one call's returned tensor (a weak reference to it, and
    its version counter then: an in-place change afterwards voids them)."""

    x_adv: "weakref.ref[torch.Tensor]"
    version: int
    pred: torch.Tensor


def _into_box(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """delta moved so that x + delta lies in the image box [0, 1]."""
    return (x + delta).clamp_(0, 1).sub_(x)


def _point(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The image x + delta, clamped to [0, 1]: the same expression for the point forwarded and the
    point returned, so that the prediction of one is the prediction of the other, bit for bit."""
    return (x + delta).clamp_(0, 1)


@dataclass(eq=False)
class _Walk(WorkingBatch):
    """One walk's working batch: the clean images, the labels of the loss, the iterate delta and
    its gradient."""

    x: torch.Tensor
    labels: torch.Tensor
    delta: torch.Tensor
    grad: Optional[torch.Tensor] = None


class Attack:
    """A gradient attack inside a threat model; see the module docstring for the algorithm.

    ``attack = Attack(threat, steps=..., ...)``; ``x_adv = attack(model, x, y)``.
    Subclasses (plugins) set ``name``, ``defaults``, if needed ``default_alpha`` and, for
    parameters of their own, ``config_class``. A setting given as None takes the plugin's
    default, then the engine's (AttackConfig). The settings read as attributes: ``attack.steps``.
    """

    name = "attack"
    defaults: Dict[str, Any] = {}
    config_class: Type[AttackConfig] = AttackConfig
    # rng stream of restart 0's random start (restart r: start_stream + r); an attack with random
    # starts takes one of its own, so that two attacks never start a sample at the same point
    start_stream = 0
    # the settings `advbench attack` gives once for all its attacks (specs.with_overrides) that this
    # attack takes; one whose loop fixes a setting (Square's margin loss, FAB's steps to the
    # boundary: no step size) leaves it out
    overridable: Tuple[str, ...] = ("steps", "alpha", "restarts", "loss")
    # optional progress hook, called after every forward pass with the fraction (0..1) of this
    # call's planned passes done (planned_forwards); plain Python, no device sync
    on_step: Optional[Callable[[float], None]] = None

    def __init__(self, threat: Optional[ThreatModel] = None, *, norm: Optional[str] = None,
                 eps: Union[float, str, None] = None, **settings: Any):
        self._refuse_unknown(settings)
        self.threat = self._threat_model(threat, norm, eps)
        given = {k: v for k, v in settings.items() if v is not None}
        config = self.config_class(attack=self.name, **{**self.defaults, **given})
        if config.alpha is None:
            config = replace(config, alpha=float(self.default_alpha(self.threat.eps, config.steps)))
        self.settings = config
        self.last_stats: Dict[str, int] = {}
        self._verdicts: Optional[Verdicts] = None

    def _refuse_unknown(self, settings: Dict[str, Any]) -> None:
        unknown = sorted(set(settings) - set(self.config_class.parameters()))
        if unknown:
            known = ["threat", "norm", "eps", *AttackConfig.parameters()]
            hint = suggest(unknown[0], known)
            raise AdvbenchError(f"unknown parameter {unknown[0]!r} for attack {self.name!r}"
                                f"{'; ' + hint if hint else ''} (known: {', '.join(known)})")

    def _threat_model(self, threat: Optional[ThreatModel], norm: Optional[str], eps: Any) -> ThreatModel:
        n = self.name
        if threat is None:
            if eps is None:
                raise AdvbenchError(f"attack {n!r} needs a threat model: threat=ThreatModel(norm, eps) or eps=...")
            threat = ThreatModel(norm or "linf", eps)
        elif norm is not None or eps is not None:
            raise AdvbenchError(f"attack {n!r}: give either threat= or norm=/eps=, not both")
        if not isinstance(threat, ThreatModel):
            raise AdvbenchError(f"invalid threat={threat!r} for attack {n!r}: expected a ThreatModel")
        return threat

    def __getattr__(self, key: str) -> Any:
        """The settings as attributes (``attack.steps``, ``attack.keep``, APGD's ``attack.rho``)."""
        settings = self.__dict__.get("settings")
        if settings is not None and key in settings.parameters():
            return getattr(settings, key)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    def __setattr__(self, key: str, value: Any) -> None:
        """The settings are frozen: assigning one (``attack.steps = 5``) would be silently ignored."""
        settings = self.__dict__.get("settings")
        if settings is not None and key in settings.parameters():
            raise AttributeError(f"attack {self.name!r}: {key} is a frozen setting; build a new attack "
                                 f"(attacks.create({self.name!r}, ..., {key}=...))")
        super().__setattr__(key, value)

    @staticmethod
    def default_alpha(eps: float, steps: int) -> float:
        """Step size when none is given. The engine's default is PGD's 2.5 * eps / steps
        (Madry et al. 2018), which lets a walk from any start reach the ball's far side."""
        return 2.5 * eps / steps

    def planned_forwards(self) -> int:
        """Forward passes of one call when no sample is fooled early (the progress hook's 100%):
        per restart ``steps`` with a gradient (``eot`` passes each) and a final one without."""
        s = self.settings
        return (s.restarts if s.random_start else 1) * (s.steps * s.eot + 1)

    # -- description -----------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        """The resolved parameters, JSON-able (for results and the leaderboard)."""
        settings = asdict(self.settings)
        del settings["attack"]
        return {"attack": self.name, "norm": self.threat.norm, "eps": self.threat.eps, **settings}

    def __repr__(self) -> str:
        c = self.config()
        c.pop("attack")
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in c.items())})"

    # -- the attack ------------------------------------------------------------------------
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 target: Optional[torch.Tensor] = None,
                 sample_ids: Union[torch.Tensor, Sequence[int], None] = None) -> torch.Tensor:
        """Adversarial examples for (x, y): same shape, dtype and device as x, inside the
        threat model and [0, 1]. ``target`` (N,) makes the attack targeted at those classes.
        ``sample_ids`` (N,) key the random numbers (default 0..N-1). x is not modified.

        Images that are not finite or not in [0, 1] are refused (AdvbenchError). The default
        sample_ids restart at 0 on every call, so every batch you make yourself gets the same
        random starts (and random targets): when you attack a dataset batch by batch, pass the
        samples' dataset indices as ``sample_ids``."""
        model = unwrap(model)
        x = x.detach()
        n = x.shape[0]
        dev = x.device
        if not x.is_floating_point():
            raise ValueError(f"attack {self.name!r}: images must be a float tensor in [0, 1], got {x.dtype}")
        check_images(x)
        y = torch.as_tensor(y, device=dev).reshape(-1).long()
        if y.numel() != n:
            raise ValueError(f"attack {self.name!r}: {y.numel()} labels for {n} images")
        if sample_ids is None:
            ids = torch.arange(n, device=dev)
        else:
            ids = torch.as_tensor(sample_ids, device=dev).reshape(-1).long()
            if ids.numel() != n:
                raise ValueError(f"attack {self.name!r}: {ids.numel()} sample_ids for {n} images")
        if target is not None:
            target = torch.as_tensor(target, device=dev).reshape(-1).long()
            if target.numel() != n:
                raise ValueError(f"attack {self.name!r}: {target.numel()} targets for {n} images")

        self._stats = {"forward": 0, "backward": 0, "forward_samples": 0, "backward_samples": 0}
        self._verdicts = None
        try:
            with attack_mode(model, self.settings.model_mode):
                x_adv = self._attack(model, x, y, target, ids)
        finally:
            self.last_stats = dict(self._stats)
        return x_adv

    def verdicts(self, x_adv: torch.Tensor) -> Optional[torch.Tensor]:
        """The per-sample predictions (argmax of float32 logits, eval mode) that the last call
        computed on exactly the points of ``x_adv``, the tensor it returned; None when it has none
        for every sample (amp, train mode, an iterate returned without a forward, logits that were
        not finite), or when ``x_adv`` is another tensor or was changed in place since."""
        v = self._verdicts
        if v is None or v.x_adv() is not x_adv or x_adv._version != v.version or not bool((v.pred >= 0).all()):
            return None
        return v.pred

    def _answer(self, x_adv: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Return ``x_adv``, whose points the model predicted as ``pred``: they are verdicts when
        those forwards were float32 and in eval mode."""
        if self.settings.amp is None and self.settings.model_mode == "eval":
            self._verdicts = Verdicts(weakref.ref(x_adv), x_adv._version, pred)
        return x_adv

    def _forward(self, model: nn.Module, inp: torch.Tensor, autocast: bool = True) -> torch.Tensor:
        """Logits in float32 (the hook for bf16 autocast: forward in bf16, loss in float32;
        autocast=False: a float32 forward whatever amp says)."""
        self._stats["forward"] += 1
        self._stats["forward_samples"] += inp.shape[0]
        if self.on_step is not None and autocast:
            self.on_step(min(1.0, self._stats["forward"] / self.planned_forwards()))
        if self.settings.amp == "bf16" and autocast:
            with torch.autocast(device_type=inp.device.type, dtype=torch.bfloat16):
                out = model(inp)
        else:
            out = model(inp)
        return out.float()

    def confirm_fooled(self, model: nn.Module, inp: torch.Tensor, fool: torch.Tensor, objective: Objective,
                       y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``fool`` (n,), decided on this attack's logits of ``inp``, confirmed on float32 logits:
        under amp="bf16" the samples marked fooled get one float32 no-grad forward (of those
        samples only, a host sync) and stay fooled only if it fools them too; without amp, ``fool``.
        Every attack calls it before a sample counts as fooled (and leaves the batch)."""
        if self.settings.amp is None:
            return fool
        rows = fool.nonzero().reshape(-1)
        if rows.numel() == 0:
            return fool
        with torch.no_grad():
            logits = self._forward(model, inp[rows], autocast=False)
        return torch.zeros_like(fool).index_copy_(0, rows, objective.fools(logits, y[rows], labels[rows]))

    def _verdict(self, model: nn.Module, inp: torch.Tensor, logits: torch.Tensor, objective: Objective,
                 y: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(fool, pred) of ``inp`` from its ``logits``, fooling confirmed in float32 (confirm_fooled)."""
        fool, pred = objective.judge(logits, y, labels)
        return self.confirm_fooled(model, inp, fool, objective, y, labels), pred

    def _loss_and_grad(self, model: nn.Module, inp: torch.Tensor, labels: torch.Tensor, loss_fn: losses.LossFn):
        """``eot`` forwards and backwards to the input (the loss summed over the batch): (logits and
        per-sample loss of the last pass, d loss / d inp averaged over the passes), detached."""
        inp = inp.detach().requires_grad_(True)
        grad = None
        for _ in range(self.settings.eot):
            with torch.enable_grad():
                logits = self._forward(model, inp)
                loss = loss_fn(logits, labels)
                (g,) = torch.autograd.grad(loss.sum(), inp)
            grad = g if grad is None else grad.add_(g)
            self._stats["backward"] += 1
            self._stats["backward_samples"] += inp.shape[0]
        if self.settings.eot > 1:
            grad = grad.div_(self.settings.eot)
        return logits.detach(), loss.detach(), grad

    def _loss(self, model: nn.Module, inp: torch.Tensor, labels: torch.Tensor, loss_fn: losses.LossFn):
        """One forward without a gradient: (logits, per-sample loss)."""
        with torch.no_grad():
            logits = self._forward(model, inp)
            return logits, loss_fn(logits, labels)

    def _labels(self, model, x, y, target, ids):
        """(labels the loss uses, targeted?) — true labels, or explicit/random/least-likely targets."""
        if target is not None:
            return target, True
        targeted = self.settings.targeted
        if not targeted:
            return y, False
        with torch.no_grad():
            logits = self._forward(model, x)  # one clean forward: the number of classes, or argmin
        if targeted == "least-likely":
            return logits.argmin(dim=1), True
        c = logits.shape[1]
        if c < 2:
            raise AdvbenchError(f"attack {self.name!r}: random targets need at least 2 classes")
        return random_targets(y, c, self.settings.seed, ids), True

    def _attack(self, model, x, y, target, ids) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.clone()
        labels, targeted = self._labels(model, x, y, target, ids)
        if self.threat.eps == 0:
            return x.clone().clamp_(0, 1)  # nothing can move: the clean input is the answer
        s = self.settings
        kept = Kept.start(torch.zeros_like(x))  # per sample: the kept delta
        objective = Objective(losses.get_loss(s.loss, targeted), targeted)
        # Without a random start every restart would repeat the same deterministic walk.
        restarts = s.restarts if s.random_start else 1
        for r in range(restarts):
            # restarts only for the samples that no iterate has fooled yet
            rows = torch.arange(x.shape[0], device=x.device) if r == 0 else kept.unfooled()
            if rows.numel() == 0:
                break
            xs = x[rows]
            walk = _Walk.start(kept, rows, s.keep, x=xs, labels=labels[rows], delta=self._start(xs, ids[rows], r))
            self._walk(model, walk, objective, final_restart=r == restarts - 1)
        return self._answer(_point(x, kept.iterate), kept.pred)

    def _start(self, x: torch.Tensor, ids: torch.Tensor, r: int) -> torch.Tensor:
        """delta_0 of restart r: a uniform point of the eps-ball (rng stream start_stream + r), or 0."""
        if not self.settings.random_start:
            return torch.zeros_like(x)
        s = self.settings
        return _into_box(x, self.threat.geometry.random(x, self.threat.eps, s.seed, self.start_stream + r, ids))

    def _ascent(self, w: _Walk) -> torch.Tensor:
        """delta + alpha * step(grad), projected onto the eps-ball, then into the image box."""
        geo, eps = self.threat.geometry, self.threat.eps
        return _into_box(w.x, geo.project(w.delta + geo.step(w.grad, self.settings.alpha), eps))

    def _walk(self, model: nn.Module, w: _Walk, objective: Objective, final_restart: bool) -> None:
        """``steps`` steps for the samples of ``w``; their kept iterates go into ``w.into``."""
        for _ in range(self.settings.steps):
            point = _point(w.x, w.delta)
            logits, loss, w.grad = self._loss_and_grad(model, point, w.labels, objective.loss)
            w.offer(w.delta, loss, *self._verdict(model, point, logits, objective, w.labels, w.labels))
            if self.settings.early_stop and not w.drop_fooled():
                return
            w.delta = self._ascent(w)
        self._final_iterate(model, w, objective, final_restart)
        w.store()

    def _final_iterate(self, model: nn.Module, w: _Walk, objective: Objective, final_restart: bool) -> None:
        """Offer the last iterate. Under first-fool its fate matters only for samples not fooled
        yet (best-loss, last: for all); keep="last" on the final restart needs no forward at all
        (and so has no prediction of it)."""
        keep = self.settings.keep
        if keep == "last" and final_restart:
            w.kept, w.kept_pred = w.delta, torch.full_like(w.kept_pred, -1)
            return
        need = None if keep != "first-fool" else (~w.fooled).nonzero().reshape(-1)
        if need is None or need.numel() == w.fooled.numel():  # everybody: no gather
            point = _point(w.x, w.delta)
            logits, loss = self._loss(model, point, w.labels, objective.loss)
            w.offer(w.delta, loss, *self._verdict(model, point, logits, objective, w.labels, w.labels))
        elif need.numel() > 0:  # the others are fooled already: their kept iterate cannot change
            labels = w.labels[need]
            point = _point(w.x[need], w.delta[need])
            logits, loss = self._loss(model, point, labels, objective.loss)
            fool, pred = self._verdict(model, point, logits, objective, labels, labels)
            w.offer(w.delta, torch.full_like(w.kept_loss, float("-inf")).index_copy_(0, need, loss),
                    torch.zeros_like(w.fooled).index_copy_(0, need, fool),
                    torch.full_like(w.kept_pred, -1).index_copy_(0, need, pred))


# -- what a spec may set ---------------------------------------------------------------------------
def _config_class(name: str) -> Type[AttackConfig]:
    return getattr(ATTACKS.get(name), "config_class", AttackConfig)


def parameters(name: Optional[str] = None) -> Tuple[str, ...]:
    """The settings a spec may give attack ``name`` (the engine's, plus e.g. APGD's rho and
    momentum); without a name, the engine's, which every attack takes."""
    return (AttackConfig if name is None else _config_class(name)).parameters()


def defaults(name: str) -> Dict[str, Any]:
    """Attack ``name``'s default settings: the engine's overlaid by the plugin's (alpha None: the
    plugin's default step size, which depends on eps)."""
    return {**_config_class(name).defaults(), **getattr(ATTACKS.get(name), "defaults", {})}
