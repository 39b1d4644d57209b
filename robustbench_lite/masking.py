"""Gradient-masking checks, run after every evaluation (suite.execute_run).

A gradient-based evaluation can over-state robustness when the model hides or breaks its gradient
(obfuscated gradients: Athalye, Carlini & Wagner, ICML 2018; the checks follow Carlini et al.,
"On Evaluating Adversarial Robustness", 2019, and Croce & Hein's sanity checks, ICML 2020).
None of these proves masking; each one that fires says "do not trust these numbers yet":

  eps-monotonic        robust accuracy must not rise with eps (same attack, same norm, eps sweep)
  weaker-than-fgsm     an iterative untargeted attack must be at least as strong as FGSM under the
                       same threat (FGSM from the run, else a quick FGSM on the check subset); a
                       targeted attack (random or least-likely targets) is weaker under untargeted
                       accuracy by design and is not compared
  unbounded-pgd        PGD with a huge budget (linf 0.5; l2 0.5 * sqrt(d), a ball that contains the
                       linf 0.5 ball) must bring accuracy to ~0 %
  zero-gradient        input gradients of the logit margin on clean inputs that are exactly zero
  nan-gradient         ... or not finite
  random-outputs       the same input twice in eval mode gives different logits (a randomised model
                       needs EOT attacks, the `rand` attack suite; single-sample gradients mislead)

The extra checks run on a small subset (the first ``n_check`` clean-correct samples, default 100) and
cost a few hundred forward/backward passes. ``check_run`` returns a list of MaskingWarning; the run
records them in summary.json ("warnings", "masking") and in the leaderboard's ``flags`` column as
``masking:<check>``, and the terminal shows them as yellow ``warning: ...`` lines.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import torch

import attacks
from attacks import attack_mode
from attacks.losses import margin

from .evaluator import accuracy
from .runtime import pct
from .threat import GEOMETRIES, ThreatModel, format_eps

EPS_TOLERANCE = 0.01        # robust accuracy may rise by this much with eps (attack noise)
FGSM_TOLERANCE = 0.02       # an iterative attack may be this much weaker than FGSM
UNBOUNDED_MAX_ACC = 0.05    # accuracy an unbounded PGD must get below
ZERO_GRAD_MAX_FRACTION = 0.1
UNBOUNDED_FRACTION = 0.5   # unbounded PGD's budget: this fraction of the image box's diameter
UNBOUNDED_STEPS = 20


@dataclass
class MaskingWarning:
    check: str            # eps-monotonic, weaker-than-fgsm, unbounded-pgd, zero-gradient, nan-gradient, random-outputs
    message: str
    threat: str = ""      # the threat model it concerns, if any
    value: Optional[float] = None

    @property
    def flag(self) -> str:
        return f"masking:{self.check}"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def check_results(result) -> List[MaskingWarning]:
    """The checks that need only an EvalResult: eps monotonicity and iterative vs FGSM."""
    out: List[MaskingWarning] = []
    by_norm: Dict[str, list] = {}
    for t in result.threats:
        by_norm.setdefault(t.threat.norm, []).append(t)
    for norm, ts in by_norm.items():
        ts = sorted(ts, key=lambda t: t.threat.eps)
        labels = list(ts[0].attacks) + [None]  # None: the worst case
        for lab in labels:
            accs = [(t.threat.eps, t.robust_acc(lab) if lab else t.worst_case_acc) for t in ts]
            for (e0, a0), (e1, a1) in zip(accs, accs[1:]):
                if a1 > a0 + EPS_TOLERANCE:
                    what = lab or "the worst case"
                    out.append(MaskingWarning(
                        "eps-monotonic",
                        f"robust accuracy under {what} rises with eps ({norm}): {pct(a0, 1)} at eps={format_eps(e0)} "
                        f"-> {pct(a1, 1)} at eps={format_eps(e1)}",
                        f"{norm} eps={format_eps(e1)}", a1 - a0))
    for t in result.threats:
        fgsm = [lab for lab, r in t.attacks.items() if r.name == "fgsm"]
        if not fgsm:
            continue
        a_fgsm = min(t.robust_acc(lab) for lab in fgsm)
        for lab, r in _iterative_untargeted(t).items():
            if t.robust_acc(lab) > a_fgsm + FGSM_TOLERANCE:
                out.append(MaskingWarning(
                    "weaker-than-fgsm",
                    f"iterative attack {lab} is weaker than FGSM under {t.threat}: robust accuracy "
                    f"{pct(t.robust_acc(lab), 1)} vs FGSM {pct(a_fgsm, 1)}", str(t.threat), t.robust_acc(lab) - a_fgsm))
    return out


def _iterative_untargeted(threat_result) -> Dict[str, Any]:
    """The attacks of a threat model's results that FGSM is a lower bound for: iterative (more than
    one step) and untargeted (random-target PGD is weaker under untargeted accuracy by design)."""
    return {lab: r for lab, r in threat_result.attacks.items()
            if int(r.config.get("steps", 1) or 1) > 1 and not r.config.get("targeted")}


def check_model(model, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor, threats, result=None,
                seed: int = 0) -> List[MaskingWarning]:
    """The checks that query the model on (x, y) (already a small subset of clean-correct samples):
    random outputs, zero / NaN input gradients, unbounded PGD per norm, FGSM vs iterative attacks
    when the run had no FGSM."""
    if x.shape[0] == 0:
        return []
    with attack_mode(model, "eval"):
        out = _random_outputs(model, x) + _gradients(model, x, y)
    for norm in sorted({t.norm for t in threats}):
        out += _unbounded_pgd(model, x, y, sample_ids, norm, seed)
    if result is not None:
        out += _weaker_than_fgsm(model, x, y, sample_ids, result, seed)
    return out


def _random_outputs(model, x: torch.Tensor) -> List[MaskingWarning]:
    with torch.no_grad():
        z1, z2 = model(x).float(), model(x).float()
    if torch.allclose(z1, z2, rtol=1e-4, atol=1e-5):
        return []
    diff = float((z1 - z2).abs().max())
    return [MaskingWarning("random-outputs", f"the model is randomised: the same inputs twice in eval mode give "
                                             f"logits that differ by up to {diff:.3g}; one gradient is one random "
                                             f"draw, so run the `rand` attack suite (APGD with EOT over 20 gradient "
                                             f"samples) against it", "", diff)]


def _gradients(model, x: torch.Tensor, y: torch.Tensor) -> List[MaskingWarning]:
    """Input gradients of the logit margin that are not finite, or exactly zero."""
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = margin(model(xg).float(), y).sum()
        (g,) = torch.autograd.grad(loss, xg, allow_unused=True)
    flat = (torch.zeros_like(x) if g is None else g).flatten(1)
    nan = ~torch.isfinite(flat).all(1)
    zero = (flat == 0).all(1) & ~nan
    out = []
    if bool(nan.any()):
        out.append(MaskingWarning("nan-gradient", f"input gradients are NaN/inf on {int(nan.sum())} of "
                                  f"{len(nan)} clean inputs", "", float(nan.float().mean())))
    if float(zero.float().mean()) > ZERO_GRAD_MAX_FRACTION:
        out.append(MaskingWarning("zero-gradient", f"input gradients of the logit margin are exactly zero on "
                                  f"{int(zero.sum())} of {len(zero)} clean inputs (a non-differentiable or "
                                  f"saturated model hides its gradient; gradient attacks see nothing: run the "
                                  f"`standard` attack suite, whose square needs no gradients)", "",
                                  float(zero.float().mean())))
    return out


def _unbounded_pgd(model, x, y, sample_ids, norm: str, seed: int) -> List[MaskingWarning]:
    """PGD with a budget of half the image box's diameter (linf 0.5; l2 0.5 sqrt(d), a ball that
    contains the linf 0.5 ball) must bring accuracy to ~0%."""
    geometry = GEOMETRIES[norm]
    th = ThreatModel(norm, UNBOUNDED_FRACTION * geometry.diameter(x[0].numel()))
    atk = attacks.create("pgd", threat=th, steps=UNBOUNDED_STEPS, seed=seed)
    acc = _accuracy(model, atk(model, x, y, sample_ids=sample_ids), y)
    if acc <= UNBOUNDED_MAX_ACC:
        return []
    return [MaskingWarning("unbounded-pgd", f"PGD-{UNBOUNDED_STEPS} with an unbounded budget ({th}) leaves "
                                            f"{pct(acc, 1)} accuracy on {len(y)} samples; it should reach ~0%",
                           str(th), acc)]


def _weaker_than_fgsm(model, x, y, sample_ids, result, seed: int) -> List[MaskingWarning]:
    """Iterative attacks vs a quick FGSM on the subset, for the threat models the run had no FGSM in."""
    pos = {int(i): k for k, i in enumerate(result.sample_ids.tolist())}
    rows = torch.tensor([pos[int(i)] for i in sample_ids.tolist()], dtype=torch.long)
    out = []
    for t in result.threats:
        iterative = _iterative_untargeted(t)
        if any(r.name == "fgsm" for r in t.attacks.values()) or not iterative:
            continue
        fgsm = attacks.create("fgsm", threat=t.threat, seed=seed)
        a_fgsm = _accuracy(model, fgsm(model, x, y, sample_ids=sample_ids), y)
        for lab, r in iterative.items():
            a = 1.0 - float(r.fooled[rows].float().mean())
            if a > a_fgsm + FGSM_TOLERANCE:
                out.append(MaskingWarning(
                    "weaker-than-fgsm", f"iterative attack {lab} is weaker than FGSM under {t.threat} on "
                    f"{len(rows)} samples: robust accuracy {pct(a, 1)} vs FGSM {pct(a_fgsm, 1)}",
                    str(t.threat), a - a_fgsm))
    return out


def _accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    return int(accuracy(model, x, y, batch_size=max(1, len(y)))) / max(1, len(y))


def check_run(model, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor, result, *,
              device=None, seed: int = 0, n_check: int = 100) -> List[MaskingWarning]:
    """All checks for an evaluated run: ``result`` (EvalResult) and the data it was computed on."""
    warnings = check_results(result)
    dev = device if device is not None else x.device
    correct = result.clean_correct
    pos = {int(i): k for k, i in enumerate(sample_ids.tolist())}
    chosen = [pos[int(i)] for i, ok in zip(result.sample_ids.tolist(), correct.tolist()) if ok and int(i) in pos]
    chosen = chosen[:n_check]
    sel = torch.tensor(chosen, dtype=torch.long)
    xs = x[sel.to(x.device)].to(dev)
    ys = torch.as_tensor(y)[sel.to(torch.as_tensor(y).device)].to(dev)
    ids = torch.as_tensor(sample_ids)[sel].to(dev)
    warnings += check_model(model, xs, ys, ids, [t.threat for t in result.threats], result=result, seed=seed)
    return warnings
