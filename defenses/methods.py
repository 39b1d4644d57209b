"""Training methods: what one training step minimises.

A method is called as ``method.loss(model, x, y, ids, epoch) -> StepOutput`` by the shared
training loop (robustbench_lite.training), which owns batching, optimisation, checkpoints and
metrics. ``config()`` is recorded in checkpoints and the leaderboard.

Adversarial methods (all draw their inner attack from attacks/, never a second attack loop):

  pgd-at    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks" (ICLR
            2018): minimise CE(f(x_adv), y) with x_adv from PGD (uniform random start, ``steps``
            steps of ``alpha``, default 2.5 * eps / steps).
  fgsm-rs   Wong, Rice & Kolter, "Fast is better than free: Revisiting adversarial training" (ICLR
            2020): FGSM from a uniform random start in the eps-ball with alpha = 1.25 * eps. It can
            collapse ("catastrophic overfitting": PGD accuracy falls to ~0 while FGSM accuracy stays
            high); ``check_collapse`` is the guard the loop applies after every epoch (it rolls back
            to the previous epoch and stops). On mnist-5k at eps = 0.3 it collapses in epoch 2.
  trades    Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy" (ICML
            2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), x_adv maximising that KL (the attack
            loss ``kl`` of attacks.losses); beta = 6. As in the reference code the KL is
            sum p_clean * log(p_clean / p_adv), averaged over the batch. The inner walk starts from
            a uniform point of the eps-ball (the reference code uses x + 0.001 N(0, 1)).
  mix       Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples" (ICLR
            2015): w * CE(f(x), y) + (1 - w) * CE(f(x_adv), y), w = 0.5, x_adv by FGSM (with
            steps > 1: PGD).

Inner attacks run with the model in eval mode (BatchNorm running statistics, no dropout) unless
``bn_mode="train"``; parameters need no gradient during the attack. The random start of epoch e
uses the attack seed ``rng.attack_seed(seed, e)`` and the sample's index in the training split, so it differs from epoch to epoch and is replayed exactly
after --resume.

``eps_warmup=W`` ramps eps linearly over the first W epochs, step by step (eps * t / W after t
epochs, t counted in fractions of an epoch), which large-eps MNIST training needs to get off the
ground (at eps = 0.3 from the first step a small CNN can stay at chance level).

MethodConfig is a method with its settings as `advbench train-robust` takes them (built once, checked
against the ``settings`` each method class declares; ``build(threat, epochs)`` makes the method).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

import attacks
from attacks.engine import attack_mode, unwrap
from robustbench_lite.errors import AdvbenchError, SettingError
from robustbench_lite.registry import Registry
from robustbench_lite.rng import attack_seed
from robustbench_lite.threat import ThreatModel

# Training methods by name; third-party ones register through the ``advbench.defenses`` entry points.
METHODS = Registry("defense", entry_point_group="advbench.defenses")

BN_MODES = ("eval", "train")


def create(name: str, **kwargs):
    """The training method registered as ``name`` (case-insensitive, aliases allowed)."""
    return METHODS.create(name, **kwargs)


def names():
    """Registered training method names, sorted."""
    return METHODS.names()


@dataclass
class StepOutput:
    loss: torch.Tensor                 # scalar to minimise (mean over the batch)
    logits: Optional[torch.Tensor]     # logits on the clean input (for clean accuracy), or None
    adv_logits: Optional[torch.Tensor] = None  # logits on the adversarial input, if any
    stats: Dict[str, Any] = field(default_factory=dict)  # per-batch means (floats or 0-d tensors)
    clean_y: Optional[torch.Tensor] = None  # labels of ``logits`` when they cover only part of the batch


class TrainingMethod:
    name = "base"
    adversarial = False
    # The MethodConfig settings the constructor takes, as keywords of the same name ("threat": the
    # run's threat model); MethodConfig refuses a setting given to a method that does not take it.
    settings: Tuple[str, ...] = ("threat", "seed")

    def config(self) -> Dict[str, Any]:
        return {"method": self.name}

    def loss(self, model, x, y, ids, epoch) -> StepOutput:
        raise NotImplementedError

    def check_collapse(self, history: List[Dict[str, Any]], row: Dict[str, Any]) -> Optional[str]:
        """After an epoch: a message if training collapsed and must roll back (default: never)."""
        return None

    @property
    def validation_attacks(self) -> tuple:
        """Extra attacks the per-epoch validation must run for ``check_collapse`` (e.g. 'fgsm')."""
        return ()


@METHODS.register("standard", help="plain cross-entropy training (no defense)")
class Standard(TrainingMethod):
    name = "standard"
    settings = ()

    def loss(self, model, x, y, ids, epoch):
        logits = model(x)
        return StepOutput(F.cross_entropy(logits, y), logits)


def _threat(threat: Union[ThreatModel, None], norm: str, eps: Union[float, str, None]) -> ThreatModel:
    if threat is not None:
        if not isinstance(threat, ThreatModel):
            raise SettingError(f"{{threat}} must be a ThreatModel (got {threat!r})", "threat")
        return threat
    if eps is None:
        raise SettingError("adversarial training needs an {eps} (e.g. 0.3 or 8/255)", "eps")
    return ThreatModel.parse(norm, eps)


class AdversarialMethod(TrainingMethod):
    """Shared by the adversarial methods: the threat model, the inner attack and its settings."""

    adversarial = True
    settings = ("threat", "seed", "steps", "alpha", "bn_mode", "eps_warmup")
    default_steps = 7
    inner_loss = "ce"
    # Methods whose objective has no clean term spend one extra no-grad forward on (this fraction
    # of) the batch, for the clean loss / accuracy columns of the metrics.
    default_clean_stats = 1.0

    def __init__(self, threat: Optional[ThreatModel] = None, *, norm: str = "linf",
                 eps: Union[float, str, None] = None, steps: Optional[int] = None, alpha: Optional[float] = None,
                 bn_mode: str = "eval", seed: int = 0, eps_warmup: int = 0,
                 clean_stats: Optional[float] = None):
        self.threat = _threat(threat, norm, eps)
        self.steps = self.default_steps if steps is None else steps
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise SettingError(f"{{steps}} must be an integer >= 1 for {self.name} (got {self.steps!r})", "steps")
        self.alpha = self.default_alpha(self.threat.eps, self.steps) if alpha is None else float(alpha)
        if not (self.alpha >= 0):
            raise SettingError(f"{{alpha}} must be >= 0 (got {alpha})", "alpha")
        mode = str(bn_mode).strip().lower()
        if mode not in BN_MODES:
            raise SettingError(f"invalid {{bn_mode}} {bn_mode!r}: expected eval or train", "bn_mode")
        self.bn_mode = mode
        self.seed = int(seed)
        if isinstance(eps_warmup, bool) or not isinstance(eps_warmup, int) or eps_warmup < 0:
            raise SettingError(f"{{eps_warmup}} must be a number of epochs >= 0 (got {eps_warmup!r})", "eps_warmup")
        self.eps_warmup = eps_warmup
        self.clean_stats = self.default_clean_stats if clean_stats is None else float(clean_stats)
        if not (0.0 <= self.clean_stats <= 1.0):
            raise SettingError(f"{{clean_stats}} must be a fraction of the batch in [0, 1] (got {clean_stats})",
                               "clean_stats")
        self._cache: Dict[Any, Any] = {}
        self._progress = None

    # -- the inner attack --------------------------------------------------------------------
    def default_alpha(self, eps: float, steps: int) -> float:
        return 2.5 * eps / steps  # Madry et al.'s step, scaled to the step count

    def random_start(self) -> bool:
        return True

    def attack_name(self) -> str:
        return "pgd"

    def begin_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        """Called by the training loop before step ``step`` (0-based, within the epoch): the eps
        ramp advances per step, a pure function of (epoch, step), so --resume replays it."""
        self._progress = (epoch, (epoch - 1) + (step + 1) / max(1, steps_per_epoch))

    def eps_at(self, epoch: int) -> float:
        """eps * min(1, t / eps_warmup), t = epochs done including the current step (the end of
        ``epoch`` when the loop did not say which step)."""
        if not self.eps_warmup:
            return self.threat.eps
        prog = getattr(self, "_progress", None)
        t = prog[1] if prog is not None and prog[0] == epoch else float(epoch)
        return self.threat.eps * min(1.0, t / self.eps_warmup)

    def attack_for(self, epoch: int):
        """The inner attack of ``epoch`` (eps ramp, seed mixed with the epoch)."""
        eps = self.eps_at(epoch)
        atk = self._cache.get((epoch, eps))
        if atk is None:
            scale = eps / self.threat.eps if self.threat.eps > 0 else 1.0
            atk = attacks.create(self.attack_name(), threat=ThreatModel(self.threat.norm, eps), steps=self.steps,
                                 alpha=self.alpha * scale, random_start=self.random_start(), restarts=1,
                                 loss=self.inner_loss, seed=attack_seed(self.seed, epoch), early_stop=False,
                                 keep="last", model_mode=self.bn_mode)
            self._cache = {(epoch, eps): atk}
        return atk

    def perturb(self, model, x, y, ids, epoch):
        return self.attack_for(epoch)(model, x, y, sample_ids=ids)

    def clean_logits(self, model, x):
        """Clean logits for the metrics only, on the first ``clean_stats`` fraction of the batch
        (batches are random, so that is an unbiased estimate): no graph, BatchNorm in eval mode
        (the statistics are not touched)."""
        k = int(round(self.clean_stats * x.shape[0]))
        if k <= 0:
            return None
        model = unwrap(model)  # no gradient: the local module, no DDP bookkeeping
        with attack_mode(model, "eval"), torch.no_grad():
            return model(x[:k])

    def _adv_output(self, model, x, y, ids, epoch) -> StepOutput:
        """CE on the adversarial examples (pgd-at, fgsm-rs), with the clean metrics on the side."""
        clean = self.clean_logits(model, x)
        x_adv = self.perturb(model, x, y, ids, epoch)
        adv = model(x_adv)
        loss = F.cross_entropy(adv, y)
        stats = {"adv_loss": loss.detach()}
        clean_y = None
        if clean is not None:
            clean_y = y[:clean.shape[0]]
            stats["clean_loss"] = F.cross_entropy(clean, clean_y)
        return StepOutput(loss, clean, adv, stats, clean_y=clean_y)

    def config(self) -> Dict[str, Any]:
        c = {"method": self.name, "norm": self.threat.norm, "eps": self.threat.eps, "steps": self.steps,
             "alpha": self.alpha, "bn_mode": self.bn_mode, "attack": self.attack_name(), "loss": self.inner_loss}
        if self.eps_warmup:
            c["eps_warmup"] = self.eps_warmup
        return c


@METHODS.register("pgd-at", aliases=("pgd", "madry"),
                  help="PGD adversarial training (Madry et al. 2018): CE on PGD examples, random start")
class PGDAT(AdversarialMethod):
    name = "pgd-at"
    default_steps = 7

    def loss(self, model, x, y, ids, epoch):
        return self._adv_output(model, x, y, ids, epoch)


@METHODS.register("fgsm-rs", aliases=("fast-at", "fgsm-at"),
                  help="fast AT (Wong et al. 2020): FGSM from a random start, alpha=1.25 eps, collapse guard")
class FGSMRS(AdversarialMethod):
    name = "fgsm-rs"
    default_steps = 1
    default_clean_stats = 0.25  # keep the fast method fast: clean metrics on a quarter of the batch

    def __init__(self, threat=None, *, collapse_drop: float = 0.2, collapse_gap: float = 0.5,
                 collapse_floor: float = 0.2, **kw):
        super().__init__(threat, **kw)
        if self.steps != 1:
            raise SettingError(f"fgsm-rs takes one FGSM step (got {{steps}} {self.steps}); use pgd-at for more",
                               "steps")
        self.collapse_drop = float(collapse_drop)
        self.collapse_gap = float(collapse_gap)
        self.collapse_floor = float(collapse_floor)

    def default_alpha(self, eps, steps):
        return 1.25 * eps

    def loss(self, model, x, y, ids, epoch):
        # one engine step from a uniform random start = FGSM-RS (delta clipped to the ball and box)
        return self._adv_output(model, x, y, ids, epoch)

    @property
    def validation_attacks(self):
        return ("fgsm",)

    def check_collapse(self, history, row):
        """Catastrophic overfitting (Wong et al. 2020, Sec. 5): after an epoch, validation PGD
        accuracy fell more than ``collapse_drop`` (20 points) below the best epoch so far, or it is
        low (< ``collapse_floor``, 20%) while FGSM accuracy is more than ``collapse_gap`` (50 points)
        above it: the model has learnt to defeat the single FGSM step, not the threat model."""
        pgd, fgsm = row.get("val_pgd_acc"), row.get("val_fgsm_acc")
        if pgd is None:
            return None
        best = max((float(r["val_pgd_acc"]) for r in history if r.get("val_pgd_acc") is not None
                    and not r.get("rolled_back")), default=None)
        if best is not None and best - pgd > self.collapse_drop:
            return (f"catastrophic overfitting at epoch {row['epoch']}: validation PGD accuracy fell from "
                    f"{best:.1%} to {pgd:.1%}")
        if fgsm is not None and pgd < self.collapse_floor and fgsm - pgd > self.collapse_gap:
            return (f"catastrophic overfitting at epoch {row['epoch']}: validation PGD accuracy {pgd:.1%} "
                    f"while FGSM accuracy is {fgsm:.1%}")
        return None

    def config(self):
        c = super().config()
        c["attack"] = "fgsm-rs"
        return c


class _WithReference(nn.Module):
    """``model(x)`` with fixed reference logits appended: [z(x) | z_ref] (2C columns), the input
    layout of the ``kl`` attack loss. The batch must keep its rows (the attack is run with
    early_stop=False and one restart, so it does)."""

    def __init__(self, model: nn.Module, ref: torch.Tensor):
        super().__init__()
        self.model = model
        self.ref = ref

    def forward(self, x):
        z = self.model(x)
        if z.shape[0] != self.ref.shape[0]:
            raise RuntimeError("TRADES inner attack: the batch changed size; the KL reference is per row")
        return torch.cat([z, self.ref.to(z.dtype)], dim=1)


@METHODS.register("trades", help="TRADES (Zhang et al. 2019): CE(clean) + beta * KL(clean || adv), beta=6")
class TRADES(AdversarialMethod):
    name = "trades"
    settings = AdversarialMethod.settings + ("beta",)
    default_steps = 7
    inner_loss = "kl"

    def __init__(self, threat=None, *, beta: float = 6.0, **kw):
        super().__init__(threat, **kw)
        if not (beta >= 0):
            raise SettingError(f"{{beta}} must be >= 0 (got {beta})", "beta")
        self.beta = float(beta)

    def perturb(self, model, x, y, ids, epoch):
        model = unwrap(model)  # input gradients only: the local module under DDP
        with attack_mode(model, self.bn_mode), torch.no_grad():
            ref = model(x).detach().float()
        return self.attack_for(epoch)(_WithReference(model, ref), x, y, sample_ids=ids)

    def loss(self, model, x, y, ids, epoch):
        x_adv = self.perturb(model, x, y, ids, epoch)
        clean = model(x)
        adv = model(x_adv)
        ce = F.cross_entropy(clean, y)
        p_clean = F.softmax(clean, dim=1)
        kl = (p_clean * (F.log_softmax(clean, dim=1) - F.log_softmax(adv, dim=1))).sum(1).mean()
        loss = ce + self.beta * kl
        return StepOutput(loss, clean, adv, {"clean_loss": ce.detach(), "kl": kl.detach(),
                                             "adv_loss": F.cross_entropy(adv.detach(), y)})

    def config(self):
        return {**super().config(), "beta": self.beta}


@METHODS.register("mix", aliases=("goodfellow",),
                  help="Goodfellow et al. 2015: 0.5 CE(clean) + 0.5 CE(FGSM adversarial)")
class Mix(AdversarialMethod):
    name = "mix"
    settings = AdversarialMethod.settings + ("mix_weight",)
    default_steps = 1

    def __init__(self, threat=None, *, mix_weight: float = 0.5, **kw):
        super().__init__(threat, **kw)
        if not (0.0 <= mix_weight <= 1.0):
            raise SettingError(f"{{mix_weight}} must be in [0, 1] (got {mix_weight})", "mix_weight")
        self.weight = float(mix_weight)

    def default_alpha(self, eps, steps):
        return eps if steps == 1 else 2.5 * eps / steps

    def random_start(self):
        return self.steps > 1  # FGSM (as in the paper) from x; PGD with a random start beyond one step

    def attack_name(self):
        return "fgsm" if self.steps == 1 else "pgd"

    def loss(self, model, x, y, ids, epoch):
        x_adv = self.perturb(model, x, y, ids, epoch)
        clean = model(x)
        adv = model(x_adv)
        ce_clean, ce_adv = F.cross_entropy(clean, y), F.cross_entropy(adv, y)
        loss = self.weight * ce_clean + (1 - self.weight) * ce_adv
        return StepOutput(loss, clean, adv, {"clean_loss": ce_clean.detach(), "adv_loss": ce_adv.detach()})

    def config(self):
        return {**super().config(), "weight": self.weight}


def auto_eps_warmup(epochs: int) -> int:
    """The default eps ramp: 2 epochs when training for 5 or more, else 1. Without a ramp, PGD-AT of
    a small CNN at MNIST's eps = 0.3 stays at chance level (3 epochs: 10% test accuracy); with a
    one-epoch ramp the same 3-epoch run reaches 95.7% test accuracy and 46.2% validation PGD-10."""
    return 2 if epochs >= 5 else 1


@dataclass(frozen=True)
class MethodConfig:
    """A training method and its settings, as `advbench train-robust` takes them. The name is made
    canonical and every setting given is checked against the ``settings`` the method declares (a
    method gets only those; the others keep their defaults). ``eps_warmup`` None: the default ramp
    (auto_eps_warmup) for a method that takes one."""

    method: str = "pgd-at"
    steps: Optional[int] = None
    alpha: Optional[float] = None
    beta: Optional[float] = None
    mix_weight: Optional[float] = None
    bn_mode: str = "eval"
    eps_warmup: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "method", METHODS.canonical(self.method))
        takes = self.takes()
        if self.beta is not None and "beta" not in takes:
            raise SettingError(f"{{beta}} is TRADES' weight; method {self.method!r} has none", "beta")
        if self.mix_weight is not None and "mix_weight" not in takes:
            raise SettingError(f"{{mix_weight}} belongs to method 'mix', not {self.method!r}", "mix_weight")
        given = [s for s in ("steps", "alpha") if getattr(self, s) is not None]
        given += ["eps_warmup"] if self.eps_warmup else []
        refused = [s for s in given if s not in takes]
        if refused:
            names = ", ".join("{" + s + "}" for s in refused)
            raise SettingError(f"method {self.method!r} has no inner attack: {names} does not apply", *refused)

    def takes(self) -> Tuple[str, ...]:
        """The settings the method takes (its factory's ``settings``; a plugin without: threat and seed)."""
        return tuple(getattr(METHODS.get(self.method), "settings", TrainingMethod.settings))

    def build(self, threat: Optional[ThreatModel], epochs: int) -> TrainingMethod:
        """The method on ``threat`` for a training of ``epochs`` epochs (the default eps ramp's length
        depends on them)."""
        values = {"threat": threat, "seed": self.seed, "steps": self.steps, "alpha": self.alpha, "beta": self.beta,
                  "mix_weight": self.mix_weight, "bn_mode": self.bn_mode,
                  "eps_warmup": auto_eps_warmup(epochs) if self.eps_warmup is None else self.eps_warmup}
        kwargs = {s: values[s] for s in self.takes() if values.get(s) is not None}
        try:
            return METHODS.get(self.method)(**kwargs)
        except TypeError as exc:
            raise AdvbenchError(f"method {self.method!r} cannot be built with these options ({exc})") from None
