"""FAB — Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary
attack" (ICML 2020): the Fast Adaptive Boundary attack, a minimum-norm attack; FAB-T, its targeted
form, is the third attack of AutoAttack's standard version.

FAB walks to the decision boundary between the true class y and a target class t by linearising
it at the current iterate x_k and projecting onto the linearisation, biased towards the original
point x_orig so that the adversarial point it finds stays close to x_orig:

    f(z) = z_t(z) - z_y(z),     plane at x_k:  pi_k = { z : f(x_k) + <grad f(x_k), z - x_k> = 0 }
    d  = P(x_k) - x_k,          d0 = P(x_orig) - x_orig,   P = projection onto pi_k  n  [0, 1]^d
    alpha = min(||d|| / (||d|| + ||d0||), alpha_max)
    x_{k+1} = clip_[0,1]( (1 - alpha) (x_k + eta d) + alpha (x_orig + eta d0) )

(eta > 1 overshoots the plane a little). Once x_k fools the model (prediction != y) it is kept if
its norm ||x_k - x_orig|| is the smallest so far, and the walk goes back towards x_orig,
x_k := x_orig + beta (x_k - x_orig), before the next step, so that it keeps shrinking the
perturbation. Restart 0 starts at x_orig; restarts r >= 1 at a random point at distance eps/2
(rng stream FAB_STREAM). FAB-T runs this with f = z_t - z_y for each of the top-k (default 9)
classes t != y by clean logit, on the samples no earlier target fooled, as AutoAttack does; the
sample counts as fooled when its prediction is not y (the target is a means), or, with ``target=``
given to the call (or ``targeted=``), when its prediction is the target.

Defaults: AutoAttack's standard FAB-T: 100 iterations (``steps``), 1 restart, 9 target classes,
alpha_max 0.1, eta 1.05, beta 0.9.

Projection (AutoAttack's projection_linf / projection_l2, here one algorithm for both norms): the
point of the plane {<w, z> = b} inside the box [0, 1]^d closest to t in the attack's norm is
t + d(lam), d(lam) = clip(-lam u, -t, 1 - t), with u the norm's steepest-ascent direction of w
(sign(w) for L-inf, w / ||w|| for L2: the geometry's ``step``) and lam >= 0 the smallest value
with <w, t + d(lam)> = b (after orienting w so that the plane lies in the direction -u).
<w, d(lam)> is piecewise linear and monotone in lam with a breakpoint where each coordinate
reaches the box, so sorting the breakpoints finds lam exactly (``project_onto_plane``). When the
plane misses the box, the box corner nearest to it is taken.

What it returns: for each sample the smallest-norm fooling iterate found within eps (the keep
rule ``best-loss``, FAB's loss being -||x_k - x_orig|| on fooling iterates and -inf elsewhere;
``first-fool`` returns the first one), else the clean point. With early_stop (default) a sample
leaves the batch at its first fooling iterate within eps — all AutoAttack needs to count it; with
early_stop=False the walk keeps shrinking the perturbation for every iteration, as the reference
does (AutoAttack's norms). A fooling iterate counts only when float32 logits agree (amp="bf16":
one float32 forward of the candidates).

Costs: one forward and one backward to the input per iteration (the gradient of the logit
difference summed over the batch), steps + 1 forwards per walk (the last iterate needs no
gradient), on a shrinking batch; a fooling iterate that goes back towards x_orig is linearised
again there (one forward and one backward of those samples only: with early stop, the ones that
fool outside eps). The reference (pyautoattack's FABAttack_PT) spends two forwards and one
backward per iteration on the whole batch (the second predicts the new iterate); here the next
iteration's forward says whether it fools. planned_forwards does not count the passes after
going back (they depend on the data).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from robustbench_lite.errors import AdvbenchError

from .apgd import MAX_TARGET_CLASSES, top_other_classes
from .bookkeeping import Kept, WorkingBatch, per_sample
from .engine import ATTACKS, Attack, AttackConfig, Objective, check_count

FAB_STREAM = 3 << 28  # rng streams of FAB's random restarts: FAB_STREAM + target index * restarts + r
_TINY = 1e-12


@dataclass(frozen=True)
class FABConfig(AttackConfig):
    """The engine's settings plus FAB's own: ``n_target_classes`` (FAB-T: how many of the top
    classes it targets), ``alpha_max`` (the largest weight of the step from the original point,
    in [0, 1]), ``eta`` (overshoot of the plane, >= 1) and ``beta`` (the step back towards the
    original point after a fooling iterate, in (0, 1]). keep: best-loss or first-fool."""

    n_target_classes: int = 9
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.attack
        self._put("n_target_classes", check_count(n, "n_target_classes", self.n_target_classes, MAX_TARGET_CLASSES))
        for key, lo, hi, text in (("alpha_max", 0.0, 1.0, "a number in [0, 1]"),
                                  ("eta", 1.0, 10.0, "a number in [1, 10]"),
                                  ("beta", _TINY, 1.0, "a number in (0, 1]")):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not lo <= v <= hi:
                raise AdvbenchError(f"invalid {key}={v!r} for attack {n!r}: must be {text}")
            self._put(key, float(v))
        if self.keep == "last":
            raise AdvbenchError(f"invalid keep={self.keep!r} for attack {n!r}: FAB returns its smallest-norm "
                                f"fooling iterate (keep='best-loss') or its first one (keep='first-fool')")


def project_onto_plane(t: torch.Tensor, w: torch.Tensor, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per point t (..., d) in [0, 1]: the smallest d (in the norm whose steepest-ascent direction
    of w is u: sign(w) for L-inf, w/||w|| for L2) with <w, t + d> = <w, t> - c and 0 <= t + d <= 1,
    or, when the plane misses the box, the box corner nearest to it; w and u (..., d) broadcast
    against t, c (...) is t's signed distance to the plane in units of w. See the module docstring."""
    side = torch.where(c < 0, -1.0, 1.0).to(t.dtype)[..., None]  # orient: the plane is at <w, d> = -c <= 0
    w, u, c = w * side, u * side, (c * side[..., 0])[..., None]
    lo, hi = -t, 1 - t
    end = torch.where(u > 0, lo, hi) * (u != 0)  # where each coordinate stops (at the box)
    lam = torch.where(u != 0, end / -u, torch.full_like(end, float("inf")))  # ... and when (lam >= 0)
    lam_s, order = lam.sort(dim=-1)
    slope = (w * u).expand_as(lam).gather(-1, order)  # -d<w, d>/d lam while the coordinate moves (>= 0)
    stopped = (w * end).gather(-1, order).cumsum(dim=-1)  # <w, d> of the coordinates stopped by lam_s[k]
    moving = slope.flip(-1).cumsum(dim=-1).flip(-1)  # the slope of the coordinates k, k+1, ...
    after = F.pad(moving[..., 1:], (0, 1))
    reach = stopped - torch.where(torch.isinf(lam_s), torch.zeros_like(lam_s), lam_s * after)  # <w, d(lam_s[k])>
    m = (reach > -c).sum(dim=-1, keepdim=True)  # how many coordinates stop before the plane is reached
    before = F.pad(stopped, (1, 0)).gather(-1, m)
    lam_opt = (c + before) / F.pad(moving, (0, 1)).gather(-1, m).clamp_min(_TINY)
    d = torch.maximum(torch.minimum(-lam_opt * u, hi), lo)
    return torch.where(m == t.shape[-1], end, d)


def logit_gap(logits: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """f = z_t - z_y per sample, pair (n, 2) = [y, t]: > 0 once t beats y."""
    return (logits.gather(1, pair[:, 1:]) - logits.gather(1, pair[:, :1])).reshape(-1)


@dataclass(eq=False)
class _FABWalk(WorkingBatch):
    """One FAB walk's working batch: when a sample is fooled (``objective``, against the labels
    ``lab``: y, or t with an explicit target), the clean images x, the pairs [y, t] of the plane,
    the iterate p with f(p), grad f(p), whether p fools the model and its prediction."""

    objective: Objective
    x: torch.Tensor
    pair: torch.Tensor
    lab: torch.Tensor
    p: torch.Tensor
    f: torch.Tensor
    grad: torch.Tensor
    fool: torch.Tensor
    pred: torch.Tensor


@ATTACKS.register("fab-t", aliases=("fab-targeted",),
                  help="FAB-T (Croce & Hein 2020): minimum-norm targeted boundary attack towards each top-k class")
class FABT(Attack):
    """FAB-T (Croce & Hein 2020) as AutoAttack's standard version runs it; see the module
    docstring. Extra parameters: ``n_target_classes`` (9), ``alpha_max`` (0.1), ``eta`` (1.05),
    ``beta`` (0.9)."""

    name = "fab-t"
    defaults: Dict[str, Any] = {"steps": 100, "random_start": True, "restarts": 1, "keep": "best-loss"}
    config_class = FABConfig
    overridable = ("steps", "restarts")  # the step goes to the linearised boundary: no alpha, no loss

    @staticmethod
    def default_alpha(eps: float, steps: int) -> float:
        return 0.0  # FAB has no step size: a step goes to the linearised boundary (alpha_max weighs it)

    def planned_forwards(self) -> int:
        """A clean forward (the targets), then per target class and restart steps + 1 forwards."""
        s = self.settings
        return 1 + s.n_target_classes * (s.restarts if s.random_start else 1) * (s.steps + 1)

    # -- the attack ------------------------------------------------------------------------
    def _attack(self, model, x, y, target, ids) -> torch.Tensor:
        kept = Kept.start(x.clone())
        if x.shape[0] == 0 or self.threat.eps == 0:
            return kept.iterate.clamp_(0, 1)
        targets, lab, objective, clean = self._targets(model, x, y, target, ids)
        if clean is not None:
            kept.pred.copy_(clean)  # x itself is kept until an iterate fools: its verdict is known
        restarts = self.settings.restarts if self.settings.random_start else 1
        for k in range(targets.shape[1]):
            for r in range(restarts):
                rows = kept.unfooled()
                if rows.numel() == 0:
                    return self._answer(kept.iterate, kept.pred)
                start = x[rows] if r == 0 else self._random_start(x[rows], ids[rows], k * restarts + r)
                pair = torch.stack((y[rows], targets[rows, k]), dim=1)
                self._walk(model, kept, rows, objective, x=x[rows], pair=pair, lab=lab[rows], p=start)
        return self._answer(kept.iterate, kept.pred)

    def _targets(self, model, x, y, target, ids) -> Tuple[torch.Tensor, torch.Tensor, Objective, Optional[torch.Tensor]]:
        """(targets (N, k), labels of the fooling test, objective, clean predictions or None): the
        top-k classes != y by clean logit, fooled = prediction != y; or the call's (or the
        settings') target, fooled = prediction == target (no clean forward)."""
        if target is not None or self.settings.targeted:
            t, _ = self._labels(model, x, y, target, ids)
            return t.reshape(-1, 1), t, Objective(logit_gap, True), None
        objective = Objective(logit_gap, False)
        with torch.no_grad():
            logits = self._forward(model, x)
        clean = objective.judge(logits, y, y)[1]
        return top_other_classes(logits, y, self.settings.n_target_classes), y, objective, clean

    def _random_start(self, x: torch.Tensor, ids: torch.Tensor, restart: int) -> torch.Tensor:
        """x plus a random perturbation of norm eps/2 (rng stream FAB_STREAM + restart), in [0, 1]."""
        geo = self.threat.geometry
        v = geo.random(x, 1.0, self.settings.seed, FAB_STREAM + restart, ids)
        return (x + v * per_sample(0.5 * self.threat.eps / geo.norm(v).clamp_min(_TINY), v)).clamp_(0, 1)

    def _walk(self, model, kept: Kept, rows: torch.Tensor, objective: Objective, **state: torch.Tensor) -> None:
        """``steps`` FAB iterations from p for the samples ``rows`` (state: x, pair, lab, p); each
        keeps its smallest-norm fooling iterate within eps (keep rule) in ``kept``."""
        s, n, dev = self.settings, rows.numel(), rows.device
        w = _FABWalk.start(kept, rows, s.keep, objective=objective, f=torch.zeros(n, device=dev),
                           grad=torch.zeros_like(state["x"]), fool=torch.zeros(n, dtype=torch.bool, device=dev),
                           pred=torch.full((n,), -1, dtype=torch.long, device=dev),
                           **state)
        for i in range(s.steps + 1):
            self._linearise(model, w, gradient=i < s.steps)
            self._offer(model, w)
            if s.early_stop and not w.drop_fooled():
                return
            if i < s.steps:
                self._go_back(model, w)
                w.p = self._step(w)
        w.store()

    def _go_back(self, model, w: _FABWalk) -> None:
        """Fooling iterates (outside eps, or any without early stop) go back towards x,
        p := x + beta (p - x), and are linearised there (one forward and one backward of those
        samples only), as the reference does before its next step."""
        rows = w.fool.nonzero().reshape(-1)
        if rows.numel() == 0:
            return
        back = w.x[rows] + self.settings.beta * (w.p[rows] - w.x[rows])
        _, f, grad = self._loss_and_grad(model, back, w.pair[rows], logit_gap)
        w.p, w.f, w.grad = (v.index_put((rows,), new) for v, new in ((w.p, back), (w.f, f), (w.grad, grad)))
        w.fool = torch.zeros_like(w.fool)

    def _linearise(self, model, w: _FABWalk, gradient: bool) -> None:
        """f(p) = z_t - z_y and its gradient (one forward and one backward; the last iterate needs
        no gradient), and whether p fools the model."""
        if gradient:
            logits, w.f, w.grad = self._loss_and_grad(model, w.p, w.pair, logit_gap)
        else:
            logits, w.f = self._loss(model, w.p, w.pair, logit_gap)
        w.fool, w.pred = w.objective.judge(logits, w.pair[:, 0], w.lab)

    def _offer(self, model, w: _FABWalk) -> None:
        """Offer p with loss -||p - x|| where it fools within eps (confirmed on float32 logits)."""
        dist = self.threat.geometry.norm(w.p - w.x).to(w.kept_loss.dtype)
        hit = w.fool & (dist <= self.threat.eps) & (-dist > w.kept_loss)
        if self.settings.amp is not None:
            hit = self._float32_fools(model, w, hit)
        w.offer(w.p, torch.where(hit, -dist, torch.full_like(dist, float("-inf"))), hit, w.pred)

    def _float32_fools(self, model, w: _FABWalk, hit: torch.Tensor) -> torch.Tensor:
        """``hit`` where a float32 forward of the candidates agrees that they fool (a host sync)."""
        rows = hit.nonzero().reshape(-1)
        if rows.numel() == 0:
            return hit
        self._stats["forward"] += 1
        self._stats["forward_samples"] += rows.numel()
        with torch.no_grad():
            logits = model(w.p[rows]).float()
        agree = w.objective.fools(logits, w.pair[rows, 0], w.lab[rows])
        return hit.index_put((rows,), agree)

    def _step(self, w: _FABWalk) -> torch.Tensor:
        """The FAB step: project p and x onto the plane linearised at p (inside the box), go to the
        alpha-weighted mix, overshot by eta."""
        s, geo = self.settings, self.threat.geometry
        g, p = w.grad.flatten(1), w.p.flatten(1)
        points = torch.stack((p, w.x.flatten(1)))  # (2, n, d): project both at once
        c = w.f + ((points - p) * g).sum(dim=-1)  # the plane f(p) + <g, z - p> = 0 seen from each z
        d = project_onto_plane(points, g, c, geo.step(g, 1.0))
        d_cur, d_orig = d.view(2, *w.p.shape).unbind(0)
        n_cur, n_orig = geo.norm(d_cur).clamp_min(1e-8), geo.norm(d_orig).clamp_min(1e-8)
        a = per_sample((n_cur / (n_cur + n_orig)).clamp(max=s.alpha_max), w.p)
        return ((1 - a) * (w.p + s.eta * d_cur) + a * (w.x + s.eta * d_orig)).clamp_(0, 1)

