"""The reference AutoAttack (Croce & Hein, ICML 2020: fra31/auto-attack, packaged on PyPI as
``pyautoattack``) as an attack: the cross-check our users already trust, run by our evaluator on
the same model, samples and threat model (`advbench attack --suite autoattack`).

    attack = attacks.create("autoattack", threat=ThreatModel("linf", 0.3))
    x_adv = attack(model, x, y)          # the reference's adversarial examples for the batch

One call runs the reference's own ``AutoAttack(model, norm, eps, version, seed, device)
.run_standard_evaluation`` on the batch: version "standard" is APGD-CE, APGD-T (9 targets), FAB-T
(9 targets) and Square (5,000 queries), each on the samples the earlier ones failed to fool;
"rand" is APGD-CE and APGD-DLR with EOT over 20 gradient samples. It returns an adversarial
example where it fooled the sample and the clean image elsewhere. The evaluator treats the result
like any attack's: the threat-model check, and the verdict from float32 logits of the returned
point, so its robust accuracy is measured exactly as ours are.

How it differs from our attacks:
- it draws its own random numbers: it seeds torch's global generator with ``seed`` at every call,
  so a sample's result depends on the batch it is in (ours are keyed by sample id): another batch
  size, or DDP shards, can change a few samples' results. Torch's global generator is restored
  after the call, so the rest of the run is not affected;
- it logs to the ``auto-attack`` logger (its checks for randomised, dynamic or probability-output
  models among others) and prints in verbose mode: both are silenced during a call (our own
  gradient-masking checks, masking.py, say what matters on the terminal);
- its settings are its own: only ``seed`` and ``version`` can be set; the engine's (steps,
  restarts, loss, amp, ...) are refused rather than silently ignored;
- it needs at least 10 classes for the standard version (APGD-T and FAB-T target 9), 3 for rand.

pyautoattack is an optional package (`pip install 'advbench[autoattack]'`), imported when the
attack is built, so a run without it stops before any work with one line saying how to install it.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator

import torch
from torch import nn

from robustbench_lite.errors import AdvbenchError

from .engine import ATTACKS, Attack, AttackConfig

VERSIONS = {"standard": 10, "rand": 3}  # the reference's versions and the classes each needs
NORMS = {"linf": "Linf", "l2": "L2"}    # the reference's names of our norms
MISSING = ("attack 'autoattack' needs the reference AutoAttack package, pyautoattack: install it with "
           "pip install 'advbench[autoattack]'")
# the engine's settings the reference does not take (alpha is filled in by the engine, not given)
ENGINE_ONLY = ("steps", "random_start", "restarts", "loss", "targeted", "early_stop", "keep", "model_mode", "amp")
# forward passes of one standard call on a sample no attack fools (the progress bar's 100%):
# APGD-CE 100 + APGD-T 9 x 100 + FAB-T 9 x 100 (+ its gradients) + Square 5,000
PLANNED_FORWARDS = {"standard": 100 + 900 + 900 + 5000, "rand": 2 * 20 * 100}


@dataclass(frozen=True)
class ReferenceConfig(AttackConfig):
    """The reference's settings: ``version`` (standard or rand) and the engine's ``seed``; the other
    engine settings must stay at their defaults (the reference has its own)."""

    version: str = "standard"

    def __post_init__(self) -> None:
        super().__post_init__()
        version = str(self.version).strip().lower()
        if version not in VERSIONS:
            raise AdvbenchError(f"invalid version={self.version!r} for attack {self.attack!r}: expected one of "
                                f"{', '.join(VERSIONS)}")
        self._put("version", version)
        defaults = AttackConfig.defaults()
        for key in ENGINE_ONLY:
            if getattr(self, key) != defaults[key]:
                raise AdvbenchError(f"invalid {key}={getattr(self, key)!r} for attack {self.attack!r}: the reference "
                                    f"AutoAttack runs its own settings (only seed and version can be set)")


def _autoattack_class():
    """pyautoattack.AutoAttack (an optional package: an AdvbenchError saying how to install it)."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise AdvbenchError(MISSING) from None
    return AutoAttack


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """The reference's logger, prints and warnings off for the duration of a call."""
    logger = logging.getLogger("auto-attack")
    before = logger.disabled
    logger.disabled = True
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = before


class _Counted(nn.Module):
    """The model as the reference sees it: each forward is the attack's counted forward (stats and
    the progress hook)."""

    def __init__(self, attack: Attack, model: nn.Module):
        super().__init__()
        self.model = model
        self.attack = attack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attack._forward(self.model, x)


@ATTACKS.register("autoattack", aliases=("reference-autoattack",))
class ReferenceAutoAttack(Attack):
    """The reference AutoAttack (pyautoattack), standard version by default; see the module docstring."""

    name = "autoattack"
    config_class = ReferenceConfig

    def __init__(self, *args: Any, **settings: Any):
        super().__init__(*args, **settings)
        self.reference = _autoattack_class()

    def config(self) -> Dict[str, Any]:
        """Only what the reference takes: the threat model, seed and version."""
        s = self.settings
        return {"attack": self.name, "norm": self.threat.norm, "eps": self.threat.eps, "seed": s.seed,
                "version": s.version}

    def planned_forwards(self) -> int:
        return PLANNED_FORWARDS[self.settings.version]

    def _attack(self, model, x, y, target, ids) -> torch.Tensor:
        if target is not None:
            raise AdvbenchError(f"attack {self.name!r} chooses its own targets: it takes no target=")
        if x.shape[0] == 0 or self.threat.eps == 0:
            return x.clone()
        self._check_classes(model, x)
        aa = self.reference(_Counted(self, model), norm=NORMS[self.threat.norm], eps=self.threat.eps,
                            version=self.settings.version, seed=self.settings.seed, device=x.device)
        devices = [x.device] if x.device.type == "cuda" else []
        with _silenced(), torch.random.fork_rng(devices=devices):
            out = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
        x_adv = out[0] if isinstance(out, tuple) else out  # pyautoattack 0.2 returns (x_adv, y_adv)
        return x_adv.detach().to(device=x.device, dtype=x.dtype)

    def _check_classes(self, model, x: torch.Tensor) -> None:
        with torch.no_grad():
            classes = self._forward(model, x[:1]).shape[1]
        need = VERSIONS[self.settings.version]
        if classes < need:
            raise AdvbenchError(f"attack {self.name!r}: the reference's {self.settings.version} version needs at "
                                f"least {need} classes, the model has {classes}")
