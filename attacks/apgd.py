"""APGD — Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks" (ICML 2020): Auto-PGD, the attacks behind AutoAttack.

APGD is PGD with momentum and a step size that adapts itself, per sample, so that no step size
has to be tuned (the main reason fixed-step PGD over-estimates robustness):

    x^(0)   = random point of the eps-ball (random_start=True), eta^(0) = 2 eps (``alpha``)
    z^(k+1) = P( x^(k) + eta^(k) step(grad f(x^(k))) )
    x^(k+1) = P( x^(k) + a (z^(k+1) - x^(k)) + (1 - a)(x^(k) - x^(k-1)) ),  a = 0.75 (a = 1 at k=0)

with P the projection onto the eps-ball and [0, 1], step() the norm's steepest-ascent direction
(robustbench_lite.threat). At the checkpoints w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), the step size of a sample is halved, and its
walk restarts from its best point x_max, when
  (a) fewer than rho (0.75) of the steps since the last checkpoint increased f, or
  (b) its step size and its best loss f_max did not change since the last checkpoint.
After such a restart the momentum term of the next step is x_max - x^(k-1) (x^(k-1) is kept, as
the reference implementation does: fra31/auto-attack, autopgd_base.py).

Losses: ``apgd-ce`` cross-entropy; ``apgd-dlr`` the Difference of Logits Ratio (shift and scale
invariant); ``apgd-t`` runs, for each of the top-k (default 9) classes t != y by clean logit,
APGD with the targeted DLR loss towards t on the samples that survived the previous targets.
A sample counts as fooled when its prediction is not y (for apgd-t too: the target is a means),
or, when ``target=`` is passed to the call, when its prediction is the target. The fooling test of
an iterate, and the record of a fooling iterate, come right after the forward pass that evaluated
it, before a checkpoint may send the walk back to x_max (as the reference records x_best_adv).

Random starts: each of apgd-ce, apgd-dlr and apgd-t draws from rng streams of its own
(``start_stream``; restart r of target t: start_stream + t * restarts + r), apart from PGD's.
With ``eot`` > 1 (EOT, for randomised models) every gradient is the mean over eot passes; the
loss and the fooling test of an iterate come from the last pass, as the reference's eot_iter.

Why a walk of its own rather than the engine's (attacks.engine.Attack._walk): APGD carries
per-sample state that PGD does not have — a step size per sample, the previous iterate for the
momentum, counters of loss increases between checkpoints, the best point and its gradient for
restarts — and changes the step size and the iterate per sample at the checkpoints. Folding
that into the engine would complicate FGSM/BIM/PGD's loop for one attack. A step of the walk
reads: drop the fooled, momentum step, loss and gradient, offer the iterate, best point, and at a
checkpoint the step-size rule (APGD._checkpoint). Everything else is the engine's: the call
contract and input checks (Attack.__call__), the settings (APGDConfig extends AttackConfig with
rho and momentum), attack_mode (eval mode, frozen parameters, restored on exit), the counted
forward and backward (Attack._forward, _loss_and_grad, with optional bf16 and EOT), the float32
confirmation of fooling under bf16 (Attack.confirm_fooled), the verdicts (Attack._answer), target selection
(Attack._labels), the per-sample bookkeeping (attacks.bookkeeping: the walk's state is a
WorkingBatch, whose tensors shrink together), the geometry and random starts keyed by sample id
(robustbench_lite.threat / rng) and the losses (attacks.losses). Bookkeeping follows the
engine's ``first-fool``: a sample's first fooling iterate is returned, else its highest-loss
iterate; fooled samples leave the batch (early_stop=True), restarts run only on survivors.

Costs: steps * eot + 1 forwards per restart (the gradient of the last iterate is not needed, so
it gets one no-grad forward) and steps * eot backwards to the input, on a shrinking batch.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from robustbench_lite.errors import AdvbenchError

from . import losses
from .bookkeeping import Kept, WorkingBatch, per_sample
from .engine import ATTACKS, Attack, AttackConfig, Objective, check_count


# APGD-T attacks one target class after the other (AutoAttack: 9), each costing a full walk; the
# class count less one bounds it anyway (ImageNet: 999), so more than this is a typo.
MAX_TARGET_CLASSES = 1_000
# The rng streams of APGD's random starts: each attack's own block of STREAM_BLOCK streams (APGD-T
# uses up to MAX_TARGET_CLASSES * MAX_RESTARTS of them), apart from PGD's (0, 1, ...) and from the
# random targets' (engine.TARGET_STREAM).
STREAM_BLOCK = 1 << 22


def checkpoint_fractions(max_p: float = 1.0) -> List[float]:
    """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), while p_j <= max_p."""
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > max_p + 1e-9:
            return p
        p.append(round(nxt, 10))


def checkpoints(n_iter: int) -> List[int]:
    """The iterations w_j = ceil(p_j * n_iter) at which the step size may be halved (w_0 = 0
    included; strictly increasing, all <= n_iter)."""
    out: List[int] = []
    for p in checkpoint_fractions():
        w = int(math.ceil(p * n_iter - 1e-9))
        if w <= n_iter and (not out or w > out[-1]):
            out.append(w)
    return out


def top_other_classes(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """(N, min(k, C - 1)): per sample the classes != y with the highest logits, best first (the
    target classes of APGD-T and FAB-T)."""
    k = min(k, logits.shape[1] - 1)
    return logits.scatter(1, y.reshape(-1, 1), float("-inf")).topk(k, dim=1).indices


@dataclass(frozen=True)
class APGDConfig(AttackConfig):
    """The engine's settings plus APGD's own: ``rho`` (the fraction of successful steps below
    which the step is halved) and ``momentum``, both in [0, 1]. keep must be first-fool."""

    rho: float = 0.75
    momentum: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_own()
        if self.keep != "first-fool":
            raise AdvbenchError(f"invalid keep={self.keep!r} for attack {self.attack!r}: APGD returns the first "
                                f"fooling iterate, else the best-loss one (keep='first-fool')")

    def _check_own(self) -> None:
        for key in ("rho", "momentum"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 1:
                raise AdvbenchError(f"invalid {key}={v!r} for attack {self.attack!r}: must be a number in [0, 1]")
            self._put(key, float(v))


@dataclass(frozen=True)
class APGDTConfig(APGDConfig):
    """APGD's settings plus ``n_target_classes``: how many of the top classes APGD-T targets."""

    n_target_classes: int = 9

    def _check_own(self) -> None:
        super()._check_own()
        self._put("n_target_classes", check_count(self.attack, "n_target_classes", self.n_target_classes,
                                                  MAX_TARGET_CLASSES))


@dataclass(eq=False)
class _APGDWalk(WorkingBatch):
    """One APGD walk's working batch: the clean images x, true labels y, loss labels lab, the
    iterate x_adv and the previous one x_prev, the gradient, the best point so far (x_best,
    loss_best, grad_best), the previous loss, the step size eta, the count of loss increases
    since the last checkpoint, and whether the last checkpoint reduced eta (with f_max then)."""

    x: torch.Tensor
    y: torch.Tensor
    lab: torch.Tensor
    x_adv: torch.Tensor
    x_prev: torch.Tensor
    grad: Optional[torch.Tensor]
    x_best: torch.Tensor
    loss_best: torch.Tensor
    grad_best: torch.Tensor
    loss_prev: torch.Tensor
    eta: torch.Tensor
    n_incr: torch.Tensor
    reduced_last: torch.Tensor
    loss_best_last: torch.Tensor


class APGD(Attack):
    """APGD (Croce & Hein 2020); see the module docstring. Extra parameters: ``rho`` (0.75, the
    fraction of successful steps below which the step is halved), ``momentum`` (0.75)."""

    name = "apgd"
    defaults: Dict[str, Any] = {"steps": 100, "random_start": True, "restarts": 1, "loss": "ce"}
    config_class = APGDConfig

    @staticmethod
    def default_alpha(eps: float, steps: int) -> float:
        return 2.0 * eps  # the initial step size eta^(0) of the paper

    # -- the attack ------------------------------------------------------------------------
    def _attack(self, model, x, y, target, ids) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.clone()
        lab, targeted = self._labels(model, x, y, target, ids)
        if self.threat.eps == 0:
            return x.clone().clamp_(0, 1)
        objective = Objective(losses.get_loss(self.settings.loss, targeted), targeted)
        kept = Kept.start(x.clone())
        self._restarts(model, x, y, lab, ids, objective, kept)
        return self._answer(kept.iterate, kept.pred)

    def _restarts(self, model, x, y, lab, ids, objective: Objective, kept: Kept, stream0: int = 0) -> bool:
        """Up to ``restarts`` walks (rng streams start_stream + stream0 + r), each on the samples that
        no walk has fooled yet. False once every sample is fooled."""
        for r in range(self.settings.restarts if self.settings.random_start else 1):
            rows = kept.unfooled()
            if rows.numel() == 0:
                return False
            w = self._begin(model, x, y, lab, ids, objective, kept, rows, self.start_stream + stream0 + r)
            self._walk(model, w, objective)
        return True

    def _begin(self, model, x, y, lab, ids, objective: Objective, kept: Kept, rows: torch.Tensor,
               stream: int) -> _APGDWalk:
        """A walk's working batch at iterate 0 (a random point of the ball, or x), with its loss
        and gradient, iterate 0 offered."""
        s, xs, lab = self.settings, x[rows], lab[rows]
        if s.random_start:
            x_adv = (xs + self.threat.geometry.random(xs, self.threat.eps, s.seed, stream, ids[rows])).clamp_(0, 1)
        else:
            x_adv = xs.clone()
        logits, loss, grad = self._loss_and_grad(model, x_adv, lab, objective.loss)
        n, dev = xs.shape[0], xs.device
        w = _APGDWalk.start(kept, rows, s.keep, x=xs, y=y[rows], lab=lab, x_adv=x_adv, x_prev=x_adv.clone(),
                            grad=grad, x_best=x_adv.clone(), loss_best=loss.clone(), grad_best=grad,
                            loss_prev=loss.clone(), eta=torch.full((n,), s.alpha, device=dev, dtype=xs.dtype),
                            n_incr=torch.zeros(n, device=dev),
                            reduced_last=torch.zeros(n, dtype=torch.bool, device=dev), loss_best_last=loss.clone())
        w.offer(x_adv, loss, *self._verdict(model, x_adv, logits, objective, w.y, w.lab))
        return w

    def _walk(self, model, w: _APGDWalk, objective: Objective) -> None:
        """One APGD walk of ``steps`` iterations from iterate 0 (``_begin``'s w); each sample's
        first fooling iterate, else its highest-loss one, goes into ``w.into``. An iterate is
        offered right after its forward pass, before a checkpoint may send the walk back to x_max."""
        ckpts = checkpoints(self.settings.steps)
        since_last = {b: b - a for a, b in zip(ckpts, ckpts[1:])}  # w_j -> w_j - w_{j-1}
        for i in range(self.settings.steps):
            if self.settings.early_stop and not w.drop_fooled():
                return
            self._momentum_step(w, i)
            self._evaluate(model, w, objective, last=i + 1 == self.settings.steps)
            if i + 1 in since_last:
                self._checkpoint(w, since_last[i + 1])
        w.store()

    def _project(self, x_new: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """P: the closest point of the eps-ball around x, then into the image box."""
        return (x + self.threat.geometry.project(x_new - x, self.threat.eps)).clamp_(0, 1)

    def _momentum_step(self, w: _APGDWalk, i: int) -> None:
        """z = P(x_k + eta step(grad)),  x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1})),
        a = momentum (1 at k = 0)."""
        a = 1.0 if i == 0 else self.settings.momentum
        z = self._project(w.x_adv + per_sample(w.eta, w.x_adv) * self.threat.geometry.step(w.grad, 1.0), w.x)
        x_next = self._project(w.x_adv + a * (z - w.x_adv) + (1 - a) * (w.x_adv - w.x_prev), w.x)
        w.x_prev, w.x_adv = w.x_adv, x_next

    def _evaluate(self, model, w: _APGDWalk, objective: Objective, last: bool) -> None:
        """The new iterate's loss (and gradient, but for the last one: nobody steps from it), the
        iterate offered, the count of loss increases, and the best point so far."""
        if last:
            logits, loss = self._loss(model, w.x_adv, w.lab, objective.loss)
            w.grad = None
        else:
            logits, loss, w.grad = self._loss_and_grad(model, w.x_adv, w.lab, objective.loss)
        w.offer(w.x_adv, loss, *self._verdict(model, w.x_adv, logits, objective, w.y, w.lab))
        w.n_incr += (loss > w.loss_prev).to(w.n_incr.dtype)
        w.loss_prev = loss
        better = loss > w.loss_best
        w.x_best = torch.where(per_sample(better, w.x_adv), w.x_adv, w.x_best)
        w.loss_best = torch.where(better, loss, w.loss_best)
        if w.grad is not None:
            w.grad_best = torch.where(per_sample(better, w.grad), w.grad, w.grad_best)

    def _checkpoint(self, w: _APGDWalk, h: int) -> None:
        """At checkpoint w_j, h iterations after w_{j-1}: halve the step size of a sample and go
        back to its best point x_max when (a) fewer than rho * h of the steps since increased the
        loss, or (b) its step size and its best loss f_max did not change since w_{j-1}."""
        red = (w.n_incr < self.settings.rho * h) | (~w.reduced_last & (w.loss_best <= w.loss_best_last))
        back = per_sample(red, w.x_adv)
        w.eta = torch.where(red, w.eta / 2, w.eta)
        w.x_adv = torch.where(back, w.x_best, w.x_adv)  # x_prev stays: the momentum is x_max - x^(k-1)
        w.loss_prev = torch.where(red, w.loss_best, w.loss_prev)  # the walk goes on from x_max
        if w.grad is not None:
            w.grad = torch.where(back, w.grad_best, w.grad)
        w.reduced_last = red
        w.loss_best_last = w.loss_best.clone()
        w.n_incr = torch.zeros_like(w.n_incr)


@ATTACKS.register("apgd-ce", aliases=("apgd",),
                  help="APGD-CE (Croce & Hein 2020): parameter-free PGD, momentum + adaptive step, CE loss")
class APGDCE(APGD):
    """APGD with the cross-entropy loss."""

    name = "apgd-ce"
    defaults = {**APGD.defaults, "loss": "ce"}
    start_stream = 1 * STREAM_BLOCK


@ATTACKS.register("apgd-dlr", help="APGD-DLR (Croce & Hein 2020): APGD on the Difference of Logits Ratio loss")
class APGDDLR(APGD):
    """APGD with the (shift and scale invariant) DLR loss."""

    name = "apgd-dlr"
    defaults = {**APGD.defaults, "loss": "dlr"}
    start_stream = 2 * STREAM_BLOCK


@ATTACKS.register("apgd-t", aliases=("apgd-targeted",),
                  help="APGD-T (Croce & Hein 2020): targeted DLR APGD towards each of the top-k classes")
class APGDT(APGD):
    """APGD-T: for each of the ``n_target_classes`` (default 9) classes t != y with the highest
    clean logits, APGD with the targeted DLR loss towards t, on the samples no earlier target
    fooled. The sample is fooled when its prediction is not y. With ``target=`` given to the call
    it is one targeted APGD towards that target."""

    name = "apgd-t"
    defaults = {**APGD.defaults, "loss": "dlr-targeted"}
    config_class = APGDTConfig
    start_stream = 3 * STREAM_BLOCK

    def planned_forwards(self) -> int:
        return 1 + self.settings.n_target_classes * super().planned_forwards()  # a clean pass, then per target

    def _attack(self, model, x, y, target, ids) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.clone()
        if self.threat.eps == 0:
            return x.clone().clamp_(0, 1)
        loss_fn = losses.get_loss(self.settings.loss, True)
        kept = Kept.start(x.clone())
        if target is not None or self.settings.targeted:
            lab, _ = self._labels(model, x, y, target, ids)
            self._restarts(model, x, y, lab, ids, Objective(loss_fn, True), kept)
            return self._answer(kept.iterate, kept.pred)
        ranked = self._target_classes(model, x, y)
        restarts = self.settings.restarts if self.settings.random_start else 1
        for t in range(ranked.shape[1]):  # targeted loss towards t, success = prediction != y
            if not self._restarts(model, x, y, ranked[:, t], ids, Objective(loss_fn, False), kept, t * restarts):
                break
        return self._answer(kept.iterate, kept.pred)

    def _target_classes(self, model, x, y) -> torch.Tensor:
        """(N, k): per sample the k = min(n_target_classes, C - 1) classes t != y with the
        highest clean logits, best first (one clean forward)."""
        with torch.no_grad():
            logits = self._forward(model, x)
        c = logits.shape[1]
        if c < 4:
            raise AdvbenchError(f"attack {self.name!r}: the targeted DLR loss needs at least 4 classes (got {c})")
        return top_other_classes(logits, y, self.settings.n_target_classes)
