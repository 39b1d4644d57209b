"""The one error type the command line turns into "error: ..." on stderr and exit code 2.

Anything a user can get wrong (a name, an eps, a path, a checkpoint) raises AdvbenchError with a
message that names the problem. Everything else is a bug and keeps its traceback.

A bad value of a setting raises SettingError, whose message names the setting the way the caller
knows it: the library and its Python users see the parameter (``epochs must be >= 1 (got 0)``);
the command line renders the same error with its flag (``--epochs must be >= 1 (got 0)``). Only
robustbench_lite.cli knows flag names.
"""
from __future__ import annotations

from typing import Callable, Optional


class AdvbenchError(Exception):
    """Bad input or an unusable file: reported as one line, exit code 2."""


def first_line(exc: BaseException, limit: Optional[int] = None) -> str:
    """The first line of ``exc``'s message (its type's name when it has none), for an error line
    that reports it; cut to ``limit`` characters when given."""
    line = (str(exc).strip().splitlines() or [""])[0] or type(exc).__name__
    return line if limit is None or len(line) <= limit else line[:limit - 3] + "..."


class UnknownNameError(AdvbenchError, KeyError):
    """A registry lookup for a name nobody registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SettingError(AdvbenchError):
    """A bad value of one or more named settings.

    ``template`` names each setting as ``{name}``: ``SettingError("{epochs} must be >= 1 (got 0)",
    "epochs")`` (only those placeholders are replaced; any other text, braces included, is shown as
    it is). ``str()`` shows the parameter names; ``render(show)`` shows ``show(name)`` instead (the
    CLI passes its flag lookup)."""

    def __init__(self, template: str, *settings: str):
        self.template = template
        self.settings = settings
        super().__init__(self.render())

    def render(self, show: Callable[[str], str] = str) -> str:
        text = self.template
        for s in self.settings:
            text = text.replace("{" + s + "}", show(s))
        return text

    def __str__(self) -> str:
        return self.render()
