"""Activations, registered by name so any model can be built with any of them.

Smooth Adversarial Training (Xie et al., 2020): ReLU's gradient is discontinuous at 0, which
weakens the inner maximisation of adversarial training; smooth activations improve robustness at
no accuracy cost. Each activation here carries its derivative in closed form (`derivative`), used
by the "smooth backward" variant: ReLU in the forward pass, a smooth function's derivative in the
backward pass (`--smooth-backward NAME`).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustbench_lite.errors import AdvbenchError
from robustbench_lite.registry import Registry

# Activations by name; models (robustbench_lite.models) build any architecture with any of them.
ACTIVATIONS = Registry("activation", entry_point_group="advbench.defenses")


class Activation(nn.Module):
    """Base: forward(x) and its derivative in closed form."""

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ReLU(Activation):
    def forward(self, x):
        return F.relu(x)

    def derivative(self, x):
        return (x > 0).to(x.dtype)


@ACTIVATIONS.register("softplus", help="parametric Softplus log(1+exp(alpha x))/alpha, alpha=10")
class Softplus(Activation):
    def __init__(self, alpha: float = 10.0):
        super().__init__()
        if not alpha > 0:
            raise AdvbenchError(f"softplus alpha must be > 0 (got {alpha})")
        self.alpha = float(alpha)

    def forward(self, x):
        # threshold 40 (not PyTorch's 20): beyond it log(1+exp(t))/alpha == x and sigmoid(t) == 1
        # to float64 precision, so values and gradients follow the formula exactly in float64 too;
        # exp(40) is still far from overflowing float32.
        return F.softplus(x, beta=self.alpha, threshold=40.0)

    def derivative(self, x):
        return torch.sigmoid(self.alpha * x)

    def extra_repr(self):
        return f"alpha={self.alpha:g}"


@ACTIVATIONS.register("silu", aliases=("swish",), help="x * sigmoid(x)")
class SiLU(Activation):
    def forward(self, x):
        return F.silu(x)

    def derivative(self, x):
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))


@ACTIVATIONS.register("gelu", help="x * Phi(x) (exact, erf form)")
class GELU(Activation):
    def forward(self, x):
        return F.gelu(x)

    def derivative(self, x):
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return cdf + x * pdf


@ACTIVATIONS.register("elu", help="x for x>0, exp(x)-1 otherwise")
class ELU(Activation):
    def forward(self, x):
        return F.elu(x)

    def derivative(self, x):
        return torch.where(x > 0, torch.ones_like(x), torch.exp(x.clamp_max(0)))


@ACTIVATIONS.register("smoothrelu", help="x - log(1+alpha x)/alpha for x>=0, 0 otherwise; alpha=10")
class SmoothReLU(Activation):
    """SmoothReLU (Xie et al.): continuous derivative alpha x / (1 + alpha x) for x >= 0, 0 below."""

    def __init__(self, alpha: float = 10.0):
        super().__init__()
        if not alpha > 0:
            raise AdvbenchError(f"smoothrelu alpha must be > 0 (got {alpha})")
        self.alpha = float(alpha)

    def forward(self, x):
        xp = x.clamp_min(0)  # below 0 both terms vanish, and so does the gradient
        return xp - torch.log1p(self.alpha * xp) / self.alpha

    def derivative(self, x):
        xp = x.clamp_min(0)
        return self.alpha * xp / (1 + self.alpha * xp)

    def extra_repr(self):
        return f"alpha={self.alpha:g}"


class _ReLUSmoothGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, derivative: Callable[[torch.Tensor], torch.Tensor]):
        ctx.save_for_backward(x)
        ctx.derivative = derivative
        return F.relu(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return grad_out * ctx.derivative(x), None


class SmoothBackwardReLU(Activation):
    """ReLU in the forward pass; the backward pass uses another activation's derivative."""

    def __init__(self, backward: str):
        super().__init__()
        self.backward_name = ACTIVATIONS.canonical(backward)
        self.smooth = ACTIVATIONS.create(self.backward_name)

    def forward(self, x):
        return _ReLUSmoothGrad.apply(x, self.smooth.derivative)

    def derivative(self, x):
        return self.smooth.derivative(x)

    def extra_repr(self):
        return f"backward={self.backward_name}"


@ACTIVATIONS.register("relu", help="max(0, x); with smooth_backward=NAME, NAME's derivative in the backward pass")
def relu(smooth_backward: Optional[str] = None) -> Activation:
    return SmoothBackwardReLU(smooth_backward) if smooth_backward else ReLU()
