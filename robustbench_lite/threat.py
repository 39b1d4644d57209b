"""Threat models: eps parsing and the per-norm geometry every attack and defense uses.

Images live in [0, 1] and eps is in pixel units. A threat model is (norm, eps) with norm in
{linf, l2}. The geometry of each norm lives here and only here: the steepest-ascent step, the
projection onto the eps-ball, a uniform random point in the ball, and the per-sample norm.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import rng
from .errors import AdvbenchError, SettingError

NORMS = ("linf", "l2")
TOLERANCE = 1e-6  # ||x_adv - x|| <= eps + TOLERANCE * max(1, eps) is what every attack must satisfy
# (relative for eps > 1: a float32 L2 norm of a projected perturbation is only exact to ~1e-7 * eps)
_EPS_HINT = "expected a non-negative number or fraction such as 8/255, 0.03 or .5"
# what an eps (or each side of its fraction) may look like: ASCII digits only (float() would also take
# '0.0_3' and non-ASCII digits such as '٠.٣'), or nan / inf (refused below as not finite)
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)

# Typical budgets, the one table of them: (lowest, highest) per kind of image and norm. Grey-scale
# 28x28 (MNIST-like): L-inf 0.1-0.4 (Madry et al.: 0.3), L2 1.5-3; colour (CIFAR, ImageNet): L-inf
# 2/255-16/255 (8/255, 4/255), L2 0.25-1 (RobustBench: 0.5 on CIFAR). Outside them a run is flagged.
TYPICAL_EPS: Dict[Tuple[str, str], Tuple[float, float]] = {
    ("grey", "linf"): (0.1, 0.4), ("grey", "l2"): (1.5, 3.0),
    ("colour", "linf"): (2 / 255, 16 / 255), ("colour", "l2"): (0.25, 1.0),
}


_TYPICAL_EXAMPLES = {("grey", "linf"): "0.3 for MNIST, Madry et al.", ("grey", "l2"): "2 for MNIST",
                     ("colour", "linf"): "8/255 or 4/255 for CIFAR and ImageNet",
                     ("colour", "l2"): "0.5 for CIFAR, as RobustBench"}


def _number(part: str) -> float:
    """One ASCII number (a ValueError otherwise); a non-zero number written so small that it
    underflows to 0.0 (1e-400) is an AdvbenchError, not a silent eps of 0."""
    part = part.strip()
    if _NON_FINITE.fullmatch(part):
        return float(part)
    if not _NUMBER.fullmatch(part):
        raise ValueError(part)
    value = float(part)
    if value == 0 and any(c in "123456789" for c in re.split("[eE]", part)[0]):
        raise OverflowError(part)
    return value


def parse_eps(text: Union[str, float, int], norm: Optional[str] = None, setting: Optional[str] = None) -> float:
    """Parse an eps written as a number or a fraction: ``8/255``, ``0.3``, ``.5``.

    The one parser of the project; every error is an AdvbenchError naming the bad text. ``setting``
    names a setting in the same units that is not an eps (e.g. ``alpha``, a step size): its errors
    are then SettingErrors naming that parameter."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        shown = repr(text) if len(repr(text)) <= 40 else repr(text)[:37] + "..."
    else:
        shown = repr(str(text))

    def bad(why: str) -> AdvbenchError:
        if setting is None:
            return AdvbenchError(f"invalid eps {shown}: {why}")
        return SettingError(f"invalid {{{setting}}} {shown}: {why}", setting)

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        try:
            value = float(text)
        except OverflowError:  # an int too large for a float (e.g. a 400-digit YAML integer)
            raise bad("must be a finite number") from None
    else:
        s = str(text).strip()
        if not s:
            raise bad(f"empty; {_EPS_HINT}")
        try:
            if "/" in s:
                num, den = s.split("/", 1)
                fnum, fden = _number(num), _number(den)
                if fden == 0:
                    raise bad("division by zero")
                value = fnum / fden
                if value == 0 and fnum != 0:
                    raise OverflowError(s)
            else:
                value = _number(s)
        except ValueError:
            raise bad(_EPS_HINT) from None
        except OverflowError:
            raise bad("too small for a float64, it would become 0 (write 0 for no perturbation)") from None
    if math.isnan(value) or math.isinf(value):
        raise bad("must be a finite number")
    if value < 0:
        raise bad("must be >= 0")
    if norm is not None:
        norm = check_norm(norm)
        if norm == "linf" and value > 1:
            raise AdvbenchError(f"invalid eps {shown} for linf: images are in [0, 1], so eps must be <= 1")
    return value


def parse_eps_list(text: str, norm: Optional[str] = None) -> List[float]:
    """``"2/255,4/255,8/255"`` -> three floats (order kept, duplicates dropped)."""
    parts = [p for p in str(text).split(",")]
    if not str(text).strip():
        raise AdvbenchError(f"invalid eps {str(text)!r}: empty; {_EPS_HINT}")
    out: List[float] = []
    for p in parts:
        v = parse_eps(p, norm)
        if v not in out:
            out.append(v)
    return out


def format_eps(eps: float) -> str:
    """Short human form: 0.0313725 -> '8/255', 0.2470588 -> '63/255', 0.3 -> '0.3' (a decimal whenever
    '%g' is exact, else k/255 when eps is one, else '%g')."""
    short = f"{eps:g}"
    if float(short) == eps:
        return short
    k = round(eps * 255)
    if abs(k / 255 - eps) <= 1e-12:  # k/255 even when k shares a factor with 255 (63/255 = 21/85)
        return f"{k}/255"
    return short


def check_norm(norm: str) -> str:
    n = str(norm).strip().lower().replace("-", "").replace("_", "")
    n = {"inf": "linf", "l_inf": "linf", "2": "l2"}.get(n, n)
    if n not in NORMS:
        raise AdvbenchError(f"invalid norm {norm!r}: expected one of {', '.join(NORMS)}")
    return n


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


class Geometry:
    """Per-norm operations on perturbations delta of shape (N, ...)."""

    name = ""

    def norm(self, delta: torch.Tensor) -> torch.Tensor:  # (N,)
        raise NotImplementedError

    def step(self, grad: torch.Tensor, alpha: float) -> torch.Tensor:
        """The steepest-ascent direction for this norm, scaled to norm alpha."""
        raise NotImplementedError

    def project(self, delta: torch.Tensor, eps: float) -> torch.Tensor:
        """The closest point of the eps-ball."""
        raise NotImplementedError

    def random(self, like: torch.Tensor, eps: float, seed: int, stream: int, ids: torch.Tensor) -> torch.Tensor:
        """A point drawn uniformly from the eps-ball, one per sample id."""
        raise NotImplementedError

    def diameter(self, d: int) -> float:
        """The largest distance between two images of ``d`` pixels in [0, 1]."""
        raise NotImplementedError


class LinfGeometry(Geometry):
    name = "linf"

    def norm(self, delta):
        return delta.flatten(1).abs().amax(dim=1)

    def step(self, grad, alpha):
        return alpha * grad.sign()

    def project(self, delta, eps):
        return delta.clamp(-eps, eps)

    def random(self, like, eps, seed, stream, ids):
        u = rng.uniform(seed, stream, ids, like.shape[1:], dtype=like.dtype).to(like.device)
        return (2 * u - 1) * eps

    def diameter(self, d):
        return 1.0


class L2Geometry(Geometry):
    name = "l2"

    def norm(self, delta):
        return delta.flatten(1).norm(p=2, dim=1)

    def step(self, grad, alpha):
        n = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
        return alpha * grad / _view(n, grad)

    def project(self, delta, eps):
        n = delta.flatten(1).norm(p=2, dim=1)
        scale = torch.where(n > eps, eps / n.clamp_min(1e-12), torch.ones_like(n))
        return delta * _view(scale, delta)

    def random(self, like, eps, seed, stream, ids):
        # uniform in the ball: direction uniform on the sphere (normalised Gaussian),
        # radius eps * U^(1/d) so that volume, not radius, is uniform
        d = like[0].numel()
        z = rng.normal(seed, stream, ids, like.shape[1:], dtype=like.dtype).to(like.device)
        z = z / _view(z.flatten(1).norm(p=2, dim=1).clamp_min(1e-12), z)
        u = rng.uniform(seed, stream + 1_000_003, ids, (1,), dtype=torch.float64).reshape(-1)
        r = (eps * u.pow(1.0 / d)).to(like.dtype).to(like.device)
        return z * _view(r, z)

    def diameter(self, d):
        return math.sqrt(d)


GEOMETRIES = {"linf": LinfGeometry(), "l2": L2Geometry()}


@dataclass(frozen=True)
class ThreatModel:
    norm: str
    eps: float

    def __post_init__(self):
        object.__setattr__(self, "norm", check_norm(self.norm))
        object.__setattr__(self, "eps", parse_eps(self.eps, self.norm))

    @classmethod
    def parse(cls, norm: str, eps: Union[str, float]) -> "ThreatModel":
        return cls(check_norm(norm), parse_eps(eps, norm))

    @property
    def geometry(self) -> Geometry:
        return GEOMETRIES[self.norm]

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.geometry.norm((x_adv - x).detach().float())

    def violations(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask of samples outside the ball or outside [0, 1] (or not finite)."""
        d = self.distance(x_adv, x)
        flat = x_adv.detach().flatten(1)
        bad_box = (flat < 0).any(1) | (flat > 1).any(1) | ~torch.isfinite(flat).all(1)
        return (d > self.eps + self.tolerance) | bad_box | ~torch.isfinite(d)

    @property
    def tolerance(self) -> float:
        """Float slack of the ball check: TOLERANCE, relative for eps > 1."""
        return TOLERANCE * max(1.0, self.eps)

    def label(self) -> str:
        return f"{self.norm} eps={format_eps(self.eps)}"

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Refuse an L2 budget larger than any L2 distance between two images of ``shape`` (C, H, W)
        in [0, 1], sqrt(C*H*W): such an eps is a typo, not a threat model (L-inf eps <= 1 already)."""
        d = math.prod(int(s) for s in shape)
        if self.norm == "l2" and self.eps > math.sqrt(d):
            size = "x".join(str(int(s)) for s in shape)
            raise AdvbenchError(f"eps {format_eps(self.eps)} for l2 exceeds sqrt({d}) = {math.sqrt(d):.4g}, the "
                                f"largest L2 distance between {size} images in [0, 1]")

    def atypical(self, shape: Sequence[int], dataset: str = "") -> Optional[str]:
        """A warning when eps is outside TYPICAL_EPS for images of ``shape`` (C, H, W) (of
        ``dataset``), else None."""
        kind = "grey" if int(shape[0]) == 1 else "colour"
        lo, hi = TYPICAL_EPS[(kind, self.norm)]
        if lo - 1e-12 <= self.eps <= hi + 1e-12 or self.eps == 0:
            return None
        size = "x".join(str(int(s)) for s in shape)
        images = f"{'grey-scale' if kind == 'grey' else 'colour'} {size} images"
        return (f"{self.norm} eps={format_eps(self.eps)} is {'small' if self.eps < lo else 'large'} for "
                f"{f'{dataset} ({images})' if dataset else images}: typical {self.norm} budgets are "
                f"{format_eps(lo)}-{format_eps(hi)} ({_TYPICAL_EXAMPLES[(kind, self.norm)]})")

    def __str__(self) -> str:
        return self.label()
