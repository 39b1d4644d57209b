"""Attack specs: which attacks a run performs, by name and with which settings.

An AttackSpec is an attack's registry name, its parameter overrides and the label it has in
results; it builds the attack for one threat model (AttackSpec.build). The specs of a run come from
``"fgsm,bim,pgd"``, dicts, AttackSpec objects or Attack instances (parse_attack_specs), from a
named attack suite (ATTACK_SUITES, `advbench attack --suite NAME`), or from names plus settings
given once for all of them (with_overrides: `advbench attack --steps 20 ...`). Threat models come
from one ThreatModel, a list of them, or an eps sweep (resolve_threats).

A named suite (AttackSuite) also says whether it runs as a cascade by default and whether its
worst case is reportable; evaluation_kind tells, from a run's resolved attack settings, which
reportable suite the run covers, or WEAK: its worst case is an upper bound from weak attacks only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import attacks
from attacks.engine import Attack

from .errors import AdvbenchError, SettingError
from .registry import suggest
from .threat import ThreatModel, parse_eps, parse_eps_list

DEFAULT_ATTACKS = ("fgsm", "bim", "pgd")
WORST_CASE = "worst-case"
PER_ATTACK, CASCADE = "per-attack", "cascade"  # how a run's attacks ran (evaluator.evaluate's ``cascade``)


def mode_name(cascade: bool) -> str:
    return CASCADE if cascade else PER_ATTACK


@dataclass(frozen=True)
class AttackSpec:
    """An attack of an evaluation by registry name with parameter overrides; ``label`` names it in
    results. It attacks the model in eval mode: model_mode="train" is refused (it would make every
    forward use batch statistics and overwrite the BatchNorm running statistics of the model under
    evaluation; adversarial training's inner attack, which takes it, is built by the engine)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""
    factory: Optional[Callable[..., Any]] = None  # an Attack class (default: the registry's ``name``)

    def build(self, threat: ThreatModel, seed: int = 0):
        params = dict(self.params)
        params.setdefault("seed", seed)
        atk = self.factory(threat=threat, **params) if self.factory is not None else \
            attacks.create(self.name, threat=threat, **params)
        mode = getattr(getattr(atk, "settings", None), "model_mode", "eval")
        if mode != "eval":
            raise AdvbenchError(f"invalid model_mode={mode!r} for attack {self.label or self.name!r}: an evaluation "
                                f"attacks the model in eval mode (train mode would overwrite the BatchNorm running "
                                f"statistics of the model under evaluation; it is for adversarial training)")
        return atk


def _auto_label(name: str, params: Mapping[str, Any]) -> str:
    shown = {k: v for k, v in params.items() if k != "seed"}
    if not shown:
        return name
    return f"{name}({','.join(f'{k}={v}' for k, v in sorted(shown.items()))})"


def parse_attack_specs(items: Union[str, Iterable[Any], None]) -> List[AttackSpec]:
    """Attack specs from ``"fgsm,bim,pgd"``, names, dicts ``{"name": "pgd", "steps": 20, "label": ...}``,
    AttackSpec objects or Attack instances (their class and parameters are reused for every threat
    model). Names are canonicalised (``ifgsm`` -> ``bim``); labels are the names, made unique with
    the parameters when one attack appears twice."""
    if items is None:
        items = DEFAULT_ATTACKS
    if isinstance(items, str):
        items = [s for s in (p.strip() for p in items.split(",")) if s] or [""]
    raw: List[AttackSpec] = []
    for it in items:
        if isinstance(it, AttackSpec):
            spec = it
        elif isinstance(it, Attack):
            params = {k: v for k, v in it.config().items() if k not in ("attack", "norm", "eps")}
            if params.get("alpha") == it.default_alpha(it.threat.eps, it.steps):
                params.pop("alpha")  # the default step size scales with eps: recompute it per threat
            raw.append(AttackSpec(it.name, params, "", type(it)))
            continue
        elif isinstance(it, str):
            if not it.strip():
                raise AdvbenchError("empty attack name (expected names such as fgsm,bim,pgd)")
            spec = AttackSpec(it.strip())
        elif isinstance(it, Mapping):
            d = dict(it)
            if "name" not in d:
                raise AdvbenchError(f"attack spec {d!r} has no 'name'")
            name, label = d.pop("name"), d.pop("label", "") or ""
            spec = AttackSpec(str(name), d, str(label))
        else:
            raise AdvbenchError(f"invalid attack spec {it!r}: expected a name or a mapping with 'name'")
        canonical = spec.name if spec.factory is not None else attacks.ATTACKS.canonical(spec.name)
        raw.append(AttackSpec(canonical, dict(spec.params), spec.label, spec.factory))
    if not raw:
        raise AdvbenchError("no attacks given")
    unlabeled = [s.name for s in raw if not s.label]
    explicit = {s.label for s in raw if s.label}
    out: List[AttackSpec] = []
    for s in raw:
        plain = unlabeled.count(s.name) == 1 and s.name not in explicit
        label = s.label or (s.name if plain else _auto_label(s.name, s.params))
        out.append(AttackSpec(s.name, s.params, label, s.factory))
    labels = [s.label for s in out]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise AdvbenchError(f"attack {dup[0]!r} is listed twice with the same parameters (give each a label)")
    if WORST_CASE in labels:
        raise AdvbenchError(f"{WORST_CASE!r} is reserved and cannot label an attack")
    return out


def resolve_threats(threats: Union[ThreatModel, Sequence[ThreatModel], None] = None, *,
                    eps: Union[str, float, Sequence[Union[str, float]], None] = None,
                    norm: str = "linf") -> List[ThreatModel]:
    """One threat model, a list of them, or an eps sweep (``eps="2/255,4/255"`` or a list)."""
    if threats is not None and eps is not None:
        raise AdvbenchError("give either threat models or eps, not both")
    if threats is None:
        if eps is None:
            raise AdvbenchError("no threat model: give eps (e.g. 8/255)")
        if isinstance(eps, str):
            values = parse_eps_list(eps, norm)
        elif isinstance(eps, (int, float)):
            values = [eps]
        else:
            values = list(eps)
        out = [ThreatModel(norm, v) for v in values]
    elif isinstance(threats, ThreatModel):
        out = [threats]
    else:
        out = list(threats)
    if not out:
        raise AdvbenchError("no threat model given")
    unique: List[ThreatModel] = []
    for t in out:
        if not isinstance(t, ThreatModel):
            raise AdvbenchError(f"invalid threat model {t!r}")
        if t not in unique:
            unique.append(t)
    return unique


def build_attacks(specs: Sequence[AttackSpec], threats: Sequence[ThreatModel], seed: int = 0):
    """Build every (threat, attack) once: bad parameters fail here, before any model work.
    Returns {(threat, label): Attack}."""
    return {(t, s.label): s.build(t, seed) for t in threats for s in specs}


def with_overrides(names: Union[str, Iterable[Any]], steps: Optional[int] = None, alpha: Optional[str] = None,
                   restarts: Optional[int] = None, loss: Optional[str] = None,
                   amp: Optional[str] = None) -> List[AttackSpec]:
    """Attack specs with settings given once for all of them (`advbench attack`'s options): ``steps``
    and ``alpha`` go to the iterative attacks (not to single-step ones such as fgsm), ``restarts``
    to the random-start ones (pgd), ``loss`` to those with a loss to choose, ``amp`` to all; each only
    to attacks that take it (Attack.overridable: square takes steps and restarts, not alpha or
    loss). A setting that fits none of the attacks is a SettingError."""
    specs = parse_attack_specs(names)
    alpha_v = parse_eps(alpha, setting="alpha") if alpha is not None else None
    out, used = [], {"steps": False, "alpha": False, "restarts": False, "loss": False}
    for s in specs:
        d = attacks.defaults(s.name)
        takes = getattr(attacks.ATTACKS.get(s.name), "overridable", attacks.Attack.overridable)
        params = dict(s.params)
        iterative = d.get("steps", 1) != 1
        for key, value, fits in (("steps", steps, iterative), ("alpha", alpha_v, iterative),
                                 ("restarts", restarts, iterative and d.get("random_start")),
                                 ("loss", loss, True)):
            if value is not None and fits and key in takes:
                params[key], used[key] = value, True
        if amp is not None:
            params["amp"] = amp
        out.append(AttackSpec(s.name, params, s.label, s.factory))
    kinds = {"steps": "iterative (bim, pgd)", "alpha": "step-size (bim, pgd, apgd)",
             "restarts": "random-start (pgd)", "loss": "loss-driven (fgsm, bim, pgd, apgd)"}
    for name, given in (("steps", steps), ("alpha", alpha), ("restarts", restarts), ("loss", loss)):
        if given is not None and not used[name]:
            labels = ", ".join(s.label for s in specs)
            raise SettingError(f"{{{name}}} applies to {kinds[name]} attacks only, and none of {labels} is one", name)
    return out


@dataclass(frozen=True)
class AttackSuite:
    """A named attack suite (`advbench attack --suite NAME`): its attacks (mappings as
    parse_attack_specs takes them, each with a label), whether it runs as a cascade by default
    (each attack only on the samples every earlier one failed to fool), whether its worst case is
    a reportable robust accuracy (``reportable``: at least AutoAttack's standard set), and one line
    for `advbench list` and the README."""

    attacks: Tuple[Mapping[str, Any], ...]
    cascade: bool
    description: str
    reportable: bool = False

    def specs(self, amp: Optional[str] = None) -> List[AttackSpec]:
        """The suite's attack specs; ``amp`` goes to every attack."""
        specs = []
        for item in self.attacks:
            d = dict(item)
            label = d.pop("label")
            if amp is not None:
                d["amp"] = amp
            specs.append(AttackSpec(d.pop("name"), d, label))
        return parse_attack_specs(specs)

    def covered_by(self, configs: Iterable[Mapping[str, Any]]) -> bool:
        """Whether attacks with these resolved settings (Attack.config(): ``attack`` names each)
        include every attack of the suite at least as strong: the same attack with, per setting of
        the suite, an integer count (steps, restarts, targets, queries) at least the suite's and
        any other value equal."""
        configs = list(configs)
        return all(any(c.get("attack") == want["name"] and _at_least(c, want) for c in configs)
                   for want in self.attacks)


def _at_least(config: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    for key, need in want.items():
        if key in ("name", "label"):
            continue
        got = config.get(key)
        if _is_count(need):
            if not (_is_count(got) and got >= need):
                return False
        elif got != need:
            return False
    return True


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The named attack suites (`advbench attack --suite NAME`).
ATTACK_SUITES: Dict[str, AttackSuite] = {
    "standard": AttackSuite(
        ({"name": "apgd-ce", "steps": 100, "label": "apgd-ce"},
         {"name": "apgd-t", "steps": 100, "n_target_classes": 9, "label": "apgd-t"},
         {"name": "fab-t", "steps": 100, "n_target_classes": 9, "label": "fab-t"},
         {"name": "square", "steps": 5000, "p_init": 0.8, "label": "square"}),
        cascade=True, reportable=True,
        description="AutoAttack's standard version on our engine (Croce & Hein, ICML 2020): APGD-CE, "
                    "APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries), each on the "
                    "survivors of the ones before"),
    "rand": AttackSuite(
        ({"name": "apgd-ce", "steps": 100, "eot": 20, "label": "apgd-ce"},
         {"name": "apgd-dlr", "steps": 100, "eot": 20, "label": "apgd-dlr"}),
        cascade=True,
        description="AutoAttack's version='rand' for randomised defences: APGD-CE and APGD-DLR, each "
                    "gradient the mean over 20 samples (EOT), the second on the survivors of the first"),
    "quick": AttackSuite(
        ({"name": "fgsm", "label": "fgsm"}, {"name": "pgd", "steps": 20, "label": "pgd-20"}),
        cascade=False, description="FGSM + PGD-20: a cheap sanity check, an upper bound only"),
    "autoattack": AttackSuite(
        ({"name": "autoattack", "version": "standard", "label": "autoattack"},),
        cascade=True, reportable=True,
        description="the reference AutoAttack, standard version (PyPI pyautoattack, `pip install "
                    "'advbench[autoattack]'`), on the same model, samples and threat model: a cross-check"),
}
REFERENCE_SUITE = "autoattack"  # the suite that runs the reference implementation
WEAK = "weak"  # the evaluation of a run whose attacks cover no reportable suite


def evaluation_kind(configs: Iterable[Mapping[str, Any]]) -> str:
    """What a run's worst case is: the name of the first reportable suite (ATTACK_SUITES) whose
    attacks the run's attacks (their resolved settings, Attack.config()) cover, else WEAK (an upper
    bound from weak attacks only)."""
    configs = list(configs)
    return next((name for name, suite in ATTACK_SUITES.items() if suite.reportable and suite.covered_by(configs)),
                WEAK)


def attack_suite(name: str) -> AttackSuite:
    """The named attack suite (ATTACK_SUITES); an unknown name is an AdvbenchError with a hint."""
    key = str(name).strip().lower()
    if key not in ATTACK_SUITES:
        close = suggest(key, ATTACK_SUITES, cutoff=0.5)
        hint = f" ({close})" if close else ""
        raise AdvbenchError(f"unknown attack suite {name!r}{hint}: expected one of {', '.join(ATTACK_SUITES)}")
    return ATTACK_SUITES[key]


def suite_attack_specs(name: str, amp: Optional[str] = None) -> List[AttackSpec]:
    """The attack specs of a named attack suite (ATTACK_SUITES); ``amp`` goes to every attack."""
    return attack_suite(name).specs(amp)
