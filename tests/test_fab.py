"""FAB-T (attacks.fab): the projection onto a hyperplane inside the box, the call contract (threat
model, box, batch invariance, costs, float32 verdicts under bf16) and agreement with the
reference implementation (pyautoattack's FABAttack_PT, AutoAttack's FAB-T)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import attacks
from attacks.fab import project_onto_plane
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.threat import GEOMETRIES, ThreatModel

REF_NORM = {"linf": "Linf", "l2": "L2"}


def tiny_model(seed: int = 0, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, classes)).eval()


def small_cnn(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 3 * 3, 10)).eval()


def fooled_within(model, threat, x_adv, x, y) -> torch.Tensor:
    """The evaluator's verdict: float32 prediction != y and inside the threat model."""
    with torch.no_grad():
        wrong = model(x_adv).argmax(1) != y
    return wrong & ~threat.violations(x_adv, x)


# --- the projection -------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(norm=st.sampled_from(["linf", "l2"]), n=st.integers(1, 6), d=st.integers(1, 60), seed=st.integers(0, 10_000),
       binary=st.booleans(), sparsity=st.floats(0, 0.9), scale=st.floats(0.01, 10))
def test_projection_is_the_references_and_lands_on_the_plane_inside_the_box(norm, n, d, seed, binary, sparsity,
                                                                            scale):
    ref = pytest.importorskip("pyautoattack.fab_projections")
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, d, generator=g, dtype=torch.float64)
    t = (t > 0.5).to(t.dtype) if binary else t  # points on the faces of the box, as MNIST pixels are
    w = torch.randn(n, d, generator=g, dtype=torch.float64) * (torch.rand(n, d, generator=g) >= sparsity)
    b = torch.randn(n, generator=g, dtype=torch.float64) * scale
    geo = GEOMETRIES[norm]
    d_ours = project_onto_plane(t, w, (w * t).sum(1) - b, geo.step(w, 1.0))
    d_ref = getattr(ref, f"projection_{norm}")(t, w, b)
    z = t + d_ours
    assert bool(((z >= -1e-12) & (z <= 1 + 1e-12)).all())
    # the same norm as the reference (the point itself may differ where the minimiser is not unique)
    assert torch.allclose(geo.norm(d_ours), geo.norm(d_ref), atol=1e-9, rtol=1e-7)
    # on the plane whenever the reference reaches it; else nothing in the box is closer to the plane
    miss_ours, miss_ref = ((w * z).sum(1) - b).abs(), ((w * (t + d_ref)).sum(1) - b).abs()
    assert bool((miss_ours <= miss_ref + 1e-9 * (1 + b.abs())).all())


def test_projection_of_a_point_on_the_plane_does_not_move_it_and_zero_normals_do_not_move():
    t = torch.rand(3, 10)
    w = torch.randn(3, 10)
    w[2] = 0
    c = torch.tensor([0.0, 0.0, 1.0])  # rows 0, 1 on the plane; row 2: no plane to reach
    for geo in GEOMETRIES.values():
        assert torch.equal(project_onto_plane(t, w, c, geo.step(w, 1.0)), torch.zeros_like(t))


# --- the call contract ----------------------------------------------------------------------------
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(norm=st.sampled_from(["linf", "l2"]), eps=st.floats(0.0, 2.0), seed=st.integers(0, 50),
       restarts=st.integers(1, 3), early_stop=st.booleans(), keep=st.sampled_from(["best-loss", "first-fool"]))
def test_threat_model_and_box_hold(norm, eps, seed, restarts, early_stop, keep):
    eps = min(eps, 1.0) if norm == "linf" else eps
    model = tiny_model(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(12, 1, 4, 4, generator=g)
    x[:3] = (x[:3] > 0.5).float()  # on the faces of the box
    y = torch.randint(0, 10, (12,), generator=g)
    th = ThreatModel(norm, eps)
    atk = attacks.create("fab-t", threat=th, steps=6, n_target_classes=3, restarts=restarts, seed=seed,
                         early_stop=early_stop, keep=keep)
    xa = atk(model, x, y)
    assert xa.shape == x.shape and xa.dtype == x.dtype
    assert not bool(th.violations(xa, x).any())
    # a returned point that moved is adversarial (nothing else is returned but the clean point)
    moved = th.distance(xa, x) > 0
    assert bool(fooled_within(model, th, xa, x, y)[moved].all())


@pytest.mark.parametrize("norm, eps", [("linf", 0.04), ("l2", 0.2)])
def test_a_sample_alone_gets_what_it_gets_inside_a_batch(norm, eps):
    model = tiny_model(5).double()  # float64: batch-size dependent kernels must not flip a decision
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 1, 4, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    ids = torch.arange(500, 524)
    for early_stop in (True, False):
        atk = attacks.create("fab-t", threat=ThreatModel(norm, eps), steps=12, n_target_classes=3, restarts=2,
                             early_stop=early_stop)
        full = atk(model, x, y, sample_ids=ids)
        assert torch.equal(full, atk(model, x, y, sample_ids=ids))  # deterministic
        assert 0 < int(fooled_within(model, atk.threat, full, x, y).sum()) < 24  # the case has both kinds
        for i in (0, 5, 11, 23):
            alone = atk(model, x[i:i + 1], y[i:i + 1], sample_ids=ids[i:i + 1])
            assert torch.allclose(alone, full[i:i + 1], atol=1e-9, rtol=0), (early_stop, i)


def test_early_stopping_changes_the_cost_and_the_norms_not_the_verdicts():
    model = tiny_model(5)
    x = torch.rand(60, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x).argmax(1)
    th = ThreatModel("linf", 0.05)
    stop = attacks.create("fab-t", threat=th, steps=20, n_target_classes=3)
    full = attacks.create("fab-t", threat=th, steps=20, n_target_classes=3, early_stop=False)
    x_stop, x_full = stop(model, x, y), full(model, x, y)
    fooled = fooled_within(model, th, x_stop, x, y)
    assert 10 < int(fooled.sum()) < 50
    assert torch.equal(fooled, fooled_within(model, th, x_full, x, y))
    assert stop.last_stats["backward_samples"] < full.last_stats["backward_samples"]
    # early_stop=False keeps shrinking: its smallest-norm point is never farther than the first one
    assert bool((th.distance(x_full, x)[fooled] <= th.distance(x_stop, x)[fooled] + 1e-6).all())
    assert float(th.distance(x_full, x)[fooled].mean()) < float(th.distance(x_stop, x)[fooled].mean())


def test_one_forward_and_one_backward_per_iteration():
    model = tiny_model(2)
    with torch.no_grad():
        model[-1].bias[0] += 1e3  # class 0 wins everywhere in the box: nothing fools, no step goes back
    x = torch.rand(9, 1, 4, 4)
    y = torch.zeros(9, dtype=torch.long)
    atk = attacks.create("fab-t", threat=ThreatModel("l2", 0.5), steps=7, n_target_classes=4)
    assert torch.equal(atk(model, x, y), x)  # every walk runs to its end
    k, steps = 4, 7
    assert atk.last_stats == {"forward": 1 + k * (steps + 1), "backward": k * steps,
                              "forward_samples": 9 * (1 + k * (steps + 1)), "backward_samples": 9 * k * steps}
    assert atk.planned_forwards() == 1 + k * (steps + 1)


def test_a_fooling_iterate_outside_eps_goes_back_with_one_more_pass_of_those_samples():
    model = tiny_model(2)
    x = torch.rand(9, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    k, steps = 4, 7
    atk = attacks.create("fab-t", threat=ThreatModel("l2", 1e-4), steps=steps, n_target_classes=k)
    atk(model, x, y)  # fooling points lie outside so small an eps: they go back towards x
    st = atk.last_stats
    extra, extra_samples = st["backward"] - k * steps, st["backward_samples"] - 9 * k * steps
    assert 0 < extra <= k * (steps - 1) and 0 < extra_samples <= 9 * k * (steps - 1)
    # each going back is one forward and one backward of the samples going back, nothing else
    assert (st["forward"], st["forward_samples"]) == (1 + k * (steps + 1) + extra,
                                                      9 * (1 + k * (steps + 1)) + extra_samples)


def test_registered_with_autoattacks_defaults_and_refuses_bad_settings():
    assert "fab-t" in attacks.names()
    c = attacks.create("fab-targeted", threat=ThreatModel("linf", 0.3)).config()
    assert c["attack"] == "fab-t"
    assert (c["steps"], c["restarts"], c["n_target_classes"]) == (100, 1, 9)
    assert (c["alpha_max"], c["eta"], c["beta"]) == (0.1, 1.05, 0.9)
    for key, value in (("alpha_max", 1.5), ("eta", 0.9), ("beta", 0), ("n_target_classes", 0)):
        with pytest.raises(AdvbenchError, match=f"invalid {key}={value!r} for attack 'fab-t'"):
            attacks.create("fab-t", threat=ThreatModel("linf", 0.1), **{key: value})
    with pytest.raises(AdvbenchError, match="keep='last'"):
        attacks.create("fab-t", threat=ThreatModel("linf", 0.1), keep="last")


def test_explicit_target_counts_only_the_target():
    model = tiny_model(1)
    x = torch.rand(16, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    target = (y + 1) % 10
    th = ThreatModel("linf", 1.0)
    xa = attacks.create("fab-t", threat=th, steps=20)(model, x, y, target=target)
    moved = th.distance(xa, x) > 0
    with torch.no_grad():
        pred = model(xa).argmax(1)
    assert int(moved.sum()) > 0 and bool((pred[moved] == target[moved]).all())


class Bf16Liar(nn.Module):
    """An honest linear model in float32 that, under autocast, calls the clean images it was built
    with misclassified: a sample that leaves on a bf16 verdict is never attacked for real."""

    def __init__(self, clean: torch.Tensor):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.clean = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)), clean.flatten(1)

    def forward(self, x):
        z = self.body(x).float()
        if torch.is_autocast_enabled(x.device.type):
            at_clean = torch.cdist(x.flatten(1).float(), self.clean).amin(1) < 1e-6
            z = torch.where(at_clean[:, None], z.roll(1, dims=1), z)
        return z


def test_under_bf16_a_sample_counts_as_fooled_only_on_float32_logits():
    x = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    model = Bf16Liar(x).eval()
    with torch.no_grad():
        y = model(x).argmax(1)
        assert bool((torch.autocast("cpu", dtype=torch.bfloat16)(model)(x).argmax(1) != y).all())
    th = ThreatModel("linf", 0.5)
    atk = attacks.create("fab-t", threat=th, steps=10, n_target_classes=3, amp="bf16")
    xa = atk(model, x, y)
    assert not bool(th.violations(xa, x).any())
    fooled = fooled_within(model, th, xa, x, y)
    exact = fooled_within(model, th, attacks.create("fab-t", threat=th, steps=10, n_target_classes=3)(model, x, y),
                          x, y)
    assert int(exact.sum()) >= 8 and int(fooled.sum()) >= int(exact.sum()) - 1


# --- strength and agreement with the reference ---------------------------------------------------
def reference_fab_t(model, x, y, threat, steps, k):
    fab_pt = pytest.importorskip("pyautoattack.fab_pt")
    ref = fab_pt.FABAttack_PT(model, norm=REF_NORM[threat.norm], n_restarts=1, n_iter=steps, eps=threat.eps,
                              targeted=True, n_target_classes=k, device=x.device)
    return ref.perturb(x, y)


def compare_with_reference(model, x, y, threat, steps, k):
    """(our fooled, the reference's fooled, our norms, its norms); ours keeps shrinking (no early
    stop) as the reference does, so the norms compare."""
    ours = attacks.create("fab-t", threat=threat, steps=steps, n_target_classes=k, early_stop=False)(model, x, y)
    theirs = reference_fab_t(model, x, y, threat, steps, k)
    return (fooled_within(model, threat, ours, x, y), fooled_within(model, threat, theirs, x, y),
            threat.distance(ours, x), threat.distance(theirs, x))


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
def test_robust_accuracy_and_norms_agree_with_the_reference(trained_smallcnn, norm, eps):
    model, x_test, y_test = trained_smallcnn
    x, y = x_test[:100], y_test[:100]
    ours, theirs, d_ours, d_theirs = compare_with_reference(model, x, y, ThreatModel(norm, eps), steps=10, k=2)
    assert 10 <= int(theirs.sum()) <= 90  # a case that tells attacks apart
    # measured (benchmarks/fab_compare.py --steps 10 --targets 2 --no-early-stop): the same 25 / 23
    # samples fooled, mean norms 0.0452 vs 0.0452 (linf), 0.4897 vs 0.4897 (l2)
    assert int((ours != theirs).sum()) <= 1
    both = ours & theirs
    ratio = float(d_ours[both].mean() / d_theirs[both].mean())
    assert 0.98 <= ratio <= 1.02, ratio


@pytest.mark.slow
@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
def test_autoattacks_fab_t_agrees_with_the_reference(trained_smallcnn, norm, eps):
    model, x_test, y_test = trained_smallcnn
    x, y = x_test[:300], y_test[:300]
    ours, theirs, d_ours, d_theirs = compare_with_reference(model, x, y, ThreatModel(norm, eps), steps=100, k=9)
    assert abs(int(ours.sum()) - int(theirs.sum())) <= 3
    both = ours & theirs
    assert 0.95 <= float(d_ours[both].mean() / d_theirs[both].mean()) <= 1.05


def test_never_above_clean_accuracy_and_fools_a_standard_model(trained_smallcnn):
    model, x_test, y_test = trained_smallcnn
    x, y = x_test[:100], y_test[:100]
    th = ThreatModel("linf", 0.2)
    xa = attacks.create("fab-t", threat=th, steps=20, n_target_classes=3)(model, x, y)
    assert not bool(th.violations(xa, x).any())
    with torch.no_grad():
        clean, robust = model(x).argmax(1) == y, model(xa).argmax(1) == y
    assert not bool((robust & ~clean).any())  # a misclassified sample stays misclassified
    assert float(clean.float().mean()) > 0.8 and float(robust.float().mean()) < 0.15
