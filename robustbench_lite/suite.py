"""Benchmark suites: a YAML file that names models x threat models x attacks, turned into one
evaluation run per model (runs.RunSpec; `advbench run SUITE.yaml` executes them):

    name: mnist-quick                 # optional
    dataset: mnist-5k                 # default dataset of the models
    n_examples: 200                   # null = the whole test split
    batch_size: 200
    seed: 0
    device: auto                      # auto | cpu | cuda
    masking_checks: true              # optional: the gradient-masking checks after each run
    cascade: false                    # optional: each attack only on the samples the earlier ones
                                      #   failed to fool (AutoAttack's cascade); default false
    channels_last: false              # optional fast paths, as the CLI's flags
    compile: false
    models:
      - name: smallcnn                # zoo baseline (trained and cached when missing)
      - name: smallcnn
        checkpoint: models/smallcnn-mnist-5k-pgd-at.pt   # e.g. train-robust --out models/...
        dataset: mnist-5k             # optional, per model
      - {name: "file:nets/my_net.py:Net", checkpoint: my_net.pt, normalize: cifar10}   # your own model
      - {name: rb:Standard, model_dir: models, dataset: cifar10}                      # RobustBench's zoo
      - {name: tv:resnet18, weights: DEFAULT}                                         # pretrained weights
    threats:
      - {norm: linf, eps: 0.1}
      - {norm: linf, eps: [0.2, 0.3]} # a list is an eps sweep
    attacks:
      - fgsm
      - {name: pgd, steps: 40, restarts: 2, loss: margin, label: pgd-40-margin}
      - {name: apgd-t, steps: 100, n_target_classes: 3, rho: 0.75}   # an attack's own parameters too

Suites are read with yaml.safe_load (tags such as !!python/... are refused, and so are recursive
aliases and alias bombs) and validated with errors that name the file, the line and the bad key.
Paths are relative to the current directory. This module only reads suites: it runs nothing.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

import attacks

from .data import DATASETS
from .errors import AdvbenchError
from .models import MODELS
from .registry import suggest
from .runs import RunSpec
from .runtime import FastPaths, check_seed
from .sources import check_source
from .specs import AttackSpec, parse_attack_specs
from .threat import ThreatModel, check_norm, parse_eps

TOP_KEYS = ("name", "description", "dataset", "data_dir", "download", "n_examples", "batch_size", "seed", "device",
            "results_dir", "masking_checks", "cascade", "channels_last", "compile", "models", "threats", "attacks")
MODEL_KEYS = ("name", "checkpoint", "dataset", "weights", "model_dir", "normalize")
THREAT_KEYS = ("norm", "eps")
ATTACK_KEYS = ("name", "label")  # and the attack's own settings: attacks.parameters(name)
# the suite-wide settings: (key, type, what a value must be)
SETTINGS = (("name", str, "a string"), ("description", str, "a string"), ("dataset", str, "a dataset name"),
            ("data_dir", str, "a path"), ("download", bool, "true or false"),
            ("n_examples", numbers.Integral, "an integer"), ("batch_size", numbers.Integral, "an integer"),
            ("seed", numbers.Integral, "an integer"), ("device", str, "auto, cpu or cuda"),
            ("results_dir", str, "a path"), ("masking_checks", bool, "true or false"),
            ("cascade", bool, "true or false"), ("channels_last", bool, "true or false"),
            ("compile", bool, "true or false"))
_SAFE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}


@dataclass
class Suite:
    path: Path
    name: str
    models: List[Dict[str, Any]]
    threats: List[ThreatModel]
    attacks: List[AttackSpec]
    settings: Dict[str, Any]

    def runs(self, results_dir: Optional[str] = None, device: Optional[str] = None) -> List[RunSpec]:
        """One evaluation run per model (``results_dir`` / ``device`` override the suite's)."""
        s = self.settings
        return [RunSpec(model=m.get("name"), checkpoint=m.get("checkpoint"),
                        dataset=m.get("dataset") or s.get("dataset"), threats=self.threats,
                        attacks=self.attacks, cascade=bool(s.get("cascade", False)),
                        n_examples=s.get("n_examples", 1000),
                        batch_size=s.get("batch_size", 256), device=device or s.get("device", "auto"),
                        seed=s.get("seed", 0), results_dir=results_dir or s.get("results_dir", "results"),
                        data_dir=s.get("data_dir"), download=bool(s.get("download", False)),
                        source=f"advbench run {self.path}", flags=(f"suite={self.name}",),
                        masking_checks=bool(s.get("masking_checks", True)),
                        fast=FastPaths(channels_last=bool(s.get("channels_last", False)),
                                       compile=bool(s.get("compile", False))),
                        weights=m.get("weights"), model_dir=m.get("model_dir"), normalize=m.get("normalize"))
                for m in self.models]


def load_suite(path) -> Suite:
    """Read and validate a suite file; every error names the file and the line."""
    p = Path(path)
    node, data = _read(p)
    r = _Reader(str(p), _Loc(node))
    if not isinstance(data, dict):
        raise r.err(r.loc.line, "a suite is a mapping with models, threats and attacks")
    r.known_keys(data, r.loc, TOP_KEYS, "the suite")
    settings = _settings(r, data)
    models = [_model(r, m, il, f"models[{i}]") for i, (m, il) in enumerate(r.items(data, "models"))]
    threats: List[ThreatModel] = []
    for i, (t, il) in enumerate(r.items(data, "threats")):
        for tm in _threats(r, t, il, f"threats[{i}]"):
            if tm not in threats:
                threats.append(tm)
    specs = _attacks(r, data, threats, settings.get("seed", 0))
    return Suite(p, settings.get("name") or p.stem, models, threats, specs, settings)


def _read(p: Path):
    """(the composed YAML node, the data) of a suite file: tags checked on the node graph before
    yaml.safe_load builds anything."""
    where = str(p)
    if not p.is_file():
        raise AdvbenchError(f"suite file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdvbenchError(f"cannot read suite {p}: {exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_tags(node, where)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}: " if mark is not None else ""
        what = " ".join(str(exc.problem or exc).split())
        raise AdvbenchError(f"{where}: {line}invalid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise AdvbenchError(f"{where}: invalid YAML: {' '.join(str(exc).split())}") from None
    if node is None or data is None:
        raise AdvbenchError(f"{where}: the suite is empty")
    return node, data


class _Loc:
    """Line numbers of a composed YAML node and its children."""

    def __init__(self, node):
        self.node = node
        self.line = node.start_mark.line + 1

    def key_line(self, key: str) -> int:
        for k, _ in getattr(self.node, "value", []):
            if getattr(k, "value", None) == key:
                return k.start_mark.line + 1
        return self.line

    def child(self, key) -> "_Loc":
        if isinstance(self.node, yaml.MappingNode):
            for k, v in self.node.value:
                if k.value == key:
                    return _Loc(v)
        elif isinstance(self.node, yaml.SequenceNode) and isinstance(key, int) and key < len(self.node.value):
            return _Loc(self.node.value[key])
        return self


@dataclass
class _Reader:
    """The checks of a suite's parts, each error naming the file (``where``) and the line."""

    where: str
    loc: _Loc  # the whole suite

    def err(self, line: int, msg: str) -> AdvbenchError:
        return AdvbenchError(f"{self.where}: line {line}: {msg}")

    def wrap(self, fn: Callable[[], Any], line: int) -> Any:
        """fn(), its AdvbenchError prefixed with the file and ``line``."""
        try:
            return fn()
        except AdvbenchError as exc:
            raise self.err(line, str(exc)) from None

    def known_keys(self, d: dict, loc: _Loc, allowed: Sequence[str], section: str) -> None:
        for k in d:
            if k not in allowed:
                close = suggest(k, allowed)
                hint = f"; {close}" if close else ""
                raise self.err(loc.key_line(k), f"unknown key {k!r} in {section}{hint} (expected one of: "
                                                f"{', '.join(allowed)})")

    def typed(self, d: dict, loc: _Loc, key: str, kinds, what: str, section: str = ""):
        """d[key] (None when absent or null) when it is of ``kinds`` (bool is only a bool)."""
        if key not in d or d[key] is None:
            return None
        v = d[key]
        ok = isinstance(v, bool) if kinds is bool else (isinstance(v, kinds) and not isinstance(v, bool))
        if not ok:
            raise self.err(loc.child(key).line, f"{section}{key} must be {what} (got {v!r})")
        return v

    def items(self, data: dict, key: str) -> List[Tuple[Any, _Loc]]:
        """The entries of the non-empty list ``key`` of the suite, each with its location."""
        if key not in data or data[key] is None:
            raise self.err(self.loc.line, f"missing {key!r} (a list)")
        v = data[key]
        if not isinstance(v, list) or not v:
            raise self.err(self.loc.child(key).line, f"{key!r} must be a non-empty list")
        sl = self.loc.child(key)
        return [(item, sl.child(i)) for i, item in enumerate(v)]


def _settings(r: _Reader, data: dict) -> Dict[str, Any]:
    """The suite-wide settings (SETTINGS), typed and checked."""
    loc = r.loc
    settings = {key: v for key, kinds, what in SETTINGS
                if (v := r.typed(data, loc, key, kinds, what)) is not None}
    for key in ("n_examples", "batch_size"):
        if key in settings and settings[key] < 1:
            raise r.err(loc.child(key).line, f"{key} must be >= 1 (got {settings[key]})")
    if "seed" in settings:
        r.wrap(lambda: check_seed(settings["seed"], "seed"), loc.child("seed").line)
    if "n_examples" in data and data["n_examples"] is None:
        settings["n_examples"] = None
    if "dataset" in settings:
        r.wrap(lambda: DATASETS.canonical(settings["dataset"]), loc.child("dataset").line)
    if "device" in settings:
        d = str(settings["device"]).strip().lower()
        if not (d in ("auto", "cpu") or d.startswith("cuda")):
            raise r.err(loc.child("device").line, f"device must be auto, cpu or cuda (got {settings['device']!r})")
    return settings


def _model(r: _Reader, m: Any, il: _Loc, section: str) -> Dict[str, Any]:
    """One entry of ``models``: a name (the zoo baseline), or a mapping with name / checkpoint / dataset."""
    if isinstance(m, str):
        m = {"name": m}
    if not isinstance(m, dict):
        raise r.err(il.line, f"{section} must be a model name or a mapping with name / checkpoint / dataset "
                             f"(and weights / model_dir / normalize)")
    r.known_keys(m, il, MODEL_KEYS, section)
    for k in MODEL_KEYS:
        r.typed(m, il, k, str, "a string", f"{section}.")
    if not m.get("name") and not m.get("checkpoint"):
        raise r.err(il.line, f"{section} needs a name (zoo baseline) or a checkpoint")
    if m.get("name"):
        r.wrap(lambda: MODELS.canonical(m["name"]), il.child("name").line)
    if m.get("dataset"):
        r.wrap(lambda: DATASETS.canonical(m["dataset"]), il.child("dataset").line)
    if m.get("checkpoint") and not Path(m["checkpoint"]).is_file():
        raise r.err(il.child("checkpoint").line, f"{section}: checkpoint not found: {m['checkpoint']}")
    r.wrap(lambda: check_source(m.get("name"), m.get("checkpoint"), m.get("weights"), m.get("model_dir"),
                                m.get("normalize")), il.line)
    return {k: m.get(k) for k in MODEL_KEYS}


def _threats(r: _Reader, t: Any, il: _Loc, section: str) -> List[ThreatModel]:
    """One entry of ``threats``: {norm, eps}, where eps may be a list (an eps sweep)."""
    if not isinstance(t, dict):
        raise r.err(il.line, f"{section} must be a mapping such as {{norm: linf, eps: 8/255}}")
    r.known_keys(t, il, THREAT_KEYS, section)
    if "eps" not in t:
        raise r.err(il.line, f"{section} needs eps")
    norm = r.wrap(lambda: check_norm(t.get("norm", "linf")), il.child("norm").line)
    sweep = isinstance(t["eps"], list)
    values = t["eps"] if sweep else [t["eps"]]
    if not values:
        raise r.err(il.child("eps").line, f"{section}.eps is an empty list")
    out = []
    for j, e in enumerate(values):
        el = il.child("eps").child(j) if sweep else il.child("eps")
        if isinstance(e, bool) or not isinstance(e, (int, float, str)):
            raise r.err(el.line, f"invalid eps {e!r} in {section}: expected a number or a fraction such as 8/255")
        out.append(ThreatModel(norm, r.wrap(lambda: parse_eps(e, norm), el.line)))
    return out


def _attacks(r: _Reader, data: dict, threats: List[ThreatModel], seed: int) -> List[AttackSpec]:
    """The ``attacks`` list as specs, each built with each threat model (bad values fail here)."""
    raw, lines = [], []
    for i, (a, il) in enumerate(r.items(data, "attacks")):
        raw.append(_attack(r, a, il, f"attacks[{i}]"))
        lines.append(il.line)
    specs = r.wrap(lambda: parse_attack_specs(raw), r.loc.child("attacks").line)
    for spec, line in zip(specs, lines):
        for tm in threats:
            r.wrap(lambda: spec.build(tm, seed), line)
    return specs


def _attack(r: _Reader, a: Any, il: _Loc, section: str) -> Dict[str, Any]:
    """One entry of ``attacks``: a name, or a mapping with a name, a label and the attack's settings
    (the engine's, and the attack's own such as APGD's rho, momentum, n_target_classes)."""
    if isinstance(a, str):
        a = {"name": a}
    if not isinstance(a, dict) or "name" not in a:
        raise r.err(il.line, f"{section} must be an attack name or a mapping with a name")
    r.typed(a, il, "name", str, "an attack name", f"{section}.")
    if r.typed(a, il, "label", str, "a string", f"{section}.") is not None and not a["label"].strip():
        raise r.err(il.child("label").line, f"{section}.label must not be empty")
    if a.get("seed") is not None:  # the engine takes any integer; a suite's seeds are the CLI's
        r.wrap(lambda: check_seed(a["seed"], f"{section}.seed"), il.child("seed").line)
    canonical = r.wrap(lambda: attacks.ATTACKS.canonical(str(a["name"])), il.child("name").line)
    allowed = ATTACK_KEYS + attacks.parameters(canonical)
    r.known_keys(a, il, allowed, section)
    return a


MAX_NODES = 100_000  # a suite is a few hundred nodes; aliases that expand to more are a YAML bomb


def _check_tags(node, where: str) -> None:
    """Walk the composed node graph once (aliases make it a graph: a node reached again is not walked
    again): only plain-data tags, no key twice in a mapping, no alias inside its own anchor (a
    cycle: ``&a [*a]``), and at most MAX_NODES nodes counted with aliases expanded (a "billion
    laughs" suite is refused before yaml.safe_load builds it)."""
    size: Dict[int, int] = {}   # id(node) -> its node count with aliases expanded (once walked)
    on_path: set = set()        # ids of the nodes being walked (the current node's ancestors)
    stack: List[Tuple[Any, Optional[list]]] = [(node, None)]
    while stack:
        n, kids = stack.pop()
        if kids is not None:  # all of n's children are walked
            on_path.discard(id(n))
            size[id(n)] = 1 + sum(size[id(c)] for c in kids)
            if size[id(n)] > MAX_NODES:
                raise AdvbenchError(f"{where}: line {n.start_mark.line + 1}: this node expands to more than "
                                    f"{MAX_NODES:,} YAML nodes through aliases: too large for a suite")
            continue
        if id(n) in size:  # reached again through an alias: walked already
            continue
        if id(n) in on_path:
            raise AdvbenchError(f"{where}: line {n.start_mark.line + 1}: recursive alias: the node anchored here "
                                f"contains an alias of itself")
        if n.tag not in _SAFE_TAGS:
            tag = n.tag.replace("tag:yaml.org,2002:", "!!")
            raise AdvbenchError(f"{where}: line {n.start_mark.line + 1}: tag {tag!r} is not allowed: a suite is plain "
                                f"data (read with yaml.safe_load; python tags are refused)")
        kids = []
        if isinstance(n, yaml.MappingNode):
            seen = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in seen:
                        raise AdvbenchError(f"{where}: line {k.start_mark.line + 1}: key {k.value!r} appears twice "
                                            f"(first on line {seen[k.value]})")
                    seen[k.value] = k.start_mark.line + 1
                kids += [k, v]
        elif isinstance(n, yaml.SequenceNode):
            kids = list(n.value)
        on_path.add(id(n))
        stack.append((n, kids))
        stack += [(c, None) for c in reversed(kids)]
