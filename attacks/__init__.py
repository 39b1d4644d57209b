"""Attack plugins on one shared engine (attacks.engine).

    attack = attacks.create("pgd", threat=ThreatModel("linf", 8/255), steps=10)
    x_adv = attack(model, x, y)          # same shape, within the threat model

Built-in: fgsm, bim (alias ifgsm), pgd, apgd-ce, apgd-dlr, apgd-t (attacks.apgd, own loop),
fab-t (attacks.fab, own loop); autoattack, the reference AutoAttack (attacks.reference; needs the
optional package pyautoattack).
Third-party attacks register on import through the ``advbench.attacks`` entry-point group, e.g.
in their pyproject.toml:
``[project.entry-points."advbench.attacks"] mine = "mypkg.my_attack"`` where my_attack does
``@attacks.ATTACKS.register("mine") class Mine(attacks.Attack): defaults = {...}`` (and, for
parameters of its own, ``config_class``: a frozen subclass of attacks.AttackConfig). The registry
itself lives in attacks.engine, which every plugin imports. ``parameters(name)`` and
``defaults(name)`` say which settings an attack takes and what they default to.

This package stays light: importing it pulls in torch and robustbench_lite's registry, threat,
rng and runtime (the amp parser) only (never the CLI or the evaluator).
"""
from __future__ import annotations

from typing import Any, List, Optional

from robustbench_lite.threat import ThreatModel

from . import apgd, bim, fab, fgsm, pgd, reference, square  # noqa: F401  (the built-in attacks register themselves on import)
from .engine import ATTACKS, Attack, AttackConfig, attack_mode, defaults, parameters, random_targets, unwrap


def create(name: str, threat: Optional[ThreatModel] = None, **kwargs: Any) -> Attack:
    """Build the attack registered as ``name`` (case-insensitive, aliases allowed); every
    engine parameter (threat, steps, alpha, random_start, restarts, loss, targeted, seed,
    early_stop, keep, model_mode, amp) can be given to override the plugin's defaults."""
    if threat is not None:
        kwargs["threat"] = threat
    return ATTACKS.create(name, **kwargs)


def names() -> List[str]:
    """Registered attack names (built-in and third-party), sorted."""
    return ATTACKS.names()


__all__ = ["ATTACKS", "Attack", "AttackConfig", "attack_mode", "create", "defaults", "names", "parameters",
           "random_targets", "unwrap"]
