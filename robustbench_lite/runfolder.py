"""A run folder's life cycle, and resuming interrupted runs and suites.

``<results>/runs/<run_id>/`` is created when the evaluation starts:

    config.yaml    the run's configuration, written first
    state.json     {"status": "running"} while the run is unfinished
    batches/       one file per finished (threat, attack, batch) (evaluator.Journal)

and when the run is recorded, summary.json and outcomes.csv are added (config.yaml rewritten with
the final flags), its rows go to the leaderboard, then state.json and batches/ are removed. A run
is complete when the leaderboard holds its rows (the record is all or nothing); any other run
folder is unfinished and can be resumed (`advbench attack ... --resume RUN_ID`): the stored
configuration must match the command's (RESUME_KEYS), the saved batches are loaded, the others
attacked, and the run is recorded as an uninterrupted one would be.

Suites (`advbench run SUITE --resume`): each run of a suite stores ``suite_entry`` in its
config.yaml: the suite file's identity (resolved path and content hash, so an edited suite starts
afresh) and the model's position; the newest run with that entry is the model's run.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import yaml

from . import leaderboard
from .errors import AdvbenchError, SettingError
from .evaluator import Journal
from .fileio import atomic_write_text
from .leaderboard import jsonable
from .specs import PER_ATTACK

STATE_NAME = "state.json"
CONFIG_NAME = "config.yaml"
BATCHES_NAME = "batches"
# what must be equal for a resumed run to give the uninterrupted run's numbers
RESUME_KEYS = ("model", "checkpoint_sha256", "dataset", "dataset_sha256", "split", "n_examples", "seed",
               "batch_size", "mode", "threats", "attacks")
OLD_CONFIG = {"mode": PER_ATTACK}  # what a run folder written before a key existed did


class RunInterrupted(KeyboardInterrupt):
    """An evaluation stopped by Ctrl-C or SIGTERM (the cause): what of it was saved (``exact``
    False: ``total`` is an upper bound, a cascade's later attacks may need fewer batches)."""

    def __init__(self, run_id: str, saved: int, total: Optional[int], exact: bool = True):
        super().__init__(run_id)
        self.run_id, self.saved, self.total, self.exact = run_id, saved, total, exact

    def kept(self) -> str:
        if self.total is None:
            return f"run {self.run_id} has no saved batches"
        return f"{self.saved} of {'' if self.exact else 'at most '}{self.total} batches of run {self.run_id} are saved"


def _plain(obj: Any) -> Any:
    """``obj`` as config.yaml stores it (so that a stored and a fresh configuration compare)."""
    return yaml.safe_load(yaml.safe_dump(jsonable(obj), sort_keys=False))


def first_difference(a: Any, b: Any, path: str) -> Optional[str]:
    """The dotted path of the first place where ``a`` and ``b`` differ (None if equal)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in list(a) + [k for k in b if k not in a]:
            d = first_difference(a.get(k), b.get(k), f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else path


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _lookup(obj: Any, path: str) -> Any:
    for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        if obj is None:
            return None
        obj = obj.get(name) if name else (obj[int(index)] if int(index) < len(obj) else None)
    return obj


def run_ids(results_dir) -> List[str]:
    """The ids of the run folders under ``<results>/runs``, oldest first (run ids sort by time)."""
    runs = Path(results_dir) / "runs"
    return sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []


def matching_run_ids(results_dir, prefix: str) -> List[str]:
    """``[prefix]`` when it is a run id, else the run ids that start with it (none for an empty one)."""
    known = run_ids(results_dir)
    prefix = str(prefix).strip()
    return [k for k in known if k == prefix] or [k for k in known if prefix and k.startswith(prefix)]


@dataclass
class RunFolder:
    """``<results>/runs/<run_id>/`` (see the module docstring)."""

    results_dir: Path
    run_id: str
    path: Path

    @classmethod
    def create(cls, results_dir, config: Dict[str, Any]) -> "RunFolder":
        """A fresh run folder with config.yaml (its ``run_id`` filled in) and state running."""
        run_id, path = leaderboard.create_run_dir(results_dir)
        folder = cls(Path(results_dir), run_id, path)
        config["run_id"] = run_id
        folder.write_config(config)
        folder._write_state("running")
        return folder

    @classmethod
    def find(cls, results_dir, prefix: str) -> "RunFolder":
        """The run whose id is ``prefix`` or starts with it (unique); an AdvbenchError otherwise."""
        runs = Path(results_dir) / "runs"
        prefix = str(prefix).strip()
        matches = matching_run_ids(results_dir, prefix)
        if not matches:
            raise SettingError(f"{{resume}} {prefix}: no run {prefix!r} in {runs}", "resume")
        if len(matches) > 1:
            raise SettingError(f"{{resume}} {prefix} is ambiguous: it matches {len(matches)} runs in {runs} "
                               f"({', '.join(matches[:6])}{', ...' if len(matches) > 6 else ''})", "resume")
        return cls(Path(results_dir), matches[0], runs / matches[0])

    def is_complete(self) -> bool:
        return self.run_id in set(leaderboard.read(self.results_dir)["run_id"])

    def check_resumable(self) -> None:
        if self.is_complete():
            raise AdvbenchError(f"run {self.run_id} is complete (its results are in the leaderboard): nothing to "
                                f"resume")
        if not (self.path / CONFIG_NAME).is_file():
            raise AdvbenchError(f"run {self.run_id} has no {CONFIG_NAME}: it cannot be resumed")

    def stored_config(self) -> Dict[str, Any]:
        p = self.path / CONFIG_NAME
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise AdvbenchError(f"cannot read {p}: {' '.join(str(exc).split())}") from None
        if not isinstance(data, dict):
            raise AdvbenchError(f"{p} is not a run configuration")
        return data

    def check_config(self, config: Mapping[str, Any]) -> None:
        """The command's configuration must match the stored one on RESUME_KEYS; the error names
        the first key that differs."""
        stored = self.stored_config()
        mine = _plain({k: config.get(k) for k in RESUME_KEYS})
        theirs = {k: stored.get(k, OLD_CONFIG.get(k)) for k in RESUME_KEYS}
        diff = first_difference(mine, theirs, "")
        if diff:
            key = diff.lstrip(".")
            raise AdvbenchError(f"cannot resume run {self.run_id}: {key} is {_short(_lookup(theirs, diff))} in the "
                                f"run but {_short(_lookup(mine, diff))} in this command (resume with the run's "
                                f"options, see {self.path / CONFIG_NAME})")

    def write_config(self, config: Mapping[str, Any]) -> None:
        try:
            atomic_write_text(self.path / CONFIG_NAME, yaml.safe_dump(jsonable(config), sort_keys=False))
        except OSError as exc:
            raise AdvbenchError(f"cannot write run files in {self.path}: {exc.strerror or exc}") from None

    def _write_state(self, status: str) -> None:
        try:
            atomic_write_text(self.path / STATE_NAME, json.dumps({"status": status, "run_id": self.run_id}) + "\n")
        except OSError as exc:
            raise AdvbenchError(f"cannot write run files in {self.path}: {exc.strerror or exc}") from None

    def journal(self) -> Journal:
        return Journal(self.path / BATCHES_NAME)

    def finish(self) -> None:
        """The run is recorded: drop what only resuming needed."""
        shutil.rmtree(self.path / BATCHES_NAME, ignore_errors=True)
        (self.path / STATE_NAME).unlink(missing_ok=True)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# --- suites ----------------------------------------------------------------------------------------
def suite_key(suite_path) -> str:
    """A suite file's identity: its resolved path and content (an edited suite starts afresh)."""
    p = Path(suite_path).resolve()
    try:
        content = p.read_bytes()
    except OSError as exc:
        raise AdvbenchError(f"cannot read suite {p}: {exc.strerror or exc}") from None
    return hashlib.sha256(str(p).encode() + b"\0" + content).hexdigest()[:16]


def latest_suite_run(results_dir, entry: str) -> Optional[RunFolder]:
    """The newest run folder whose config.yaml has ``suite_entry: entry`` (None if there is none)."""
    for run_id in reversed(run_ids(results_dir)):  # newest first
        p = Path(results_dir) / "runs" / run_id
        folder = RunFolder(Path(results_dir), run_id, p)
        try:
            if (p / CONFIG_NAME).is_file() and folder.stored_config().get("suite_entry") == entry:
                return folder
        except AdvbenchError:
            continue  # not a run folder of ours
    return None
