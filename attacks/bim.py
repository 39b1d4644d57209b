"""BIM / I-FGSM — Kurakin, Goodfellow & Bengio, "Adversarial Examples in the Physical World"
(2016): FGSM repeated with a small step alpha, projected back into the eps-ball (and the image
box) after every step, starting AT x (no random start):

    x_{t+1} = clip_[0,1]( Proj_eps( x_t + alpha * sign(grad_x L(x_t, y)) ) ),   x_0 = x

Kurakin et al. use alpha = 1/255 and min(eps + 4, 1.25 eps) steps (in 0..255 units); here the
number of steps is a parameter and alpha = 1.25 * eps / steps, so the walk can reach the ball's
boundary with a little slack.
"""
from __future__ import annotations

from .engine import ATTACKS, Attack


@ATTACKS.register("bim", aliases=("ifgsm", "i-fgsm"),
                  help="BIM / I-FGSM (Kurakin et al. 2016): iterated FGSM from x, projected each step")
class BIM(Attack):
    """BIM / I-FGSM (Kurakin et al. 2016): iterated FGSM from x, projected each step."""

    name = "bim"
    defaults = {"steps": 10, "random_start": False, "restarts": 1}

    @staticmethod
    def default_alpha(eps: float, steps: int) -> float:
        return 1.25 * eps / steps
