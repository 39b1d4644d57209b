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
After such a restart the momentum term is zero (x^(k-1) := x_max).

Losses: ``apgd-ce`` cross-entropy; ``apgd-dlr`` the Difference of Logits Ratio (shift and scale
invariant); ``apgd-t`` runs, for each of the top-k (default 9) classes t != y by clean logit,
APGD with the targeted DLR loss towards t on the samples that survived the previous targets.
A sample counts as fooled when its prediction is not y (for apgd-t too: the target is a means),
or, when ``target=`` is passed to the call, when its prediction is the target.

Why a separate loop rather than the engine's (attacks.engine.Attack._restart): APGD carries
per-sample state that PGD does not have — a step size per sample, the previous iterate for the
momentum, counters of loss increases between checkpoints, the best point and its gradient for
restarts — and changes the step size and the iterate per sample at the checkpoints. Folding
that into the engine would complicate FGSM/BIM/PGD's loop for one attack. Everything else is the
engine's: the call contract and input checks (Attack.__call__), the settings (APGDConfig
extends AttackConfig with rho and momentum), attack_mode (eval mode, frozen parameters, restored on exit), the counted
forward (Attack._forward, with optional bf16), target selection (Attack._labels), the
geometry and random starts keyed by sample id (robustbench_lite.threat / rng) and the losses
(attacks.losses). Bookkeeping follows the engine's ``first-fool``: a sample's first fooling
iterate is returned, else its highest-loss iterate; fooled samples leave the batch
(early_stop=True), restarts run only on survivors.

Costs: steps + 1 forwards per restart (the gradient of the last iterate is not needed, so it
gets a no-grad forward) and ``steps`` backwards to the input, on a shrinking batch.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List

import torch

from robustbench_lite.errors import AdvbenchError

from . import losses
from .engine import ATTACKS, Attack, AttackConfig, check_count


# APGD-T attacks one target class after the other (AutoAttack: 9), each costing a full walk; the
# class count less one bounds it anyway (ImageNet: 999), so more than this is a typo.
MAX_TARGET_CLASSES = 1_000


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
        loss_fn = losses.get_loss(self.loss, targeted)
        out, _ = self._restarts(model, x, y, lab, targeted, loss_fn, ids, stream0=0)
        return out

    def _restarts(self, model, x, y, lab, targeted, loss_fn, ids, stream0: int):
        """Run ``restarts`` APGD walks (each on the survivors of the previous ones).
        Returns (x_adv, fooled) for all samples."""
        n = x.shape[0]
        out = x.clone()
        fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
        best_loss = torch.full((n,), float("-inf"), device=x.device)
        restarts = self.restarts if self.random_start else 1
        for r in range(restarts):
            idx = (~fooled).nonzero().reshape(-1)
            if idx.numel() == 0:
                break
            xa, fa, la = self._walk(model, x[idx], y[idx], lab[idx], targeted, loss_fn, ids[idx], stream0 + r)
            take = fa | (la > best_loss[idx])
            out[idx[take]] = xa[take]
            best_loss[idx[take]] = la[take]
            fooled[idx[fa]] = True
        return out, fooled

    def _walk(self, model, x, y, lab, targeted, loss_fn, ids, stream: int):
        """One APGD walk of ``steps`` iterations. Returns (x_adv, fooled, loss) per sample:
        the first fooling iterate, else the highest-loss one."""
        geo, eps, n_iter = self.threat.geometry, self.threat.eps, self.steps
        rho, mom = self.settings.rho, self.settings.momentum
        n, dev = x.shape[0], x.device
        view = (-1,) + (1,) * (x.dim() - 1)

        def proj(xa_, base):
            d = geo.project(xa_ - base, eps)
            return (base + d).clamp_(0, 1)

        def evaluate(inp, lb, need_grad: bool):
            if need_grad:
                inp = inp.detach().requires_grad_(True)
                with torch.enable_grad():
                    logits = self._forward(model, inp)
                    loss = loss_fn(logits, lb)
                    (g,) = torch.autograd.grad(loss.sum(), inp)
                self._stats["backward"] += 1
                self._stats["backward_samples"] += inp.shape[0]
                return logits.detach(), loss.detach(), g.detach()
            with torch.no_grad():
                logits = self._forward(model, inp)
                return logits, loss_fn(logits, lb), None

        def fools(logits, yy, lb):
            pred = logits.argmax(1)
            return pred == lb if targeted else pred != yy

        out_x = x.clone()
        out_fooled = torch.zeros(n, dtype=torch.bool, device=dev)
        out_loss = torch.full((n,), float("-inf"), device=dev)

        if self.random_start:
            x_adv = (x + geo.random(x, eps, self.seed, stream, ids)).clamp_(0, 1)
        else:
            x_adv = x.clone()
        logits, loss, grad = evaluate(x_adv, lab, need_grad=n_iter > 0)
        # working-batch state (rows = samples still being attacked; idx maps them to 0..n-1)
        idx = torch.arange(n, device=dev)
        xw, yw, lw = x, y, lab
        fool = fools(logits, yw, lw)
        x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad
        x_prev = x_adv.clone()
        loss_prev = loss.clone()
        eta = torch.full((n,), float(self.alpha), device=dev, dtype=x.dtype)
        n_incr = torch.zeros(n, device=dev)
        reduced_last = torch.zeros(n, dtype=torch.bool, device=dev)
        loss_best_last = loss_best.clone()
        ckpts = checkpoints(n_iter)
        j = 1

        for i in range(n_iter + 1):
            # record the samples the current iterate fools, then drop them (one sync per step)
            if bool(fool.any()):
                out_x[idx[fool]] = x_adv[fool]
                out_fooled[idx[fool]] = True
                out_loss[idx[fool]] = loss[fool]
                # (after the final iterate nothing is left to step: no shrinking, and its
                # gradient was never computed, so grad is None there)
                if self.early_stop and i < n_iter:
                    keep = (~fool).nonzero().reshape(-1)
                    if keep.numel() == 0:
                        return out_x, out_fooled, out_loss
                    idx, xw, yw, lw = idx[keep], xw[keep], yw[keep], lw[keep]
                    x_adv, x_prev, grad = x_adv[keep], x_prev[keep], grad[keep]
                    x_best, loss_best, grad_best = x_best[keep], loss_best[keep], grad_best[keep]
                    loss_prev, eta, n_incr = loss_prev[keep], eta[keep], n_incr[keep]
                    reduced_last, loss_best_last = reduced_last[keep], loss_best_last[keep]
                    fool = fool[keep]
            if i == n_iter:
                break
            # the step: gradient step, projection, momentum, projection
            a = 1.0 if i == 0 else mom
            z = proj(x_adv + eta.view(view) * geo.step(grad, 1.0), xw)
            x_new = proj(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), xw)
            x_prev, x_adv = x_adv, x_new
            logits, loss, grad = evaluate(x_adv, lw, need_grad=i + 1 < n_iter)
            fool = fools(logits, yw, lw)
            if not self.early_stop:  # fooled samples stay: keep their first fooling iterate
                fool = fool & ~out_fooled[idx]
            n_incr += (loss > loss_prev).to(n_incr.dtype)
            loss_prev = loss
            better = loss > loss_best
            x_best = torch.where(better.view(view), x_adv, x_best)
            loss_best = torch.where(better, loss, loss_best)
            if grad is not None:
                grad_best = torch.where(better.view(view), grad, grad_best)
            # checkpoint w_j: halve the step and restart from the best point where needed
            if j < len(ckpts) and i + 1 == ckpts[j]:
                h = ckpts[j] - ckpts[j - 1]
                cond_a = n_incr < rho * h
                cond_b = ~reduced_last & (loss_best <= loss_best_last)
                red = cond_a | cond_b
                eta = torch.where(red, eta / 2, eta)
                x_adv = torch.where(red.view(view), x_best, x_adv)
                x_prev = torch.where(red.view(view), x_best, x_prev)
                loss_prev = torch.where(red, loss_best, loss_prev)  # the walk goes on from x_max
                if grad is not None:
                    grad = torch.where(red.view(view), grad_best, grad)
                reduced_last = red
                loss_best_last = loss_best.clone()
                n_incr = torch.zeros_like(n_incr)
                j += 1

        # survivors: their highest-loss iterate
        alive = ~out_fooled[idx]
        out_x[idx[alive]] = x_best[alive]
        out_loss[idx[alive]] = loss_best[alive]
        return out_x, out_fooled, out_loss


@ATTACKS.register("apgd-ce", aliases=("apgd",),
                  help="APGD-CE (Croce & Hein 2020): parameter-free PGD, momentum + adaptive step, CE loss")
class APGDCE(APGD):
    """APGD with the cross-entropy loss."""

    name = "apgd-ce"
    defaults = {**APGD.defaults, "loss": "ce"}


@ATTACKS.register("apgd-dlr", help="APGD-DLR (Croce & Hein 2020): APGD on the Difference of Logits Ratio loss")
class APGDDLR(APGD):
    """APGD with the (shift and scale invariant) DLR loss."""

    name = "apgd-dlr"
    defaults = {**APGD.defaults, "loss": "dlr"}


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

    def planned_forwards(self) -> int:
        return 1 + self.settings.n_target_classes * super().planned_forwards()  # a clean pass, then per target

    def _attack(self, model, x, y, target, ids) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.clone()
        if self.threat.eps == 0:
            return x.clone().clamp_(0, 1)
        loss_fn = losses.get_loss(self.loss, True)
        if target is not None or self.targeted:
            lab, _ = self._labels(model, x, y, target, ids)
            out, _ = self._restarts(model, x, y, lab, True, loss_fn, ids, stream0=0)
            return out
        with torch.no_grad():
            logits = self._forward(model, x)
        c = logits.shape[1]
        if c < 4:
            raise AdvbenchError(f"attack {self.name!r}: the targeted DLR loss needs at least 4 classes (got {c})")
        k = min(self.settings.n_target_classes, c - 1)
        ranked = logits.scatter(1, y.reshape(-1, 1), float("-inf")).topk(k, dim=1).indices  # (N, k), t != y
        out = x.clone()
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        restarts = self.restarts if self.random_start else 1
        for t in range(k):
            idx = (~fooled).nonzero().reshape(-1)
            if idx.numel() == 0:
                break
            for r in range(restarts):
                sub = idx[~fooled[idx]]
                if sub.numel() == 0:
                    break
                # targeted loss towards t, success = prediction != y (targeted=False in the fool test)
                xa, fa, la = self._walk(model, x[sub], y[sub], ranked[sub, t], False, loss_fn, ids[sub],
                                        stream=t * restarts + r)
                take = fa | (la > best_loss[sub])
                out[sub[take]] = xa[take]
                best_loss[sub[take]] = la[take]
                fooled[sub[fa]] = True
        return out
