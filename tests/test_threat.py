"""eps parsing, threat models and the per-norm geometry."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from robustbench_lite import rng
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.threat import GEOMETRIES, ThreatModel, format_eps, parse_eps, parse_eps_list


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.03", 0.03), (".5", 0.5), ("0", 0.0),
                                        (" 2/255 ", 2 / 255), ("1", 1.0), (0.3, 0.3), ("1e-2", 0.01)])
def test_parse_eps_accepts(text, value):
    assert parse_eps(text) == pytest.approx(value, abs=0)


@pytest.mark.parametrize("text,message", [
    ("abc", "invalid eps 'abc': expected a non-negative number or fraction such as 8/255, 0.03 or .5"),
    ("8/0", "invalid eps '8/0': division by zero"),
    ("-1", "invalid eps '-1': must be >= 0"),
    ("", "invalid eps '': empty; expected a non-negative number or fraction such as 8/255, 0.03 or .5"),
    ("nan", "invalid eps 'nan': must be a finite number"),
    ("1/2/3", "invalid eps '1/2/3': expected a non-negative number or fraction such as 8/255, 0.03 or .5"),
])
def test_parse_eps_rejects_with_one_clear_message(text, message):
    with pytest.raises(AdvbenchError) as e:
        parse_eps(text)
    assert str(e.value) == message


def test_linf_eps_above_one_is_refused_but_l2_is_not():
    with pytest.raises(AdvbenchError, match=r"invalid eps '2' for linf: images are in \[0, 1\]"):
        parse_eps("2", "linf")
    assert parse_eps("2", "l2") == 2.0


def test_eps_list_and_format():
    assert parse_eps_list("2/255,4/255,8/255") == pytest.approx([2 / 255, 4 / 255, 8 / 255])
    assert format_eps(8 / 255) == "8/255"
    assert format_eps(0.3) == "0.3"
    with pytest.raises(AdvbenchError):
        parse_eps_list("2/255,,8/255")


def test_threat_model_validates_norm():
    assert ThreatModel("Linf", "8/255").eps == pytest.approx(8 / 255)
    with pytest.raises(AdvbenchError, match="invalid norm 'l1'"):
        ThreatModel("l1", 0.1)


@settings(max_examples=60, deadline=None)
@given(num=st.integers(0, 10_000), den=st.integers(1, 10_000))
def test_parse_fraction_property(num, den):
    assert parse_eps(f"{num}/{den}") == num / den


@settings(max_examples=60, deadline=None)
@given(x=st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_parse_number_roundtrip(x):
    assert parse_eps(repr(x)) == x


@settings(max_examples=40, deadline=None)
@given(norm=st.sampled_from(["linf", "l2"]), eps=st.floats(0, 3), seed=st.integers(0, 2**31 - 1),
       scale=st.floats(0.01, 100), d=st.integers(1, 50))
def test_projection_lands_in_ball_and_is_idempotent(norm, eps, seed, scale, d):
    g = GEOMETRIES[norm]
    delta = torch.randn(5, d, generator=torch.Generator().manual_seed(seed)) * scale
    p = g.project(delta, eps)
    assert (g.norm(p) <= eps * (1 + 1e-6) + 1e-7).all()
    assert torch.allclose(g.project(p, eps), p, atol=1e-6)
    inside = g.norm(delta) <= eps
    assert torch.equal(p[inside], delta[inside])  # points already inside do not move


def test_steps_have_the_right_norm():
    grad = torch.randn(4, 3, 8, 8)
    assert torch.equal(GEOMETRIES["linf"].step(grad, 0.1), 0.1 * grad.sign())
    s = GEOMETRIES["l2"].step(grad, 0.5)
    assert torch.allclose(s.flatten(1).norm(dim=1), torch.full((4,), 0.5))
    # and it points along the gradient
    cos = torch.nn.functional.cosine_similarity(s.flatten(1), grad.flatten(1))
    assert torch.allclose(cos, torch.ones(4))


def test_random_points_are_inside_and_uniform():
    like = torch.zeros(4000, 1, 2, 2)  # d = 4
    ids = torch.arange(4000)
    linf = GEOMETRIES["linf"].random(like, 0.3, 0, 0, ids)
    assert linf.abs().max() <= 0.3
    assert abs(linf.mean().item()) < 0.01 and linf.abs().max() > 0.29
    l2 = GEOMETRIES["l2"].random(like, 2.0, 0, 0, ids)
    r = l2.flatten(1).norm(dim=1) / 2.0
    assert (r <= 1 + 1e-6).all()
    # uniform in the 4-ball: P(r <= t) = t^4 (a Gaussian*U(0,1) radius would give P = t)
    for t in (0.5, 0.8, 0.9):
        assert (r <= t).float().mean().item() == pytest.approx(t ** 4, abs=0.03)


def test_rng_depends_on_sample_id_not_on_batch():
    ids = torch.tensor([5, 17, 3])
    batch = rng.uniform(7, 0, ids, (3, 4))
    alone = rng.uniform(7, 0, torch.tensor([17]), (3, 4))
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[1])
    assert not torch.equal(rng.uniform(8, 0, ids, (3, 4)), batch)  # seed matters
    assert not torch.equal(rng.uniform(7, 1, ids, (3, 4)), batch)  # stream matters
    u = rng.uniform(0, 0, torch.arange(100), (1000,))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    z = rng.normal(0, 0, torch.arange(100), (1000,))
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02


def test_violations_flags_out_of_ball_and_out_of_box():
    tm = ThreatModel("linf", 0.1)
    x = torch.full((3, 4), 0.5)
    adv = x.clone()
    adv[1, 0] += 0.2
    adv[2, 0] = 1.01
    assert tm.violations(adv, x).tolist() == [False, True, True]
    assert math.isclose(tm.distance(adv, x)[1].item(), 0.2, rel_tol=1e-5)


@pytest.mark.parametrize("text,message", [
    ("0.0_3", "invalid eps '0.0_3': expected a non-negative number"),        # float() takes '_' separators
    ("٠.٣", "invalid eps '٠.٣': expected a non-negative number"),            # and Arabic-Indic digits
    ("８/２５５", "invalid eps '８/２５５': expected a non-negative number"),  # and full-width ones
    ("1_0/255", "invalid eps '1_0/255': expected a non-negative number"),
    ("1e-400", "invalid eps '1e-400': too small for a float64, it would become 0"),
    ("1e-300/1e300", "invalid eps '1e-300/1e300': too small for a float64, it would become 0"),
    ("inf", "invalid eps 'inf': must be a finite number"),
])
def test_parse_eps_accepts_only_ascii_numbers_and_refuses_underflow(text, message):
    with pytest.raises(AdvbenchError) as e:
        parse_eps(text)
    assert str(e.value).startswith(message)
    assert parse_eps("0e-400") == 0.0 and parse_eps("+5.E-1") == 0.5 and parse_eps("1E+2/4e2") == 0.25


def test_l2_eps_beyond_the_largest_distance_between_images_is_refused():
    ThreatModel("l2", 28).check_input_shape((1, 28, 28))  # sqrt(784) = 28: the corner-to-corner distance
    ThreatModel("linf", 1).check_input_shape((3, 32, 32))
    with pytest.raises(AdvbenchError) as e:
        ThreatModel("l2", 1e300).check_input_shape((1, 28, 28))
    assert str(e.value) == ("eps 1e+300 for l2 exceeds sqrt(784) = 28, the largest L2 distance between 1x28x28 "
                            "images in [0, 1]")
    with pytest.raises(AdvbenchError, match=r"sqrt\(3072\) = 55.43, the largest L2 distance between 3x32x32"):
        ThreatModel("l2", 60).check_input_shape((3, 32, 32))


def test_typical_budgets_per_kind_of_image():
    from robustbench_lite.threat import TYPICAL_EPS

    assert set(TYPICAL_EPS) == {(k, n) for k in ("grey", "colour") for n in ("linf", "l2")}
    grey, colour = (1, 28, 28), (3, 32, 32)
    for norm, eps, shape in (("linf", 0.3, grey), ("linf", 8 / 255, colour), ("linf", 4 / 255, colour),
                             ("l2", 2.0, grey), ("l2", 0.5, colour), ("linf", 0, grey)):
        assert ThreatModel(norm, eps).atypical(shape) is None, (norm, eps)
    assert ThreatModel("linf", 8 / 255).atypical(grey, "mnist-5k") == (
        "linf eps=8/255 is small for mnist-5k (grey-scale 1x28x28 images): typical linf budgets are 0.1-0.4 "
        "(0.3 for MNIST, Madry et al.)")
    assert ThreatModel("linf", 0.3).atypical(colour).startswith(
        "linf eps=0.3 is large for colour 3x32x32 images: typical linf budgets are 2/255-16/255")
    assert ThreatModel("l2", 0.5).atypical(grey).startswith("l2 eps=0.5 is small for grey-scale")
