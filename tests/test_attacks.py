"""The attack engine and its FGSM / BIM / PGD plugins, on tiny models built here (fast on CPU)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import attacks
from attacks import losses
from attacks.engine import random_targets
from robustbench_lite.errors import AdvbenchError, UnknownNameError
from robustbench_lite.threat import TOLERANCE, ThreatModel

ATTACK_NAMES = ("fgsm", "bim", "pgd")
NORMS = ("linf", "l2")


def mlp(in_shape, num_classes=4, hidden=16, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    d = math.prod(in_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, num_classes)).to(dtype)


class TinyConvBN(nn.Module):
    """Conv + BatchNorm + Dropout: a model whose train/eval modes differ."""

    def __init__(self, num_classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def linear2(d, seed=0, dtype=torch.float64):
    """A 2-class linear model z = W x + b."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(d, 2)).to(dtype)
    return m


def predictions(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


# -- the threat model is always respected ------------------------------------------------------
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ATTACK_NAMES)
@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 3),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    eps=st.floats(0.0, 1.0),
    eps_scale=st.sampled_from([0.01, 1.0, 4.0]),
    seed=st.integers(0, 2**31 - 1),
    keep=st.sampled_from(["first-fool", "best-loss", "last"]),
    early_stop=st.booleans(),
    restarts=st.integers(1, 2),
    loss=st.sampled_from(["ce", "margin"]),
)
def test_output_stays_in_threat_model_and_box(name, norm, n, c, h, w, eps, eps_scale, seed, keep, early_stop,
                                              restarts, loss):
    eps = eps * eps_scale if norm == "l2" else eps * min(eps_scale, 1.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g)
    x[0].view(-1)[0] = 0.0  # pixels on the box edges
    x[-1].view(-1)[-1] = 1.0
    y = torch.randint(0, 4, (n,), generator=g)
    model = mlp((c, h, w), seed=seed % 1000)
    threat = ThreatModel(norm, eps)
    attack = attacks.create(name, threat=threat, steps=3 if name != "fgsm" else 1, seed=seed, keep=keep,
                            early_stop=early_stop, restarts=restarts, loss=loss)
    x0 = x.clone()
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert torch.equal(x, x0), "the input was modified"
    assert float(threat.distance(x_adv, x).max()) <= eps + TOLERANCE
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert not threat.violations(x_adv, x).any()


# -- closed forms on a linear model ------------------------------------------------------------
def _linear_setup(d=20, n=8, seed=0):
    model = linear2(d, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = 0.3 + 0.4 * torch.rand(n, d, generator=g, dtype=torch.float64)  # far from the box edges
    y = predictions(model, x)  # correctly classified at x, so iterate 0 does not fool
    return model, x, y


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_fgsm_linf_is_eps_times_sign_of_weight_difference(loss):
    model, x, y = _linear_setup()
    w = model[1].weight.detach()  # (2, d)
    eps = 0.1
    x_adv = attacks.create("fgsm", threat=ThreatModel("linf", eps), loss=loss)(model, x, y)
    # d/dx CE = p_{y'} (w_{y'} - w_y) and d/dx margin = w_{y'} - w_y: the sign is sign(w_{y'} - w_y)
    expected = eps * torch.sign(w[1 - y] - w[y])
    assert torch.allclose(x_adv - x, expected, atol=1e-12)


@pytest.mark.parametrize("name", ["fgsm", "bim"])
def test_one_l2_step_moves_exactly_eps_along_normalised_gradient(name):
    model, x, y = _linear_setup()
    w = model[1].weight.detach()
    eps = 0.25
    x_adv = attacks.create(name, threat=ThreatModel("l2", eps), steps=1, alpha=eps)(model, x, y)
    diff = w[1 - y] - w[y]
    expected = eps * diff / diff.norm(dim=1, keepdim=True)
    assert torch.allclose(x_adv - x, expected, atol=1e-12)
    assert torch.allclose((x_adv - x).norm(dim=1), torch.full((len(x),), eps, dtype=x.dtype), atol=1e-12)


def test_bim_on_linear_model_walks_to_the_linf_corner():
    # the gradient sign of a linear model never changes: BIM with steps * alpha >= eps ends at eps * sign
    model, x, y = _linear_setup()
    w = model[1].weight.detach()
    eps = 0.05
    attack = attacks.create("bim", threat=ThreatModel("linf", eps), steps=5, keep="last", early_stop=False)
    x_adv = attack(model, x, y)
    assert torch.allclose(x_adv - x, eps * torch.sign(w[1 - y] - w[y]), atol=1e-12)


# -- simple identities -------------------------------------------------------------------------
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_eps_zero_gives_clean_accuracy(name, norm):
    model = mlp((1, 4, 4))
    x = torch.rand(32, 1, 4, 4)
    y = torch.randint(0, 4, (32,))
    x_adv = attacks.create(name, threat=ThreatModel(norm, 0))(model, x, y)
    assert torch.equal(x_adv, x)
    assert torch.equal(predictions(model, x_adv) == y, predictions(model, x) == y)


@pytest.mark.parametrize("norm", NORMS)
def test_fgsm_equals_one_step_bim(norm):
    model = mlp((1, 5, 5), seed=3)
    x = torch.rand(40, 1, 5, 5)
    y = torch.randint(0, 4, (40,))
    threat = ThreatModel(norm, 0.2 if norm == "linf" else 1.0)
    fgsm = attacks.create("fgsm", threat=threat)(model, x, y)
    bim = attacks.create("bim", threat=threat, steps=1, alpha=threat.eps)(model, x, y)
    assert torch.equal(fgsm, bim)
    # with its default step 1.25 * eps, one BIM step is projected back onto the same point
    bim_default = attacks.create("bim", threat=threat, steps=1)(model, x, y)
    assert torch.allclose(fgsm, bim_default, atol=1e-6)


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_input_is_not_modified(name):
    model = mlp((3, 4, 4))
    x = torch.rand(16, 3, 4, 4)
    y = torch.randint(0, 4, (16,))
    x0, y0 = x.clone(), y.clone()
    attacks.create(name, threat=ThreatModel("linf", 0.1))(model, x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("early_stop", [True, False])
def test_sample_in_batch_equals_sample_alone(norm, early_stop):
    # float64 so that batch-size dependent BLAS kernels cannot flip a gradient sign
    model = mlp((1, 4, 4), seed=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (12,), generator=g)
    ids = torch.arange(100, 112)
    threat = ThreatModel(norm, 0.15 if norm == "linf" else 0.6)
    attack = attacks.create("pgd", threat=threat, steps=4, restarts=2, seed=7, early_stop=early_stop)
    batch = attack(model, x, y, sample_ids=ids)
    for i in (0, 5, 11):
        alone = attack(model, x[i:i + 1], y[i:i + 1], sample_ids=ids[i:i + 1])
        assert torch.allclose(batch[i:i + 1], alone, atol=1e-12, rtol=0)
    # default ids are 0..N-1: sample i of a batch equals sample i alone with sample_ids=[i]
    batch0 = attack(model, x, y)
    alone3 = attack(model, x[3:4], y[3:4], sample_ids=[3])
    assert torch.allclose(batch0[3:4], alone3, atol=1e-12, rtol=0)
    # and the order of the batch does not matter
    perm = torch.randperm(12, generator=g)
    shuffled = attack(model, x[perm], y[perm], sample_ids=ids[perm])
    assert torch.allclose(shuffled, batch[perm], atol=1e-12, rtol=0)


@pytest.mark.parametrize("norm", NORMS)
def test_seed_fixes_the_random_start(norm):
    model = mlp((1, 4, 4))
    x = torch.full((8, 1, 4, 4), 0.5)
    y = torch.zeros(8, dtype=torch.long)
    threat = ThreatModel(norm, 0.1 if norm == "linf" else 0.5)

    def start(seed):  # alpha=0: the output is the random start itself
        return attacks.create("pgd", threat=threat, steps=1, alpha=0.0, seed=seed)(model, x, y) - x

    a, b, c = start(0), start(0), start(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert (a.flatten(1).abs().sum(1) > 0).all()  # every sample was moved
    assert not torch.allclose(a[0], a[1])  # different samples get different noise


def test_first_fool_result_does_not_depend_on_early_stopping():
    model = mlp((1, 4, 4), seed=2, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(30, 1, 4, 4, generator=g, dtype=torch.float64)
    y = predictions(model, x)
    threat = ThreatModel("linf", 0.1)
    on = attacks.create("pgd", threat=threat, steps=6, restarts=2, early_stop=True)
    off = attacks.create("pgd", threat=threat, steps=6, restarts=2, early_stop=False)
    assert torch.allclose(on(model, x, y), off(model, x, y), atol=1e-12, rtol=0)
    # and early stopping spends less
    assert on.last_stats["backward_samples"] < off.last_stats["backward_samples"]


def test_more_restarts_never_unfool_a_sample():
    model = mlp((1, 4, 4), seed=4)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(64, 1, 4, 4, generator=g)
    y = predictions(model, x)
    threat = ThreatModel("linf", 0.05)
    fooled = {}
    for r in (1, 3):
        x_adv = attacks.create("pgd", threat=threat, steps=3, restarts=r)(model, x, y)
        fooled[r] = predictions(model, x_adv) != y
    assert bool((fooled[3] | ~fooled[1]).all())  # fooled with 1 restart => fooled with 3
    assert int(fooled[3].sum()) >= int(fooled[1].sum())


def test_works_under_no_grad_and_leaves_no_parameter_gradients():
    model = mlp((1, 4, 4))
    x = torch.rand(8, 1, 4, 4)
    y = torch.randint(0, 4, (8,))
    with torch.no_grad():
        x_adv = attacks.create("pgd", threat=ThreatModel("linf", 0.1))(model, x, y)
    assert not torch.equal(x_adv, x)
    assert all(p.grad is None for p in model.parameters())
    assert not x_adv.requires_grad


# -- model mode and requires_grad are restored -------------------------------------------------
def _state(model):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("model_mode", ["eval", "train"])
@pytest.mark.parametrize("setup", ["eval", "train", "partially-frozen", "mixed-modes"])
def test_model_mode_and_requires_grad_are_restored(setup, model_mode):
    model = TinyConvBN()
    if setup == "eval":
        model.eval()
    elif setup == "train":
        model.train()
    elif setup == "partially-frozen":
        model.train()
        for p in model.features[0].parameters():
            p.requires_grad_(False)
    else:  # a frozen BN inside a training model
        model.train()
        model.features[1].eval()
        model.head[1].weight.requires_grad_(False)
    before = _state(model)
    stats = model.features[1].running_mean.clone()
    x = torch.rand(10, 1, 6, 6)
    y = torch.randint(0, 3, (10,))
    attacks.create("pgd", threat=ThreatModel("linf", 0.1), steps=2, model_mode=model_mode)(model, x, y)
    assert _state(model) == before
    assert all(p.grad is None for p in model.parameters())
    if model_mode == "eval":  # eval mode: BatchNorm statistics untouched
        assert torch.equal(model.features[1].running_mean, stats)


def test_mode_and_flags_restored_when_the_model_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom")
            return self.lin(x.flatten(1))

    model = Boom().train()
    model.lin.bias.requires_grad_(False)
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        attacks.create("bim", threat=ThreatModel("linf", 0.1), steps=3, early_stop=False)(
            model, torch.rand(3, 1, 2, 2), torch.zeros(3, dtype=torch.long))
    assert _state(model) == before


def test_attack_runs_the_model_in_the_requested_mode():
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            seen.append((self.training, any(p.requires_grad for p in self.parameters())))
            return self.lin(x.flatten(1))

    model = Spy().train()
    x, y = torch.rand(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    attacks.create("bim", threat=ThreatModel("linf", 0.1), steps=2)(model, x, y)
    assert seen and all(s == (False, False) for s in seen)
    seen.clear()
    attacks.create("bim", threat=ThreatModel("linf", 0.1), steps=2, model_mode="train")(model.eval(), x, y)
    assert seen and all(s == (True, False) for s in seen)


# -- random starts are uniform -----------------------------------------------------------------
def test_l2_random_start_is_uniform_in_the_ball():
    d_shape = (1, 2, 2)
    d = 4
    n, eps = 4000, 0.2
    model = mlp(d_shape)
    x = torch.full((n, *d_shape), 0.5)  # eps < 0.5: the box never clips
    y = torch.zeros(n, dtype=torch.long)
    x_adv = attacks.create("pgd", threat=ThreatModel("l2", eps), steps=1, alpha=0.0, early_stop=False)(model, x, y)
    delta = (x_adv - x).flatten(1).double()
    r = delta.norm(dim=1) / eps
    assert float(r.max()) <= 1 + 1e-6
    for q in (0.3, 0.5, 0.7, 0.9):  # volume-uniform: P(||delta|| <= q eps) = q^d
        assert abs(float((r <= q).double().mean()) - q ** d) < 0.03, q
    direction = delta / delta.norm(dim=1, keepdim=True)
    assert float(direction.mean(0).abs().max()) < 0.05  # no preferred direction


def test_linf_random_start_is_uniform_in_the_cube():
    n, eps = 2000, 0.1
    model = mlp((1, 2, 2))
    x = torch.full((n, 1, 2, 2), 0.5)
    y = torch.zeros(n, dtype=torch.long)
    delta = attacks.create("pgd", threat=ThreatModel("linf", eps), steps=1, alpha=0.0)(model, x, y) - x
    u = (delta / eps).flatten()
    assert float(u.abs().max()) <= 1.0
    assert abs(float(u.mean())) < 0.03
    assert abs(float((u.abs() <= 0.5).float().mean()) - 0.5) < 0.03


# -- targeted attacks --------------------------------------------------------------------------
def test_targeted_attacks_reach_their_targets():
    model = mlp((1, 4, 4), num_classes=5, seed=5)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(40, 1, 4, 4, generator=g)
    y = predictions(model, x)
    target = (y + 1) % 5
    threat = ThreatModel("linf", 1.0)  # the whole box: every target is reachable for this model
    for loss in ("ce", "margin"):
        attack = attacks.create("pgd", threat=threat, steps=30, loss=loss)
        x_adv = attack(model, x, y, target=target)
        hit = predictions(model, x_adv) == target
        assert float(hit.float().mean()) > 0.9, loss


def test_random_targets_differ_from_labels_and_do_not_depend_on_batching():
    y = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(0))
    ids = torch.arange(200)
    t = random_targets(y, 10, seed=3, sample_ids=ids)
    assert bool((t != y).all()) and int(t.min()) >= 0 and int(t.max()) <= 9
    assert len(set(t.tolist())) == 10
    assert torch.equal(t[50:60], random_targets(y[50:60], 10, seed=3, sample_ids=ids[50:60]))
    assert not torch.equal(t, random_targets(y, 10, seed=4, sample_ids=ids))


def test_random_and_least_likely_targets_match_explicit_targets():
    model = mlp((1, 4, 4), num_classes=6, seed=6)
    x = torch.rand(20, 1, 4, 4)
    y = predictions(model, x)
    threat = ThreatModel("linf", 0.3)
    a = attacks.create("pgd", threat=threat, steps=3, targeted="random", seed=9)
    explicit = attacks.create("pgd", threat=threat, steps=3, seed=9)
    assert torch.equal(a(model, x, y), explicit(model, x, y, target=random_targets(y, 6, 9, torch.arange(20))))
    ll = attacks.create("pgd", threat=threat, steps=3, targeted="least-likely", seed=9)
    with torch.no_grad():
        least = model(x).argmin(1)
    assert torch.equal(ll(model, x, y), explicit(model, x, y, target=least))


def test_margin_loss_is_positive_exactly_when_fooled():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.5, 4.0]])
    y = torch.tensor([0, 0, 2])
    m = losses.margin(logits, y)
    assert torch.allclose(m, torch.tensor([-2.0, 2.0, -2.5]))
    assert torch.equal(m > 0, logits.argmax(1) != y)
    t = torch.tensor([1, 1, 0])
    mt = losses.margin_targeted(logits, t)
    assert torch.allclose(mt, torch.tensor([-2.0, 1.0, -3.0]))
    assert torch.allclose(losses.ce_targeted(logits, t), -losses.ce(logits, t))


# -- configuration -----------------------------------------------------------------------------
def test_plugins_declare_their_defaults_and_everything_is_overridable():
    threat = ThreatModel("linf", 0.3)
    fgsm, bim, pgd = (attacks.create(n, threat=threat) for n in ATTACK_NAMES)
    assert (fgsm.steps, fgsm.alpha, fgsm.random_start) == (1, 0.3, False)
    assert (bim.steps, bim.random_start, bim.restarts) == (10, False, 1)
    assert bim.alpha == pytest.approx(1.25 * 0.3 / 10)
    assert (pgd.steps, pgd.random_start, pgd.restarts) == (10, True, 1)
    assert pgd.alpha == pytest.approx(2.5 * 0.3 / 10)
    assert attacks.create("pgd", threat=threat, steps=40).alpha == pytest.approx(2.5 * 0.3 / 40)
    p = attacks.create("pgd", threat=threat, steps=7, alpha=0.01, random_start=False, restarts=3, loss="cw",
                       seed=5, early_stop=False, keep="last", model_mode="train")
    cfg = p.config()
    json.dumps(cfg)
    assert cfg == {"attack": "pgd", "norm": "linf", "eps": 0.3, "steps": 7, "alpha": 0.01, "random_start": False,
                   "restarts": 3, "loss": "margin", "targeted": False, "seed": 5, "early_stop": False,
                   "keep": "last", "model_mode": "train", "amp": None, "eot": 1}
    assert attacks.create("ifgsm", threat=threat).name == "bim"
    assert attacks.create("pgd", threat).threat == threat  # threat may also be positional
    assert attacks.create("PGD", eps="8/255", norm="l2").threat == ThreatModel("l2", 8 / 255)
    assert set(ATTACK_NAMES) <= set(attacks.names())


def test_unknown_attack_name_suggests_the_close_match():
    with pytest.raises(UnknownNameError, match="did you mean 'pgd'"):
        attacks.create("pgdd", threat=ThreatModel("linf", 0.1))
    with pytest.raises(AdvbenchError, match="fgsm"):
        attacks.create("fgms", threat=ThreatModel("linf", 0.1))


@pytest.mark.parametrize("kwargs, param", [
    (dict(steps=0), "steps"),
    (dict(steps=-3), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(restarts=0), "restarts"),
    (dict(alpha=-0.1), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(loss="hinge"), "loss"),
    (dict(keep="best"), "keep"),
    (dict(targeted="everything"), "targeted"),
    (dict(targeted=True), "targeted"),
    (dict(model_mode="inference"), "model_mode"),
    (dict(amp="fp8"), "amp"),
    (dict(random_start="yes"), "random_start"),
    (dict(stepz=3), "stepz"),
])
def test_invalid_parameters_are_advbench_errors_naming_the_parameter(kwargs, param):
    with pytest.raises(AdvbenchError, match=param) as info:
        attacks.create("pgd", threat=ThreatModel("linf", 0.1), **kwargs)
    assert "\n" not in str(info.value)


def test_missing_threat_model_is_an_error():
    with pytest.raises(AdvbenchError, match="threat"):
        attacks.create("pgd")


def test_bf16_autocast_hook_keeps_the_contract():
    model = mlp((1, 4, 4))
    x = torch.rand(8, 1, 4, 4)
    y = torch.randint(0, 4, (8,))
    threat = ThreatModel("linf", 0.1)
    x_adv = attacks.create("pgd", threat=threat, amp="bf16", steps=3)(model, x, y)
    assert x_adv.dtype == x.dtype and not threat.violations(x_adv, x).any()


def test_last_stats_count_forward_and_backward_passes():
    model = mlp((1, 4, 4))
    x = torch.rand(8, 1, 4, 4)
    y = predictions(model, x)
    a = attacks.create("pgd", threat=ThreatModel("linf", 1e-4), steps=5, early_stop=False, keep="last")
    a(model, x, y)
    assert a.last_stats == {"forward": 5, "backward": 5, "forward_samples": 40, "backward_samples": 40}
    a = attacks.create("pgd", threat=ThreatModel("linf", 1e-4), steps=5, early_stop=False)
    a(model, x, y)  # keep="first-fool": one more forward, for the final iterate of the unfooled samples
    assert a.last_stats["backward"] == 5 and a.last_stats["forward"] == 6


def test_importing_attacks_stays_light():
    import subprocess
    import sys

    code = ("import sys, attacks; attacks.names(); "
            "heavy = [m for m in ('robustbench_lite.cli', 'robustbench_lite.evaluator', 'robustbench_lite.training') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr
