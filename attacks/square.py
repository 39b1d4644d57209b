"""Square Attack — Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search" (ECCV 2020), as AutoAttack's standard version runs
it (the last of its four attacks).

A score-based black-box attack: random search on the margin loss, using logits only, never a
gradient, so gradient masking (Athalye et al. 2018) cannot hide a model from it. Per sample, with
m(x) = z_y(x) - max_{j != y} z_j(x) (the sample is fooled once m < 0; targeted: m = max_{j != t} z_j
- z_t):

    x^(0)   = a random point at the border of the ball (below)
    x~      = x^(k) with a random square of side s_k changed (below), in the ball and [0, 1]
    x^(k+1) = x~ if m(x~) < m(x^(k)) or x~ fools the model, else x^(k)

for k < ``steps`` (the query budget, 5,000 as AutoAttack; steps + 1 forwards per restart with the
initial point). The square covers a fraction p_k of the image: s_k = round(sqrt(p_k h w)), and p_k
= p_init (0.8) halved at iterations 10, 50, 200, 500, 1,000, 2,000, 4,000, 6,000 and 8,000
(p_init / 512 after that), on the scale of 10,000 queries. AutoAttack runs the schedule on the
iteration count itself (``rescale_schedule=False``); ``rescale_schedule=True`` stretches it to the
budget (iteration k counts as k * 10,000 / steps), the default of the paper's code.

L-inf: x^(0) = x + eps * (vertical stripes: one random sign per channel and column); a proposal
sets a random s x s square (every channel) to x +- eps, one random sign per channel (s >= 1).

L2: x^(0) = x + eps * delta / ||delta||, delta a 5 x 5 grid of tiles of side h // 5, each a
meta-pseudo-gaussian bump (+ above, - below its middle row, randomly transposed) with a random
sign per channel. A proposal (s odd, >= 3) picks two random windows W1, W2: per channel, the mass
of delta on W1 and W2 moves onto W1 as a fresh bump plus W1's old content, W2 is emptied, and the
budget left over, eps^2 - ||delta||^2, is shared out among the channels; then delta is rescaled to
norm eps (clipping to [0, 1] only shortens it).

Differences from the reference (fra31/auto-attack, square.py), each a choice, none a change of the
algorithm: random numbers are drawn per sample (the reference draws one square position and one
sign per channel per iteration for the whole batch), keyed by (seed, stream, sample id) through
robustbench_lite.rng, so a sample's result does not depend on its batch; a square's position is
uniform over all h - s + 1 positions (the reference never draws the last one); fooled means
argmax z != y on float32 logits (under amp: confirmed in float32 before a sample leaves); the L2
initial grid keeps only whole tiles (the reference fails on sizes where the last tile overhangs).

Bookkeeping: per sample the lowest-margin point so far (``x_best``); a fooling point is final.
Fooled samples leave the working batch at every ``SETTLE_EVERY``-th iteration (the host sync of
the loop; in between, a fooled sample's point is frozen, so the cadence changes the cost, never
the result). Restarts (default 1) start afresh on the samples no walk has fooled; the returned
point is the lowest-margin one of all walks, or the fooling one (attacks.bookkeeping).
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from robustbench_lite import rng
from robustbench_lite.errors import AdvbenchError

from . import losses
from .bookkeeping import Kept, WorkingBatch, per_sample
from .engine import ATTACKS, MAX_STEPS, Attack, AttackConfig, Objective

# Square's rng streams: restart r's initial point uses SQUARE_STREAM + r * RESTART_STREAMS, its
# block b of iterations SQUARE_STREAM + r * RESTART_STREAMS + 1 + b (apart from PGD's restart
# streams 0, 1, ..., APGD's and the random targets' 1 << 28).
SQUARE_STREAM = 5 << 28
RANDOM_BLOCK = 50  # iterations whose random numbers one rng call draws (amortises its host copy)
RESTART_STREAMS = MAX_STEPS // RANDOM_BLOCK + 2
SETTLE_EVERY = 10  # iterations between two removals of the fooled samples (see the module docstring)
# p_k = p_init / divisor once the iteration (on the scale of 10,000 queries) exceeds the threshold
HALVINGS = ((10, 2), (50, 4), (200, 8), (500, 16), (1000, 32), (2000, 64), (4000, 128), (6000, 256), (8000, 512))


def square_fraction(p_init: float, k: int, steps: int, rescale: bool = False) -> float:
    """p_k: the fraction of the image the square of iteration k covers (see the module docstring)."""
    it = int(k / steps * 10000) if rescale else k
    divisor = 1
    for after, d in HALVINGS:
        if it > after:
            divisor = d
    return p_init / divisor


def _bumps(rows: int, cols: int) -> torch.Tensor:
    """(rows, cols), unit L2 norm: concentric rectangles around (rows // 2, cols // 2), the one at
    Chebyshev distance d weighing sum_{k >= d} 1 / (k + 1)^2."""
    if rows == 0:
        return torch.zeros(0, cols, dtype=torch.float64)
    ci, cj = rows // 2, cols // 2
    rings = max(ci, cj) + 1
    tail = (1.0 / torch.arange(1, rings + 1, dtype=torch.float64) ** 2).flip(0).cumsum(0).flip(0)
    di = (torch.arange(rows) - ci).abs().reshape(-1, 1)
    dj = (torch.arange(cols) - cj).abs().reshape(1, -1)
    out = tail[torch.maximum(di, dj)]
    return out / out.norm()


@functools.lru_cache(maxsize=None)
def meta_pseudo_gaussian(s: int) -> torch.Tensor:
    """The L2 bump of side s (CPU, float64, unit L2 norm): bumps in the top s // 2 rows, minus
    bumps in the others (the paper's meta-pseudo-gaussian perturbation)."""
    eta = torch.cat([_bumps(s // 2, s), -_bumps(s - s // 2, s)])
    return eta / eta.norm()


def _bump_pair(s: int, like: torch.Tensor) -> torch.Tensor:
    """(2, s * s): the bump of side s and its transpose, flattened, on like's device and dtype."""
    eta = meta_pseudo_gaussian(s)
    return torch.stack([eta, eta.t()]).reshape(2, -1).to(device=like.device, dtype=like.dtype)


def _signs(u: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """-1 where u < 1/2, else +1, in like's dtype."""
    return torch.where(u < 0.5, -1.0, 1.0).to(like.dtype)


def _window(u: torch.Tensor, s: int, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per sample a window of s positions out of ``size``, its start uniform in [0, size - s]:
    (each position's index inside the window (n, size), whether it is inside (n, size))."""
    start = (u * (size - s + 1)).long().clamp_(max=size - s)
    local = torch.arange(size, device=u.device).reshape(1, -1) - start.reshape(-1, 1)
    return local, (local >= 0) & (local < s)


@dataclass(frozen=True)
class SquareConfig(AttackConfig):
    """The engine's settings plus Square's own: ``p_init`` (0.8, in (0, 1]: the fraction of the
    image the first squares cover) and ``rescale_schedule`` (False as AutoAttack: see the module
    docstring). Square minimises the margin (loss="margin"), starts at a random point
    (random_start=True), has no step size (alpha=0) and returns a sample's first fooling point
    (keep="first-fool")."""

    p_init: float = 0.8
    rescale_schedule: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        n, p = self.attack, self.p_init
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise AdvbenchError(f"invalid p_init={p!r} for attack {n!r}: must be a number in (0, 1]")
        self._put("p_init", float(p))
        if not isinstance(self.rescale_schedule, bool):
            raise AdvbenchError(f"invalid rescale_schedule={self.rescale_schedule!r} for attack {n!r}: "
                                f"must be True or False")
        fixed = {"loss": ("margin", "Square minimises the margin loss"),
                 "keep": ("first-fool", "Square returns the first fooling point, else the lowest-margin one"),
                 "random_start": (True, "Square starts from a random point of the ball's border"),
                 "alpha": (0.0, "Square has no step size (its squares are set to the border of the ball)")}
        for key, (value, why) in fixed.items():
            if getattr(self, key) not in (value, None):
                raise AdvbenchError(f"invalid {key}={getattr(self, key)!r} for attack {n!r}: {why}")


@dataclass(eq=False)
class _SquareWalk(WorkingBatch):
    """One walk's working batch: the clean images x, true labels y, loss labels, sample ids, the
    current (lowest-margin) point x_best with its loss (minus the margin), whether it fools (hit)
    and the model's prediction on it (pred), and the random numbers of the current block of iterations (n, RANDOM_BLOCK, per step)."""

    x: torch.Tensor
    y: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    x_best: torch.Tensor
    best: torch.Tensor
    hit: torch.Tensor
    pred: torch.Tensor
    rand: Optional[torch.Tensor] = None


class _LinfSquares:
    """Square's L-inf part: vertical stripes of +-eps to start, then squares set to x +- eps."""

    def __init__(self, eps: float, shape: torch.Size):
        self.eps, (self.c, self.h, self.w) = eps, tuple(shape)
        self.n_init, self.n_step = self.c * self.w, 2 + self.c  # random numbers per sample

    def side(self, p: float) -> int:
        return min(max(int(round(math.sqrt(p * self.h * self.w))), 1), self.h, self.w)

    def init(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """x + eps * (a random sign per channel and column), in [0, 1]; u (n, c * w)."""
        return (x + self.eps * _signs(u, x).reshape(-1, self.c, 1, self.w)).clamp_(0, 1)

    def propose(self, x: torch.Tensor, x_best: torch.Tensor, s: int, u: torch.Tensor) -> torch.Tensor:
        """x_best with a random s x s square set to x +- eps (a sign per channel); u (n, 2 + c):
        the square's row, column, then the signs."""
        _, rows = _window(u[:, 0], s, self.h)
        _, cols = _window(u[:, 1], s, self.w)
        square = (rows[:, None, :, None] & cols[:, None, None, :])
        border = (x + self.eps * _signs(u[:, 2:], x).reshape(-1, self.c, 1, 1)).clamp_(0, 1)
        return torch.where(square, border, x_best)


class _L2Squares:
    """Square's L2 part: a grid of bumps to start, then mass moved between two windows."""

    def __init__(self, eps: float, shape: torch.Size):
        self.eps, (self.c, self.h, self.w) = eps, tuple(shape)
        self.tile = max(self.h // 5, 1)
        self.start = [max((d - 5 * self.tile) // 2, 0) for d in (self.h, self.w)]
        self.tiles = [(d - o) // self.tile for d, o in zip((self.h, self.w), self.start)]  # whole tiles only
        self.n_init, self.n_step = self.tiles[0] * self.tiles[1] * (self.c + 1), 5 + self.c

    def side(self, p: float) -> int:
        s = max(int(round(math.sqrt(p * self.h * self.w))), 3)
        return min(s + 1 - s % 2, self.h, self.w)  # odd

    def _on_sphere(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x + eps * delta / ||delta||, in [0, 1] (the box only shortens it)."""
        norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        return (x + delta * per_sample(self.eps / norm, delta)).clamp_(0, 1)

    def init(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The grid of bumps, each transposed or not and with a sign per channel; u (n, tiles * (c + 1))."""
        (kh, kw), t, n, c = self.tiles, self.tile, x.shape[0], self.c
        u = u.reshape(n, kh, kw, c + 1)
        bumps = _bump_pair(t, x)[(u[..., 0] >= 0.5).long()].reshape(n, 1, kh, kw, t, t)
        grid = (bumps * _signs(u[..., 1:], x).permute(0, 3, 1, 2)[..., None, None])
        delta = torch.zeros_like(x)
        (oh, ow) = self.start
        delta[:, :, oh:oh + kh * t, ow:ow + kw * t] = grid.permute(0, 1, 2, 4, 3, 5).reshape(n, c, kh * t, kw * t)
        return self._on_sphere(x, delta)

    def propose(self, x: torch.Tensor, x_best: torch.Tensor, s: int, u: torch.Tensor) -> torch.Tensor:
        """Per channel, W1 gets a fresh bump (a sign per channel) plus its old content, scaled to
        hold the mass of W1 and W2 and a share of the budget left; W2 is emptied; then delta is
        rescaled to norm eps. u (n, 5 + c): W1's row and column, W2's, the transpose, the signs."""
        n, delta = x.shape[0], x_best - x
        li, rows1 = _window(u[:, 0], s, self.h)
        lj, cols1 = _window(u[:, 1], s, self.w)
        _, rows2 = _window(u[:, 2], s, self.h)
        _, cols2 = _window(u[:, 3], s, self.w)
        w1 = rows1[:, None, :, None] & cols1[:, None, None, :]
        both = w1 | (rows2[:, None, :, None] & cols2[:, None, None, :])
        at = (li.clamp(0, s - 1)[:, :, None] * s + lj.clamp(0, s - 1)[:, None, :]).reshape(n, -1)
        bump = _bump_pair(s, x)[(u[:, 4] >= 0.5).long()].gather(1, at).reshape(n, 1, self.h, self.w) * w1
        old = delta * w1
        new = bump * _signs(u[:, 5:], x).reshape(n, self.c, 1, 1) + old / (_channel_norm(old) + 1e-12)
        room = (self.eps ** 2 - delta.flatten(1).pow(2).sum(1)).clamp_min(0).reshape(n, 1, 1, 1) / self.c
        mass = (room + _channel_norm(delta * both) ** 2).sqrt()
        new = new / (_channel_norm(new) + 1e-12) * mass
        return self._on_sphere(x, delta * ~both + new)


def _channel_norm(t: torch.Tensor) -> torch.Tensor:
    """(n, c, 1, 1): the L2 norm of each channel of t (n, c, h, w)."""
    return t.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()


SQUARES = {"linf": _LinfSquares, "l2": _L2Squares}


@ATTACKS.register("square", aliases=("square-attack",),
                  help="Square Attack (Andriushchenko et al. 2020): black-box random search on the margin, "
                       "no gradients")
class Square(Attack):
    """Square Attack (Andriushchenko et al., ECCV 2020); see the module docstring. ``steps`` is the
    query budget per restart; extra parameters ``p_init`` and ``rescale_schedule``."""

    name = "square"
    defaults: Dict[str, Any] = {"steps": 5000, "random_start": True, "restarts": 1, "loss": "margin"}
    config_class = SquareConfig
    overridable = ("steps", "restarts")  # steps: the query budget; loss and step size are fixed

    @staticmethod
    def default_alpha(eps: float, steps: int) -> float:
        return 0.0  # no step size: a square is set to the border of the ball

    def planned_forwards(self) -> int:
        """Per restart the initial point and one proposal per step."""
        return self.settings.restarts * (self.settings.steps + 1)

    def _attack(self, model, x, y, target, ids) -> torch.Tensor:
        if x.dim() != 4:
            raise AdvbenchError(f"attack {self.name!r}: images must be N x C x H x W (got shape {tuple(x.shape)})")
        if x.shape[0] == 0:
            return x.clone()
        labels, targeted = self._labels(model, x, y, target, ids)
        if self.threat.eps == 0:
            return x.clone().clamp_(0, 1)
        objective = Objective(losses.get_loss("margin", targeted), targeted)
        squares = SQUARES[self.threat.norm](self.threat.eps, x.shape[1:])
        kept = Kept.start(x.clone())
        for r in range(self.settings.restarts):
            rows = kept.unfooled()
            if rows.numel() == 0:
                break
            w = self._begin(model, squares, objective, kept, rows, r, x=x[rows], y=y[rows], labels=labels[rows],
                            ids=ids[rows])
            self._walk(model, squares, objective, w, r)
        return self._answer(kept.iterate, kept.pred)

    def _begin(self, model, squares, objective: Objective, kept: Kept, rows: torch.Tensor, r: int,
               **batch: torch.Tensor) -> _SquareWalk:
        """Restart r's working batch at its initial point (one query)."""
        u = rng.uniform(self.settings.seed, SQUARE_STREAM + r * RESTART_STREAMS, batch["ids"], (squares.n_init,))
        x0 = squares.init(batch["x"], u.to(batch["x"].device))
        loss, fool, pred = self._query(model, objective, x0, batch["y"], batch["labels"])
        return _SquareWalk.start(kept, rows, "first-fool", x_best=x0, best=loss, hit=fool, pred=pred, **batch)

    def _walk(self, model, squares, objective: Objective, w: _SquareWalk, r: int) -> None:
        """``steps`` proposals for the samples of w: a proposal replaces a sample's point when it
        lowers the margin or fools the model; a fooling point is final."""
        s = self.settings
        for k in range(s.steps):
            if k % SETTLE_EVERY == 0 and not self._settle(model, objective, w):
                return
            if k % RANDOM_BLOCK == 0:
                stream = SQUARE_STREAM + r * RESTART_STREAMS + 1 + k // RANDOM_BLOCK
                w.rand = rng.uniform(s.seed, stream, w.ids, (RANDOM_BLOCK, squares.n_step)).to(w.x.device)
            side = squares.side(square_fraction(s.p_init, k, s.steps, s.rescale_schedule))
            x_new = squares.propose(w.x, w.x_best, side, w.rand[:, k % RANDOM_BLOCK])
            loss, fool, pred = self._query(model, objective, x_new, w.y, w.labels)
            take = ~w.hit & (fool | (loss > w.best))
            w.x_best = torch.where(per_sample(take, x_new), x_new, w.x_best)
            w.best = torch.where(take, loss, w.best)
            w.pred = torch.where(take, pred, w.pred)
            w.hit = w.hit | fool
        if self._settle(model, objective, w):
            w.store()

    def _query(self, model, objective: Objective, inp: torch.Tensor, y: torch.Tensor, labels: torch.Tensor):
        """One counted forward without a gradient: (loss = minus the margin, fools?, prediction) per
        sample."""
        logits, loss = self._loss(model, inp, labels, objective.loss)
        return (loss, *objective.judge(logits, y, labels))

    def _settle(self, model, objective: Objective, w: _SquareWalk) -> bool:
        """The loop's sync point: under amp the new hits are confirmed in float32, the points go to
        the bookkeeping, and (early_stop) the fooled samples leave. False once none is left."""
        if self.settings.amp is not None:
            self._confirm(model, objective, w)
        w.offer(w.x_best, w.best, w.hit, w.pred)
        return w.drop_fooled() if self.settings.early_stop else True

    def _confirm(self, model, objective: Objective, w: _SquareWalk) -> None:
        """A sample fooled on bf16 logits counts as fooled only if float32 logits agree; otherwise its
        walk goes on from the same point, with its float32 loss."""
        new = (w.hit & ~w.fooled).nonzero().reshape(-1)
        if new.numel() == 0:
            return
        self._stats["forward"] += 1
        self._stats["forward_samples"] += new.numel()
        with torch.no_grad():
            logits = model(w.x_best[new]).float()
        labels = w.labels[new]
        still = objective.fools(logits, w.y[new], labels)
        w.hit[new] = still
        w.best[new] = torch.where(still, w.best[new], objective.loss(logits, labels))

