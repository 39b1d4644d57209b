"""Device selection, seeding and small run-time helpers shared by training and evaluation."""
from __future__ import annotations

import os
import random
from typing import Optional

import torch

from .errors import AdvbenchError


def resolve_device(device: str = "auto") -> torch.device:
    d = (device or "auto").strip().lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AdvbenchError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
        return torch.device(d)
    if d == "cpu":
        return torch.device("cpu")
    raise AdvbenchError(f"invalid --device {device!r}: expected auto, cpu or cuda")


SEED_MAX = 2 ** 32 - 1


def check_seed(seed: int, name: str = "--seed") -> int:
    """Seeds are integers in [0, 2**32 - 1] (torch and numpy overflow on larger ones)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise AdvbenchError(f"{name} must be an integer between 0 and {SEED_MAX} (got {seed!r})")
    return seed


def seed_everything(seed: int) -> None:
    check_seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2 ** 32))
    except ImportError:  # pragma: no cover
        pass


def check_positive(name: str, value: Optional[int], minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise AdvbenchError(f"{name} must be >= {minimum} (got {value})")


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


AMP_CHOICES = ("bf16",)


def check_amp(amp: Optional[str]) -> Optional[str]:
    if amp in (None, "", "none", "off"):
        return None
    if str(amp).lower() not in AMP_CHOICES:
        raise AdvbenchError(f"invalid --amp {amp!r}: expected bf16 (or leave it out)")
    return str(amp).lower()


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
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if isinstance(getattr(dynamo_config, name, None), int):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    return torch.compile(model, dynamic=True)


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def progress_bar(*fields: str, console=None, quiet: bool = False):
    """The one progress display: description, bar, done/total, extra ``fields`` (rich format
    strings over task fields), elapsed time; on stderr, transient, and off when quiet or when
    stderr is not a terminal (a finished live display would still leave an empty line in logs)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *[TextColumn(f) for f in fields], TimeElapsedColumn(),
                    console=console, transient=True, disable=quiet or not console.is_terminal)
