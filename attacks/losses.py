"""Attack objectives, in one place.

Every loss maps (logits, labels) to a PER-SAMPLE value that the attack MAXIMISES; the engine sums
it over the batch (so a step does not depend on the batch size) and keeps per-sample values to
pick the highest-loss iterate. Logits arrive in float32 (the engine casts after a bf16 forward).

Each loss has an untargeted form (labels = true classes: push away from them) and a targeted
form (labels = target classes: pull towards them).

- ``ce``: cross-entropy. Untargeted: CE(z, y), the loss of FGSM (Goodfellow et al., ICLR 2015),
  BIM (Kurakin et al., 2016) and PGD (Madry et al., ICLR 2018). Targeted: -CE(z, t).
- ``margin`` (alias ``cw``): the logit margin of Carlini & Wagner ("Towards Evaluating the
  Robustness of Neural Networks", IEEE S&P 2017, objective f6) without the confidence clamp.
  Untargeted: max_{j != y} z_j - z_y (> 0 exactly when the sample is misclassified).
  Targeted: z_t - max_{j != t} z_j (> 0 exactly when the target class wins).
  Unlike CE it does not saturate on confidently classified samples and is invariant to a
  shift of all logits.
- ``kl`` (alias ``trades-kl``): the inner objective of TRADES (Zhang et al., "Theoretically
  Principled Trade-off between Robustness and Accuracy", ICML 2019), KL(p_clean || p_adv) =
  sum_j p_clean,j (log p_clean,j - log p_adv,j). It needs the clean prediction as a reference,
  so it expects logits of shape (N, 2C) = [adversarial logits | clean reference logits] (the
  TRADES method wraps its model to append the reference) and ignores the labels. Meant for
  early_stop=False, keep="last": "fooled" (an argmax over 2C columns) has no meaning for it.
- ``dlr``: Difference of Logits Ratio of APGD (Croce & Hein, ICML 2020), shift- and
  scale-invariant; ``dlr-targeted``: its targeted form (APGD-T), targeted attacks only.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from robustbench_lite.errors import AdvbenchError
from robustbench_lite.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Loss(NamedTuple):
    untargeted: Optional[LossFn]  # None: the loss is targeted only (dlr-targeted)
    targeted: Optional[LossFn]  # None: the loss has no targeted form


LOSSES = Registry("loss")


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def ce_targeted(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits, target, reduction="none")


def _split(logits: torch.Tensor, labels: torch.Tensor):
    """(z_label, max over the other classes)."""
    z_label = logits.gather(1, labels.reshape(-1, 1)).reshape(-1)
    is_label = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels.reshape(-1, 1), True)
    z_other = logits.masked_fill(is_label, float("-inf")).amax(dim=1)
    return z_label, z_other


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z_y, z_other = _split(logits, y)
    return z_other - z_y


def margin_targeted(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    z_t, z_other = _split(logits, target)
    return z_t - z_other


LOSSES.register("ce", Loss(ce, ce_targeted), aliases=("xent", "cross-entropy", "cross_entropy"),
                help="cross-entropy (targeted: minus the CE of the target class)")
LOSSES.register("margin", Loss(margin, margin_targeted), aliases=("cw", "cw-margin"),
                help="Carlini-Wagner logit margin (targeted: target logit minus the best other)")


def kl(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRADES' inner objective (Zhang et al., ICML 2019): KL(p_ref || p) per sample, where the
    model's output is [z | z_ref] concatenated along dim 1 (2C columns): z the logits of the
    perturbed input, z_ref fixed reference logits (the clean input's). Labels are not used.
    defenses.methods (TRADES) wraps the model so that it returns this layout."""
    z, z_ref = logits.chunk(2, dim=1)
    log_ref = F.log_softmax(z_ref, dim=1)
    return (log_ref.exp() * (log_ref - F.log_softmax(z, dim=1))).sum(dim=1)


def kl_targeted(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -kl(logits, labels)


LOSSES.register("kl", Loss(kl, kl_targeted), aliases=("trades-kl",),
                help="TRADES KL(p_ref || p); the model must output [z | z_ref] (used by defenses.trades)")


def _sorted_desc(logits: torch.Tensor) -> torch.Tensor:
    return logits.sort(dim=1, descending=True).values


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein, ICML 2020, eq. 5), untargeted, to maximise:
    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), pi the logits sorted in decreasing order.
    Invariant to a shift AND a positive rescaling of the logits (unlike CE and the CW margin)."""
    z_y, z_other = _split(logits, y)
    zs = _sorted_desc(logits)
    return -(z_y - z_other) / (zs[:, 0] - zs[:, 2] + 1e-12)


def dlr_targeted(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce & Hein, ICML 2020, eq. 6), to maximise:
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12); needs >= 4 classes. With the registry's
    (logits, target) signature, z_y is replaced by the best non-target logit max_{i != t} z_i.
    While the sample is still classified as y (t != y) that IS z_y, so this equals the paper's
    targeted DLR on every sample an attack still works on (APGD-T drops fooled samples from its
    batch)."""
    z_t, z_other = _split(logits, target)
    zs = _sorted_desc(logits)
    return -(z_other - z_t) / (zs[:, 0] - (zs[:, 2] + zs[:, 3]) / 2 + 1e-12)


LOSSES.register("dlr", Loss(dlr, dlr_targeted),
                help="Croce-Hein Difference of Logits Ratio (targeted: the targeted DLR of APGD-T)")
LOSSES.register("dlr-targeted", Loss(None, dlr_targeted), aliases=("dlr-t",),
                help="targeted DLR of APGD-T (targeted attacks only)")


def check_loss(name: str) -> str:
    """Canonical loss name; an unknown one is an AdvbenchError naming the parameter ``loss``."""
    if not isinstance(name, str):
        raise AdvbenchError(f"invalid loss={name!r}: expected one of {', '.join(LOSSES.names())}")
    return LOSSES.canonical(name)  # UnknownNameError: "unknown loss 'x'; did you mean ...?"


def get_loss(name: str, targeted: bool) -> LossFn:
    """The per-sample objective to maximise for ``name`` in its (un)targeted form."""
    key = check_loss(name)
    spec: Loss = LOSSES.get(key)
    if not targeted:
        if spec.untargeted is None:
            raise AdvbenchError(f"loss {key!r} is targeted only: use it with a target")
        return spec.untargeted
    if spec.targeted is None:
        raise AdvbenchError(f"loss {key!r} has no targeted form: use it without a target")
    return spec.targeted
