"""Training methods: what one training step minimises.

A method is called as ``method.loss(model, x, y, ids, epoch) -> StepOutput`` by the shared
training loop (robustbench_lite.training), which owns batching, optimisation, checkpoints and
metrics. ``config()`` is recorded in checkpoints and the leaderboard.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from . import METHODS


@dataclass
class StepOutput:
    loss: torch.Tensor                 # scalar to minimise (mean over the batch)
    logits: torch.Tensor               # logits on the clean input (for clean accuracy)
    adv_logits: Optional[torch.Tensor] = None  # logits on the adversarial input, if any
    stats: Dict[str, float] = field(default_factory=dict)


class TrainingMethod:
    name = "base"
    adversarial = False

    def config(self) -> Dict[str, Any]:
        return {"method": self.name}

    def loss(self, model, x, y, ids, epoch) -> StepOutput:
        raise NotImplementedError


@METHODS.register("standard", help="plain cross-entropy training (no defense)")
class Standard(TrainingMethod):
    name = "standard"

    def loss(self, model, x, y, ids, epoch):
        logits = model(x)
        return StepOutput(F.cross_entropy(logits, y), logits)
