"""Attack strength on a real (standard-trained) network: the orderings the papers predict.

On smallcnn trained on mnist-5k, at L-inf eps = 0.1:
- PGD-40 (Madry et al. 2018) is at least as strong as BIM-10 (Kurakin et al. 2016), which is at
  least as strong as FGSM (Goodfellow et al. 2015): robust accuracy PGD <= BIM <= FGSM (+0.01);
- more random restarts never raise robust accuracy (a restart runs only on the survivors, and
  restart 0 is the same walk whatever the number of restarts).

Uses the session fixture ``trained_smallcnn`` -> (model, x_test, y_test) from tests/conftest.py.
"""
from __future__ import annotations

import pytest
import torch

import attacks
from robustbench_lite.threat import ThreatModel

N = 300
THREAT = ThreatModel("linf", 0.1)
TOL = 0.01


@pytest.fixture(scope="module")
def mnist(request):
    try:
        model, x, y = request.getfixturevalue("trained_smallcnn")
    except pytest.FixtureLookupError:
        pytest.skip("needs the trained_smallcnn fixture of tests/conftest.py")
    return model, x[:N], y[:N]


def robust_accuracy(model, attack, x, y) -> float:
    x_adv = attack(model, x, y)
    assert not THREAT.violations(x_adv, x).any()
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def test_pgd_is_at_least_as_strong_as_bim_and_bim_as_fgsm(mnist):
    model, x, y = mnist
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    acc = {name: robust_accuracy(model, attacks.create(name, threat=THREAT, **kw), x, y)
           for name, kw in (("fgsm", {}), ("bim", {"steps": 10}), ("pgd", {"steps": 40}))}
    assert clean > 0.8, f"the fixture model is not trained (clean accuracy {clean:.3f})"
    assert acc["fgsm"] <= clean + TOL, (clean, acc)
    assert acc["bim"] <= acc["fgsm"] + TOL, acc
    assert acc["pgd"] <= acc["bim"] + TOL, acc
    assert acc["pgd"] < clean, acc  # the attack does something on a standard-trained model


def test_more_restarts_never_raise_robust_accuracy(mnist):
    model, x, y = mnist
    x, y = x[:150], y[:150]  # the ordering holds by construction; a few samples show it
    accs = [robust_accuracy(model, attacks.create("pgd", threat=THREAT, steps=10, restarts=r, seed=0), x, y)
            for r in (1, 3)]
    assert accs[1] <= accs[0], accs
