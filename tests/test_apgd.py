"""APGD-CE / APGD-DLR / APGD-T (attacks.apgd) and the DLR losses."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import attacks
from attacks import losses
from attacks.apgd import checkpoint_fractions, checkpoints
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.threat import ThreatModel


def tiny_model(seed: int = 0, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, classes))


# --- losses --------------------------------------------------------------------------------------
def test_dlr_on_hand_made_logits():
    z = torch.tensor([[5.0, 3.0, 1.0, 0.0], [1.0, 4.0, 2.0, 0.0]])
    y = torch.tensor([0, 0])
    v = losses.get_loss("dlr", False)(z, y)
    # row 0: -(5 - 3) / (5 - 1); row 1: -(1 - 4) / (4 - 1)
    assert torch.allclose(v, torch.tensor([-0.5, 1.0]))
    # shift and positive scale invariance
    assert torch.allclose(losses.dlr(3 * z + 7, y), v, atol=1e-6)


def targeted_dlr_of_the_paper(z, y, t):
    """Croce & Hein (2020), eq. 6: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)."""
    z_y, z_t = z.gather(1, y.reshape(-1, 1)).reshape(-1), z.gather(1, t.reshape(-1, 1)).reshape(-1)
    zs = z.sort(dim=1, descending=True).values
    return -(z_y - z_t) / (zs[:, 0] - (zs[:, 2] + zs[:, 3]) / 2 + 1e-12)


def test_targeted_dlr_on_hand_made_logits():
    z = torch.tensor([[5.0, 3.0, 1.0, 0.0, -1.0]])
    y, t = torch.tensor([0]), torch.tensor([2])
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = -(5 - 1) / (5 - 0.5)
    expected = torch.tensor([-4.0 / 4.5])
    assert torch.allclose(targeted_dlr_of_the_paper(z, y, t), expected)
    # the registry's (logits, target) form equals the paper's while the sample is classified as y
    assert torch.allclose(losses.get_loss("dlr", True)(z, t), expected)
    assert torch.allclose(losses.get_loss("dlr-targeted", True)(z, t), expected)
    with pytest.raises(AdvbenchError, match="targeted only"):
        losses.get_loss("dlr-targeted", False)


# --- step-size schedule -----------------------------------------------------------------------------
def test_checkpoint_sequence():
    p = checkpoint_fractions()
    assert p == pytest.approx([0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99])
    assert checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    w = checkpoints(10)
    assert w[0] == 0 and all(b > a for a, b in zip(w, w[1:])) and w[-1] <= 10


# --- the call contract ------------------------------------------------------------------------------
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(norm=st.sampled_from(["linf", "l2"]), eps=st.floats(0.01, 1.0), seed=st.integers(0, 50),
       name=st.sampled_from(["apgd-ce", "apgd-dlr", "apgd-t"]))
def test_constraints_hold(norm, eps, seed, name):
    model = tiny_model(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(12, 1, 4, 4, generator=g)
    y = torch.randint(0, 10, (12,), generator=g)
    th = ThreatModel(norm, eps)
    atk = attacks.create(name, threat=th, steps=6, n_target_classes=2) if name == "apgd-t" \
        else attacks.create(name, threat=th, steps=6)
    xa = atk(model, x, y)
    assert xa.shape == x.shape
    assert not bool(th.violations(xa, x).any())
    assert atk.last_stats["forward"] > 0 and atk.last_stats["backward"] > 0


def test_mode_and_flags_restored():
    model = tiny_model()
    model.train()
    model[1].weight.requires_grad_(False)
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 10, (8,))
    for name in ("apgd-ce", "apgd-t"):
        attacks.create(name, threat=ThreatModel("linf", 0.1), steps=4)(model, x, y)
        assert model.training and model[3].training
        assert not model[1].weight.requires_grad and model[4].weight.requires_grad


def test_registered_config_and_errors():
    assert {"apgd-ce", "apgd-dlr", "apgd-t"} <= set(attacks.names())
    a = attacks.create("apgd", threat=ThreatModel("linf", 0.3))
    c = a.config()
    assert c["attack"] == "apgd-ce" and c["steps"] == 100 and c["alpha"] == pytest.approx(0.6)
    assert c["rho"] == 0.75 and c["momentum"] == 0.75 and c["loss"] == "ce"
    t = attacks.create("apgd-t", threat=ThreatModel("l2", 1.0), n_target_classes=3)
    assert t.config()["n_target_classes"] == 3 and t.config()["loss"] == "dlr-targeted"
    assert attacks.create("apgd-dlr", threat=ThreatModel("linf", 0.1)).config()["loss"] == "dlr"
    with pytest.raises(AdvbenchError, match="rho"):
        attacks.create("apgd-ce", threat=ThreatModel("linf", 0.1), rho=2)
    with pytest.raises(AdvbenchError, match="unknown parameter"):
        attacks.create("apgd-ce", threat=ThreatModel("linf", 0.1), n_target_classes=3)
    with pytest.raises(AdvbenchError, match="keep"):
        attacks.create("apgd-ce", threat=ThreatModel("linf", 0.1), keep="last")


def test_batch_independent_and_deterministic():
    model = tiny_model(3)
    x, y = torch.rand(10, 1, 4, 4), torch.randint(0, 10, (10,))
    atk = attacks.create("apgd-ce", threat=ThreatModel("linf", 0.2), steps=8)
    full = atk(model, x, y)
    assert torch.equal(full, atk(model, x, y))
    one = atk(model, x[4:5], y[4:5], sample_ids=[4])
    assert torch.allclose(one, full[4:5], atol=1e-6)


def test_explicit_target_as_good_as_targeted_pgd():
    model = tiny_model(1)
    x = torch.rand(16, 1, 4, 4)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    target = (y + 1) % 10
    th = ThreatModel("linf", 1.0)

    def hit(atk):
        with torch.no_grad():
            return float((model(atk(model, x, y, target=target)).argmax(1) == target).float().mean())

    apgd = hit(attacks.create("apgd-ce", threat=th, steps=20))
    # a linear-ish model on a bounded box cannot reach every class; compare with targeted PGD
    assert apgd > 0 and apgd >= hit(attacks.create("pgd", threat=th, steps=20)) - 0.07


# --- strength ------------------------------------------------------------------------------------
def test_apgd_ce_at_least_as_strong_as_pgd10(trained_smallcnn):
    model, x_test, y_test = trained_smallcnn
    x, y = x_test[:100], y_test[:100]
    th = ThreatModel("linf", 0.1)

    def acc(atk):
        xa = atk(model, x, y)
        assert not bool(th.violations(xa, x).any())
        with torch.no_grad():
            return float((model(xa).argmax(1) == y).float().mean())

    pgd = acc(attacks.create("pgd", threat=th, steps=10))
    apgd = acc(attacks.create("apgd-ce", threat=th, steps=20))
    apgd_t = acc(attacks.create("apgd-t", threat=th, steps=10, n_target_classes=2))
    assert apgd <= pgd + 0.02
    assert apgd_t <= pgd + 0.05
