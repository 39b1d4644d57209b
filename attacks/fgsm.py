"""FGSM — Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples"
(ICLR 2015): one step of size eps from the clean input,

    x_adv = clip_[0,1](x + eps * sign(grad_x L(x, y)))           (L-inf)
    x_adv = clip_[0,1](x + eps * grad_x L / ||grad_x L||_2)      (L2, "fast gradient method")
"""
from __future__ import annotations

from .engine import ATTACKS, Attack


@ATTACKS.register("fgsm", aliases=("fgm",), help="FGSM (Goodfellow et al. 2015): one eps-sized gradient-sign step")
class FGSM(Attack):
    """FGSM (Goodfellow et al. 2015): one eps-sized gradient-sign step."""

    name = "fgsm"
    defaults = {"steps": 1, "random_start": False, "restarts": 1}

    @staticmethod
    def default_alpha(eps: float, steps: int) -> float:
        return eps  # the whole budget in one step
