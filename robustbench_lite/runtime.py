"""Device selection, seeding, the fast paths, and what a long run shows while it works (Narrator,
progress displays): run-time helpers shared by training and evaluation."""
from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from .errors import AdvbenchError, SettingError


def resolve_device(device: str = "auto") -> torch.device:
    d = (device or "auto").strip().lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SettingError(f"{{device}} {device}: CUDA is not available on this machine (use cpu or auto)",
                               "device")
        return torch.device(d)
    if d == "cpu":
        return torch.device("cpu")
    raise SettingError(f"invalid {{device}} {device!r}: expected auto, cpu or cuda", "device")


SEED_MAX = 2 ** 32 - 1


def check_seed(seed: int, name: str = "seed") -> int:
    """Seeds are integers in [0, 2**32 - 1] (torch and numpy overflow on larger ones); ``name``: the
    setting that holds it."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise SettingError(f"{{{name}}} must be an integer between 0 and {SEED_MAX} (got {seed!r})", name)
    return seed


def seed_everything(seed: int) -> None:
    check_seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))


def check_positive(name: str, value: Optional[int], minimum: int = 1) -> None:
    """``value`` (None: not given) is at least ``minimum``; a SettingError naming setting ``name`` otherwise."""
    if value is not None and value < minimum:
        raise SettingError(f"{{{name}}} must be >= {minimum} (got {value})", name)


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


AMP_CHOICES = ("bf16",)
AMP_OFF = ("", "none", "off", "false", "fp32")  # the words for "no autocast" (as is None)


def parse_amp(amp: Optional[str]) -> Optional[str]:
    """The one parser of the ``amp`` setting (the CLI's --amp, a suite's or an attack's ``amp``): None
    (float32) or "bf16" (forward passes under torch.autocast in bfloat16)."""
    if amp is None or str(amp).strip().lower() in AMP_OFF:
        return None
    if str(amp).strip().lower() not in AMP_CHOICES:
        raise SettingError(f"invalid {{amp}} {amp!r}: expected bf16 (or leave it out)", "amp")
    return str(amp).strip().lower()


def pct(value, digits: int = 2, unit: str = "%") -> str:
    """A fraction as a percentage for people: ``pct(0.4321)`` -> ``43.21%``; "–" when there is no
    number (None, NaN, or text that is not one). The one percentage format of tables and messages."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(v) else f"{100 * v:.{digits}f}{unit}"


@dataclass(frozen=True)
class FastPaths:
    """The fast paths of a run or a training, each a flag (meant for CUDA, accepted on CPU): ``amp``
    "bf16" (forward passes under torch.autocast in bfloat16; losses and input gradients stay
    float32), ``channels_last`` (NHWC memory format for the model and its inputs) and ``compile``
    (torch.compile, dynamic shapes)."""

    amp: Optional[str] = None
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self):
        object.__setattr__(self, "amp", parse_amp(self.amp))
        for name in ("channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise SettingError(f"{{{name}}} must be true or false (got {getattr(self, name)!r})", name)

    def accelerate(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` on ``device`` in this memory format, compiled when asked (see accelerate)."""
        return accelerate(model, device, channels_last=self.channels_last, compile=self.compile)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the memory format the model expects."""
        return to_memory_format(x, self.channels_last)

    def flags(self) -> List[str]:
        """How the numbers were produced, for the leaderboard's flags column (amp is per attack)."""
        return (["channels_last"] if self.channels_last else []) + (["compile"] if self.compile else [])


def accelerate(model: torch.nn.Module, device: torch.device, channels_last: bool = False,
               compile: bool = False) -> torch.nn.Module:
    """Move ``model`` to ``device`` with the optional fast paths, each a flag:
    channels_last memory format (NHWC convolutions; inputs are converted to match by the callers)
    and torch.compile (dynamic shapes: early stopping shrinks the batch)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = compile_model(model)
    return model


# One model meets several guard sets in a run: grad mode on/off (training vs metrics), input
# requires_grad (attacks), parameters' requires_grad (frozen during attacks), batch sizes 1 and
# >= 2 (the shrinking batch); train-robust with its final evaluation needs 8-9 graphs. Above
# torch's default limit of 8, dynamo silently falls back to eager for the rest.
RECOMPILE_LIMIT = 32


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with dynamic shapes (early stopping shrinks the batch) and room for every
    graph variant a run needs."""
    import torch._dynamo.config as dynamo_config  # heavy, and only for --compile

    for name in ("recompile_limit", "cache_size_limit"):
        if isinstance(getattr(dynamo_config, name, None), int):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    return torch.compile(model, dynamic=True)


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


PROGRESS_INTERVAL = 10.0  # seconds between plain progress lines off a terminal
PROGRESS_INTERVAL_ENV = "ADVBENCH_PROGRESS_INTERVAL"  # overrides it (tests: 0 = a line per update)


def progress_interval() -> float:
    """PROGRESS_INTERVAL, or $ADVBENCH_PROGRESS_INTERVAL (seconds >= 0) when set."""
    raw = os.environ.get(PROGRESS_INTERVAL_ENV, "").strip()
    if not raw:
        return PROGRESS_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise AdvbenchError(f"{PROGRESS_INTERVAL_ENV} must be a number of seconds >= 0 (got {raw!r})")
    return value


class PlainProgress:
    """Progress as plain lines for a log file, CI or a cluster job (stderr is not a terminal):
    ``pgd linf eps=0.3: 512/1000 samples, 41 s, ETA 39 s``, a line per task every ``interval``
    seconds and a last one at its end (tasks shorter than the interval stay silent), written
    straight to the stream (no rich wrapping) and flushed. The same calls as rich's Progress
    (add_task, update, remove_task, a context manager); ``clock`` is time.monotonic."""

    def __init__(self, fields=(), stream=None, interval: float = PROGRESS_INTERVAL, unit: str = "", clock=None):
        self.fields = tuple(fields)
        self.stream = stream
        self.interval = interval
        self.unit = unit
        self.clock = clock or time.monotonic
        self.tasks = {}

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float = 100.0, **fields) -> int:
        task_id = len(self.tasks)
        self.tasks[task_id] = _PlainTask(Text.from_markup(description).plain, float(total), fields, self.clock())
        return task_id

    def update(self, task_id: int, completed: Optional[float] = None, **fields) -> None:
        task = self.tasks[task_id]
        if completed is not None:
            task.completed = float(completed)
        task.fields.update(fields)
        if not task.ended:
            task.ended = task.completed >= task.total
            self._maybe_print(task)

    def remove_task(self, task_id: int) -> None:
        task = self.tasks.pop(task_id)
        if not task.ended:
            task.ended = True
            self._maybe_print(task)

    def _maybe_print(self, task: "_PlainTask") -> None:
        now = self.clock()
        if task.ended:  # the last line, unless the whole task was shorter than the interval
            due = now - task.started >= self.interval
        else:
            due = now - task.printed >= self.interval
        if due:
            task.printed = now
            self._write(task.line(now, self.fields, self.unit))

    def _write(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()


class _PlainTask:
    """One task of PlainProgress (``fields`` as rich's ``task.fields``)."""

    def __init__(self, description: str, total: float, fields, now: float):
        self.description = description
        self.total = total
        self.fields = dict(fields)
        self.completed = 0.0
        self.started = self.printed = now
        self.ended = False

    def line(self, now: float, fields, unit: str) -> str:
        elapsed = now - self.started
        parts = [f"{self.completed:.0f}/{self.total:.0f}" + (f" {unit}" if unit else "")]
        parts += [f.format(task=self) for f in fields] + [f"{elapsed:.0f} s"]
        if 0 < self.completed < self.total:
            parts.append(f"ETA {elapsed / self.completed * (self.total - self.completed):.0f} s")
        return f"{self.description}: {', '.join(parts)}"


def progress_bar(*fields: str, console=None, quiet: bool = False, unit: str = ""):
    """The one progress display: description, bar, done/total, extra ``fields`` (rich format
    strings over task fields), elapsed time and ETA; on stderr, transient; off when quiet. When
    stderr is not a terminal (a log file, CI, a cluster job) it is PlainProgress instead: a plain
    line per task every PROGRESS_INTERVAL seconds and at the task's end."""
    console = console or Console(stderr=True)
    if not quiet and not console.is_terminal:
        return PlainProgress(fields, stream=console.file, interval=progress_interval(), unit=unit)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *[TextColumn(f) for f in fields], TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, transient=True, disable=quiet)


class Narrator:
    """What a long library call (a run, a training, the zoo) tells its user while it works: lines
    (``say``), warnings about the results (``warn``, beside the lines), notices on stderr that
    must not mix with a table or JSON on stdout (``notice``) and progress displays (``progress``,
    on stderr). The CLI builds one per command from its consoles and its flag names (``setting``:
    how the user sets a parameter; ``help_hint``: where the settings are documented); library code
    prints nothing else. ``Narrator()`` shows progress and notices on stderr and no lines; ``SILENT`` shows nothing;
    ``quieter(flag)`` is a copy that is silent when ``flag`` (e.g. a DDP rank other than 0)."""

    def __init__(self, out: Optional[Console] = None, err: Optional[Console] = None, quiet: bool = False,
                 show: Callable[[str], str] = str, help_hint: str = "see robustbench_lite.runs.RunSpec"):
        self.out = out
        self.err = err
        self.quiet = quiet
        self.show = show
        self.help_hint = help_hint

    def quieter(self, quiet: bool = True) -> "Narrator":
        return Narrator(self.out, self.err, self.quiet or quiet, self.show, self.help_hint)

    def setting(self, name: str) -> str:
        """How this narrator's user sets the library parameter ``name`` (the CLI: its flag)."""
        return self.show(name)

    def say(self, text: str, style: Optional[str] = None) -> None:
        if self.out is not None and not self.quiet:
            self.out.print(text, style=style, markup=False, highlight=False)

    def warn(self, text: str) -> None:
        if self.out is not None and not self.quiet:
            self.out.print(f"[yellow]warning: {escape(text)}[/yellow]", highlight=False)

    def notice(self, text: str) -> None:
        if not self.quiet:
            (self.err or Console(stderr=True)).print(text, markup=False, highlight=False, soft_wrap=True)

    def progress(self, *fields: str, unit: str = ""):
        """The one progress display (progress_bar) on this narrator's stderr."""
        return progress_bar(*fields, console=self.err, quiet=self.quiet, unit=unit)


SILENT = Narrator(quiet=True)


class AttackBars:
    """The evaluator's ``on_progress(threat, label, done, total)`` on a progress display: one bar (or
    plain line) per (threat model, attack), moved per attack step."""

    def __init__(self, progress):
        self.progress = progress
        self.tasks = {}

    def __call__(self, threat, label: str, done: float, total: int) -> None:
        key = (threat, label)
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(escape(f"{label} {threat}"), total=max(total, 1))
        self.progress.update(self.tasks[key], completed=done if total else 1)
