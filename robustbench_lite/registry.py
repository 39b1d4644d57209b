"""One generic name -> factory registry, used for models, datasets, attacks, activations and
defense methods.

Each registry lives in the module that defines its built-in entries (models.MODELS, data.DATASETS,
attacks.engine.ATTACKS, attacks.losses.LOSSES, defenses.activations.ACTIVATIONS,
defenses.methods.METHODS), so the built-ins are there once that module is imported. A registry may
also name an entry-point group, imported on the first lookup, through which third-party packages
add names: e.g. ``[project.entry-points."advbench.attacks"] mine = "mypkg.attacks"``.
"""
from __future__ import annotations

import difflib
import warnings
from importlib import metadata
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from .errors import AdvbenchError, UnknownNameError


def suggest(word: str, choices: Iterable[str], n: int = 1, cutoff: float = 0.6,
            show: Callable[[str], str] = repr) -> str:
    """The one near-miss hint of the project: ``did you mean 'pgd'?`` (up to ``n`` close matches of
    ``word`` among ``choices``, joined by "or", each through ``show``), or "" when none is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=n, cutoff=cutoff)
    return f"did you mean {' or '.join(show(c) for c in close)}?" if close else ""


class Registry:
    def __init__(self, kind: str, entry_point_group: Optional[str] = None):
        self.kind = kind
        self._factories: Dict[str, Callable[..., Any]] = {}
        self._help: Dict[str, str] = {}
        self._aliases: Dict[str, str] = {}
        self._entry_point_group = entry_point_group
        self._loaded = False
        self._prefixes: List[Tuple[str, Callable[..., Any], str]] = []

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str, factory: Optional[Callable[..., Any]] = None, *, aliases: Iterable[str] = (),
                 help: str = ""):
        """Register ``factory`` under ``name``; usable as ``@registry.register("name")``."""

        def deco(f: Callable[..., Any]) -> Callable[..., Any]:
            key = name.lower()
            if key in self._factories and self._factories[key] is not f:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[key] = f
            doc = help or (f.__doc__ or "").strip().splitlines()[0:1]
            self._help[key] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            for a in aliases:
                self._aliases[a.lower()] = key
            return f

        return deco(factory) if factory is not None else deco

    def register_prefix(self, prefix: str, factory: Callable[..., Any], placeholder: str = "NAME") -> None:
        """Names ``prefix + rest`` go to ``factory(rest, **kwargs)`` (e.g. ``tv:resnet50``, ``npz:PATH``)."""
        self._prefixes.append((prefix.lower(), factory, placeholder))

    # -- lookup -------------------------------------------------------------------------------
    def _load_plugins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self._entry_point_group:
            for ep in metadata.entry_points(group=self._entry_point_group):
                try:
                    ep.load()
                except Exception as exc:  # a broken third-party plugin must not break the tool
                    warnings.warn(f"advbench: could not load plugin {ep.name!r} ({ep.value}): {exc}")

    def canonical(self, name: str) -> str:
        self._load_plugins()
        key = name.strip().lower()
        key = self._aliases.get(key, key)
        if key in self._factories:
            return key
        for prefix, _, _ in self._prefixes:
            if key.startswith(prefix):
                return name.strip()
        choices = self.names()
        close = suggest(key, choices, n=3, cutoff=0.5)
        hint = f"; {close}" if close else ""
        extra = "".join(f", {p}{ph}" for p, _, ph in self._prefixes)
        raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(choices)}{extra})")

    def get(self, name: str) -> Callable[..., Any]:
        key = self.canonical(name)
        if key in self._factories:
            return self._factories[key]
        for prefix, factory, _ in self._prefixes:
            if key.lower().startswith(prefix):
                rest = key[len(prefix):]
                if not rest:
                    raise AdvbenchError(f"{self.kind} {name!r} needs something after {prefix!r}")
                return lambda *a, _f=factory, _r=rest, **kw: _f(_r, *a, **kw)
        raise AssertionError("unreachable")

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> List[str]:
        self._load_plugins()
        return sorted(self._factories)

    def describe(self) -> List[Tuple[str, str]]:
        rows = [(n, self._help.get(n, "")) for n in self.names()]
        return rows + [(f"{p}{ph}", (f.__doc__ or "").strip().split("\n")[0]) for p, f, ph in self._prefixes]

    def __contains__(self, name: str) -> bool:
        try:
            self.canonical(name)
            return True
        except UnknownNameError:
            return False

