"""Square Attack (attacks.square): its schedule and bumps against the reference, the threat model and
the box, batch invariance, no gradients needed, a gradient-masked model, bf16, and agreement with
AutoAttack's SquareAttack (pyautoattack)."""
from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import attacks
from attacks import square as square_mod
from attacks.square import meta_pseudo_gaussian, square_fraction
from robustbench_lite.checkpoint import build_checkpoint, save_checkpoint
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.models import Quantized
from robustbench_lite.threat import ThreatModel


def reference_square(model, norm: str, eps: float, queries: int, seed: int = 0, rescale: bool = False):
    from pyautoattack.square import SquareAttack

    return SquareAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, n_queries=queries, p_init=0.8,
                        n_restarts=1, seed=seed, device="cpu", resc_schedule=rescale)


def small_cnn(shape, classes: int, seed: int, dtype=torch.float32) -> nn.Module:
    c, h, w = shape
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * h * w, classes)).to(dtype).eval()


def robust_count(model, x_adv, y) -> int:
    with torch.no_grad():
        return int((model(x_adv).argmax(1) == y).sum())


# --- the pieces of the algorithm, against the reference -----------------------------------------------
@pytest.mark.parametrize("rescale", [False, True])
def test_the_schedule_of_p_is_the_references(rescale):
    ref = reference_square(None, "linf", 0.1, 0, rescale=rescale)
    for queries in (100, 1000, 5000, 10000):
        ref.n_queries = queries
        assert [square_fraction(0.8, k, queries, rescale) for k in range(queries)] == \
               [ref.p_selection(k) for k in range(queries)]
    assert square_fraction(0.8, 0, 5000) == 0.8 and square_fraction(0.8, 4999, 5000) == 0.8 / 128


def test_the_l2_bump_is_the_references_meta_pseudo_gaussian():
    ref = reference_square(None, "l2", 1.0, 10)
    for s in range(1, 16):
        expected = torch.zeros(s, s)
        expected[:s // 2] = ref.eta_rectangles(s // 2, s)
        expected[s // 2:] = -ref.eta_rectangles(s - s // 2, s)
        expected /= expected.norm()
        assert torch.allclose(meta_pseudo_gaussian(s).float(), expected, atol=1e-6), s


def test_square_sides():
    linf, l2 = square_mod.SQUARES["linf"](0.3, (1, 28, 28)), square_mod.SQUARES["l2"](2.0, (3, 32, 32))
    assert linf.side(0.8) == 25 and linf.side(0.8 / 512) == 1  # round(sqrt(p h w)), at least 1
    assert l2.side(0.8) == 29 and l2.side(0.8 / 512) == 3  # odd, at least 3
    assert square_mod.SQUARES["l2"](1.0, (1, 2, 7)).side(0.8) == 2  # never beyond the image


# --- the threat model and the box ----------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(norm=st.sampled_from(["linf", "l2"]), eps=st.floats(0.01, 1.0), seed=st.integers(0, 10_000),
       c=st.sampled_from([1, 3]), h=st.integers(1, 9), w=st.integers(1, 9), classes=st.integers(2, 5),
       steps=st.integers(1, 25), targeted=st.sampled_from([False, "random"]))
def test_threat_model_and_box_hold(norm, eps, seed, c, h, w, classes, steps, targeted):
    model = small_cnn((c, h, w), classes, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, c, h, w, generator=g)
    x[0] = 0.0  # the box's corners: every step clips
    x[1] = 1.0
    y = torch.randint(0, classes, (6,), generator=g)
    eps = eps if norm == "linf" else eps * (c * h * w) ** 0.5
    threat = ThreatModel(norm, eps)
    atk = attacks.create("square", threat=threat, steps=steps, restarts=2, seed=seed, targeted=targeted)
    x_adv = atk(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not bool(threat.violations(x_adv, x).any())
    assert atk.last_stats["backward"] == 0 and 0 < atk.last_stats["forward"] <= atk.planned_forwards() + 1


def test_linf_points_lie_on_the_border_where_the_box_allows():
    model = small_cnn((1, 8, 8), 4, 0)
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.4 + 0.3  # room on both sides
    x_adv = attacks.create("square", threat=ThreatModel("linf", 0.2), steps=30)(model, x, torch.zeros(20).long())
    assert torch.allclose((x_adv - x).abs(), torch.full_like(x, 0.2), atol=1e-6)  # stripes and squares: +-eps


# --- randomness keyed by sample id -------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_a_sample_alone_equals_the_sample_in_any_batch(norm, monkeypatch):
    # float64: batch-size dependent kernels must not flip an acceptance
    model = small_cnn((3, 8, 8), 5, 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    ids = torch.arange(100, 112)
    threat = ThreatModel(norm, 0.1 if norm == "linf" else 1.0)
    atk = attacks.create("square", threat=threat, steps=40, restarts=2, seed=3)
    batch = atk(model, x, y, sample_ids=ids)
    robust = robust_count(model, batch, y)
    assert 0 < robust < 12  # some leave early, some run every query: both paths are compared
    for i in (0, 5, 11):
        alone = atk(model, x[i:i + 1], y[i:i + 1], sample_ids=ids[i:i + 1])
        assert torch.allclose(alone, batch[i:i + 1], atol=1e-12, rtol=0), i
    perm = torch.randperm(12, generator=g)
    assert torch.allclose(atk(model, x[perm], y[perm], sample_ids=ids[perm]), batch[perm], atol=1e-12, rtol=0)
    # when fooled samples leave changes the cost, never the result
    no_stop = attacks.create("square", threat=threat, steps=40, restarts=2, seed=3, early_stop=False)
    assert torch.allclose(no_stop(model, x, y, sample_ids=ids), batch, atol=1e-12, rtol=0)
    monkeypatch.setattr(square_mod, "SETTLE_EVERY", 1)
    assert torch.allclose(atk(model, x, y, sample_ids=ids), batch, atol=1e-12, rtol=0)
    # another seed is another attack
    other = attacks.create("square", threat=threat, steps=40, restarts=2, seed=4)(model, x, y, sample_ids=ids)
    assert not torch.equal(other, batch)


# --- no gradients needed -------------------------------------------------------------------------------
class NoGradient(nn.Module):
    """A model without input gradients: its forward runs under torch.no_grad, through a step function."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        with torch.no_grad():
            return self.body(torch.floor(x * 8) / 8)


def test_square_runs_on_a_model_without_gradients():
    model = NoGradient(small_cnn((1, 8, 8), 4, 2))
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    with pytest.raises(RuntimeError):  # a gradient attack cannot run on it
        attacks.create("apgd-ce", threat=ThreatModel("linf", 0.2), steps=2)(model, x, y)
    atk = attacks.create("square", threat=ThreatModel("linf", 0.3), steps=100)
    x_adv = atk(model, x, y)
    assert robust_count(model, x_adv, y) <= 8 and atk.last_stats["backward"] == 0  # clean: 16 of 16


def test_square_breaks_a_gradient_masked_model_that_apgd_cannot(trained_smallcnn):
    body, x, y = trained_smallcnn
    model = Quantized(copy.deepcopy(body)).eval()  # inputs rounded to 4 levels: zero input gradient
    x, y = x[:60], y[:60]
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    x, y = x[ok], y[ok]
    threat = ThreatModel("linf", 0.3)
    apgd = robust_count(model, attacks.create("apgd-ce", threat=threat, steps=10)(model, x, y), y)
    square = robust_count(model, attacks.create("square", threat=threat, steps=100)(model, x, y), y)
    assert apgd >= 0.9 * len(y)  # the zero gradient leaves APGD with its random start
    assert square <= apgd - 0.2 * len(y)  # the bar: at least 20 points below APGD


def test_the_leaderboard_row_of_a_masked_model_shows_square_below_apgd(trained_smallcnn, mnist5k, tmp_path):
    """`advbench attack` on a quantized:smallcnn checkpoint: the model's name says it is quantized, and
    the worst-case row is Square's, far below APGD-CE's."""
    from typer.testing import CliRunner

    from robustbench_lite.cli import app

    body, _, _ = trained_smallcnn
    ckpt = tmp_path / "quantized.pt"
    save_checkpoint(ckpt, build_checkpoint(Quantized(copy.deepcopy(body)), dataset=mnist5k.name))
    results = tmp_path / "results"
    r = CliRunner().invoke(app, ["attack", "--checkpoint", str(ckpt), "--eps", "0.3", "--attack", "apgd-ce,square",
                                 "--steps", "30", "-n", "40", "--results-dir", str(results), "--device", "cpu",
                                 "--json"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == "quantized:smallcnn"
    (t,) = out["threats"]
    apgd, square = t["attacks"]["apgd-ce"]["robust_acc"], t["attacks"]["square"]["robust_acc"]
    assert apgd >= 0.8 and square <= apgd - 0.2, (apgd, square)
    with open(results / "leaderboard.csv") as f:
        rows = {row["attack"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"apgd-ce", "square", "worst-case"}
    assert all(row["model"] == "quantized:smallcnn" for row in rows.values())
    assert float(rows["worst-case"]["robust_acc"]) == float(rows["square"]["robust_acc"]) < \
        float(rows["apgd-ce"]["robust_acc"]) - 0.2


# --- bf16 ------------------------------------------------------------------------------------------
class Bf16Liar(nn.Module):
    """Honest in float32 (a constant margin of 10 for class 0: never fooled); under autocast every
    input looks misclassified (class 1 wins)."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 3, device=x.device) + x.flatten(1)[:, :1] * 0
        logits[:, 0] = 10.0
        if torch.is_autocast_enabled(x.device.type):
            logits[:, 1] = 20.0
        return logits


def test_under_bf16_a_sample_leaves_only_when_float32_logits_agree():
    x = torch.rand(4, 1, 6, 6)
    y = torch.zeros(4, dtype=torch.long)
    atk = attacks.create("square", threat=ThreatModel("linf", 0.1), steps=40, amp="bf16")
    x_adv = atk(Bf16Liar(), x, y)
    assert not bool(ThreatModel("linf", 0.1).violations(x_adv, x).any())
    # had the bf16 verdict of the initial point been trusted, the attack would stop after 1 query
    assert atk.last_stats["forward"] >= 41


def test_bf16_on_a_trained_model(trained_smallcnn):
    model, x, y = trained_smallcnn
    x, y = x[:32], y[:32]
    threat = ThreatModel("linf", 0.2)
    fp32 = attacks.create("square", threat=threat, steps=50)(model, x, y)
    bf16 = attacks.create("square", threat=threat, steps=50, amp="bf16")(model, x, y)
    assert not bool(threat.violations(bf16, x).any())
    assert abs(robust_count(model, bf16, y) - robust_count(model, fp32, y)) <= 4


# --- settings --------------------------------------------------------------------------------------
def test_defaults_are_autoattacks():
    d = attacks.defaults("square")
    assert (d["steps"], d["restarts"], d["p_init"], d["loss"], d["rescale_schedule"]) == (5000, 1, 0.8, "margin",
                                                                                          False)
    assert {"p_init", "rescale_schedule"} <= set(attacks.parameters("square"))
    atk = attacks.create("square", threat=ThreatModel("l2", 0.5))
    assert atk.planned_forwards() == 5001 and atk.alpha == 0.0 and "square" in attacks.names()


@pytest.mark.parametrize("settings_, message", [
    ({"p_init": 0}, "invalid p_init=0 for attack 'square': must be a number in (0, 1]"),
    ({"p_init": 1.5}, "invalid p_init=1.5 for attack 'square': must be a number in (0, 1]"),
    ({"p_init": True}, "invalid p_init=True for attack 'square': must be a number in (0, 1]"),
    ({"rescale_schedule": "yes"}, "invalid rescale_schedule='yes' for attack 'square': must be True or False"),
    ({"loss": "ce"}, "invalid loss='ce' for attack 'square': Square minimises the margin loss"),
    ({"keep": "last"}, "invalid keep='last' for attack 'square': Square returns the first fooling point, "
                       "else the lowest-margin one"),
    ({"alpha": 0.1}, "invalid alpha=0.1 for attack 'square': Square has no step size (its squares are set to "
                     "the border of the ball)"),
    ({"random_start": False}, "invalid random_start=False for attack 'square': Square starts from a random "
                              "point of the ball's border"),
])
def test_bad_settings_are_refused(settings_, message):
    with pytest.raises(AdvbenchError) as info:
        attacks.create("square", threat=ThreatModel("linf", 0.1), **settings_)
    assert str(info.value) == message


def test_images_outside_the_box_are_refused_and_eps_zero_returns_x():
    model = small_cnn((1, 4, 4), 3, 0)
    atk = attacks.create("square", threat=ThreatModel("linf", 0.1), steps=3)
    with pytest.raises(AdvbenchError, match=r"images must be finite and in \[0, 1\]"):
        atk(model, torch.rand(2, 1, 4, 4) * 255, torch.zeros(2).long())
    x = torch.rand(3, 1, 4, 4)
    assert torch.equal(attacks.create("square", threat=ThreatModel("l2", 0), steps=3)(model, x, torch.zeros(3).long()), x)
    assert atk(model, x[:0], torch.zeros(0).long()).shape == (0, 1, 4, 4)


# --- agreement with the reference ------------------------------------------------------------------------
def reference_positions(u, s, size):
    """The reference's square positions: uniform in [0, size - s - 1] (it never draws size - s)."""
    start = (u * max(size - s, 1)).long().clamp_(max=max(size - s - 1, 0))
    local = torch.arange(size, device=u.device).reshape(1, -1) - start.reshape(-1, 1)
    return local, (local >= 0) & (local < s)


@pytest.mark.slow  # about a minute of CPU each on 2 cores (the reference and ours on the trained smallcnn)
@pytest.mark.parametrize("norm, eps, n", [("linf", 0.2, 200), ("l2", 2.0, 100)])
def test_robust_accuracy_agrees_with_the_reference(trained_smallcnn, monkeypatch, norm, eps, n):
    """Robust accuracy of our square vs pyautoattack's SquareAttack (AutoAttack's settings: p_init 0.8,
    the schedule on the iteration count, one restart), 150 queries, seed 0, on the trained smallcnn.

    Exact equality is impossible: we draw the squares and signs per sample (keyed by sample id), the
    reference one draw per iteration for the whole batch. Per sample both draw from the same
    distribution, so the robust counts agree in expectation, up to seed noise. Measured over seeds
    0-5 (same model, images, settings), robust counts: linf (189 clean-correct) reference
    152-154 (mean 153.3, sd 1.0), ours 148-153 (150.7, sd 1.6), ours with the reference's
    square positions 150-154 (152.3, sd 1.6); l2 (96 clean-correct) reference 71-75 (72.8, sd 1.6),
    ours 71-73 (72.2, sd 0.8). The sd of a difference of two runs is about 2, so a tolerance of 6
    samples is 3 sd: a real change of the algorithm moves the count by more (a proposal that is
    never accepted leaves ~180 robust, a square of the wrong size ~10 more).
    Our default is stronger than the reference in linf (lower count: 2.6 on average) for one
    documented reason only, the reference never places a square at the last row or column; with
    its positions replicated (monkeypatched below) the difference disappears."""
    model, x, y = trained_smallcnn
    x, y = x[:n], y[:n]
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    x, y = x[ok], y[ok]
    ref = robust_count(model, reference_square(model, norm, eps, 150).perturb(x, y), y)
    atk = attacks.create("square", threat=ThreatModel(norm, eps), steps=150)
    ours = robust_count(model, atk(model, x, y), y)
    assert abs(ours - ref) <= 6, (ours, ref)
    assert ours <= ref + 3, (ours, ref)  # never weaker beyond the noise
    if norm == "linf":
        monkeypatch.setattr(square_mod, "_window", reference_positions)
        same_positions = robust_count(model, atk(model, x, y), y)
        assert abs(same_positions - ref) <= 6, (same_positions, ref)
