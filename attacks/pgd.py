"""PGD — Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks" (ICLR 2018): projected gradient ascent on the loss, started from a uniform
random point of the eps-ball, with optional random restarts (a sample counts as robust only if
no restart fools it):

    x_0 = x + U(B_eps),   x_{t+1} = clip_[0,1]( Proj_eps( x_t + alpha * step(grad_x L(x_t, y)) ) )

It is the inner maximisation of the saddle-point problem
min_theta E[ max_{delta in B_eps} L(theta, x + delta, y) ] that adversarial training optimises.
Default step alpha = 2.5 * eps / steps (the engine's default: Madry et al.'s choice scaled to the
step count), so that the walk can cross the ball from any random start.
"""
from __future__ import annotations

from .engine import ATTACKS, Attack


@ATTACKS.register("pgd", help="PGD (Madry et al. 2018): random start + projected gradient ascent, restarts")
class PGD(Attack):
    """PGD (Madry et al. 2018): random start + projected gradient ascent, restarts."""

    name = "pgd"
    defaults = {"steps": 10, "random_start": True, "restarts": 1}
