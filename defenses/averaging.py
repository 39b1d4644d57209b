"""Weight averaging for training: SWA and EMA.

- SWA — Izmailov, Podoprikhin, Garipov, Vetrov & Wilson, "Averaging Weights Leads to Wider Optima
  and Better Generalization" (UAI 2018): the equal-weight running mean of the weights visited from
  epoch ``swa_start`` on (here: after every optimisation step of those epochs). BatchNorm running
  statistics of the averaged weights are not the average of the running statistics, so they are
  recomputed with one pass over the training data (train-mode forward, cumulative moving average)
  whenever the averaged model is materialised. In adversarial training SWA curbs robust
  overfitting (Chen et al., ICLR 2021; Rebuffi et al. 2021).
- EMA — an exponential moving average of the weights (and of floating-point buffers such as
  BatchNorm statistics) with decay ``decay``, warmed up as min(decay, (1 + t) / (10 + t)) so that
  short runs are not dominated by the random initialisation.

Both implement the protocol the training loop (robustbench_lite.training) calls:

    averager.update(model, epoch, step)          after every optimiser step
    averager.averaged_model(model, x_train)      the model to evaluate / ship (or ``model`` itself
                                                 while nothing has been averaged yet)
    averager.state_dict() / load_state_dict(state, model)     exact resume
    averager.config()                            recorded in checkpoints

The raw (un-averaged) weights keep training; the averaged copy is a separate module.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, Optional

import torch
from torch import nn

from attacks.engine import attack_mode
from robustbench_lite.errors import SettingError


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> None:
    """Reset every BatchNorm layer's running statistics and recompute them on ``x`` as the exact
    average over the data (momentum=None), in train mode (attack_mode); restores modes and momenta
    after."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(x) == 0:
        return
    momenta = [(m, m.momentum) for m in bns]
    device = next(model.parameters()).device
    with attack_mode(model, "train"):
        try:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average: the plain mean over all batches
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size].to(device))
        finally:
            for m, mom in momenta:
                m.momentum = mom


class WeightAverager:
    """Shared machinery: a shadow copy of the model holding the averaged state."""

    kind = "none"

    def __init__(self):
        self.n_averaged = 0
        self._avg: Optional[Dict[str, torch.Tensor]] = None  # name -> averaged tensor
        self._shadow: Optional[nn.Module] = None

    # -- protocol ------------------------------------------------------------------------------
    def active(self, epoch: int) -> bool:
        return True

    def update(self, model: nn.Module, epoch: int, step: int) -> None:
        if not self.active(epoch):
            return
        with torch.no_grad():
            state = model.state_dict()
            if self._avg is None:
                self._avg = {k: v.detach().clone() for k, v in state.items() if self._tracked(k, v)}
            else:
                self._accumulate(state)
        self.n_averaged += 1

    def averaged_model(self, model: nn.Module, x_train: Optional[torch.Tensor] = None) -> nn.Module:
        """The model with averaged weights (a separate module); ``model`` itself before anything
        was averaged."""
        if self._avg is None:
            return model
        if self._shadow is None or not _same_structure(self._shadow, model):
            self._shadow = copy.deepcopy(model)
        shadow = self._shadow
        with torch.no_grad():
            own = shadow.state_dict()
            for k, v in model.state_dict().items():  # untracked entries follow the live model
                own[k].copy_(self._avg[k] if k in self._avg else v)
        self._finish(shadow, x_train)
        shadow.train(model.training)
        for p in shadow.parameters():
            p.requires_grad_(False)
        return shadow

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "n_averaged": self.n_averaged,
                "avg": None if self._avg is None else {k: v.detach().cpu().clone() for k, v in self._avg.items()}}

    def load_state_dict(self, state: Dict[str, Any], model: nn.Module) -> None:
        if state.get("kind") != self.kind:
            raise SettingError(f"{{resume}}: the checkpoint's weight averaging is {state.get('kind')!r}, "
                               f"this run asks for {self.kind!r}", "resume")
        self.n_averaged = int(state.get("n_averaged", 0))
        avg = state.get("avg")
        if avg is None:
            self._avg = None
            return
        own = model.state_dict()
        bad = [k for k in avg if k not in own or tuple(own[k].shape) != tuple(avg[k].shape)]
        if bad:
            raise SettingError(f"{{resume}}: the averaged weights do not match the model "
                               f"({', '.join(bad[:3])})", "resume")
        self._avg = {k: v.to(own[k].device, own[k].dtype).clone() for k, v in avg.items()}
        self._shadow = None

    def config(self) -> Dict[str, Any]:
        return {"averaging": self.kind}

    # -- per kind --------------------------------------------------------------------------------
    def _tracked(self, key: str, value: torch.Tensor) -> bool:
        raise NotImplementedError

    def _accumulate(self, state: Dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _finish(self, shadow: nn.Module, x_train: Optional[torch.Tensor]) -> None:
        pass


def _same_structure(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and sa[k].device == sb[k].device for k in sa)


class SWA(WeightAverager):
    """Stochastic Weight Averaging from epoch ``start`` on (Izmailov et al. 2018)."""

    kind = "swa"

    def __init__(self, start: int, bn_batch_size: int = 256):
        super().__init__()
        if isinstance(start, bool) or int(start) != start or start < 1:
            raise SettingError(f"{{swa_start}} must be an epoch number >= 1 (got {start})", "swa_start")
        self.start = int(start)
        self.bn_batch_size = bn_batch_size

    def active(self, epoch: int) -> bool:
        return epoch >= self.start

    def _tracked(self, key, value):
        # parameters (floating point, not BatchNorm statistics: those are recomputed)
        return value.is_floating_point() and not _is_bn_stat(key)

    def _accumulate(self, state):
        n = self.n_averaged  # running mean: avg += (w - avg) / (n + 1)
        for k, a in self._avg.items():
            a.add_(state[k].detach().to(a.dtype) - a, alpha=1.0 / (n + 1))

    def _finish(self, shadow, x_train):
        if x_train is not None and _has_batchnorm(shadow):
            recompute_batchnorm(shadow, x_train, self.bn_batch_size)

    def config(self):
        return {"averaging": "swa", "swa_start": self.start}


class EMA(WeightAverager):
    """Exponential moving average of the weights and floating-point buffers."""

    kind = "ema"

    def __init__(self, decay: float, warmup: bool = True):
        super().__init__()
        if not (isinstance(decay, (int, float)) and math.isfinite(decay) and 0 < decay < 1):
            raise SettingError(f"{{ema}} must be a decay in (0, 1), e.g. 0.999 (got {decay})", "ema")
        self.decay = float(decay)
        self.warmup = warmup

    def current_decay(self) -> float:
        t = self.n_averaged
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    def _tracked(self, key, value):
        return value.is_floating_point()

    def _accumulate(self, state):
        d = self.current_decay()
        for k, a in self._avg.items():
            a.mul_(d).add_(state[k].detach().to(a.dtype), alpha=1.0 - d)

    def config(self):
        return {"averaging": "ema", "ema_decay": self.decay}


def _is_bn_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def create_averager(swa_start: Optional[int] = None, ema: Optional[float] = None) -> Optional[WeightAverager]:
    """The averager for a training's ``swa_start`` / ``ema`` settings (None when neither is given)."""
    if swa_start is not None and ema is not None:
        raise SettingError("{swa_start} and {ema} are two kinds of weight averaging: choose one", "swa_start", "ema")
    if swa_start is not None:
        return SWA(swa_start)
    if ema is not None:
        return EMA(ema)
    return None
