"""Smooth activations (Xie et al., Smooth Adversarial Training): values and derivatives against
their formulas, gradcheck in float64, the smooth-backward ReLU, and models built with each."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustbench_lite.errors import AdvbenchError, UnknownNameError
from robustbench_lite.models import create_model
from defenses.activations import ACTIVATIONS

SMOOTH = ("softplus", "silu", "gelu", "elu", "smoothrelu")
ALL = ("relu",) + SMOOTH


def grid(dtype=torch.float64):
    # avoid exactly 0 (ReLU's kink) so numerical derivatives are well defined everywhere
    return torch.cat([torch.linspace(-6, 6, 241, dtype=dtype), torch.tensor([-1e-3, 1e-3, 0.5], dtype=dtype)]) + 1e-7


def f_formula(name, x):
    if name == "relu":
        return torch.clamp(x, min=0)
    if name == "softplus":
        a = 10.0
        return torch.log1p(torch.exp(a * x)) / a
    if name == "silu":
        return x / (1 + torch.exp(-x))
    if name == "gelu":
        return x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    if name == "elu":
        return torch.where(x > 0, x, torch.exp(x) - 1)
    if name == "smoothrelu":
        a = 10.0
        return torch.where(x >= 0, x - torch.log1p(a * x.clamp_min(0)) / a, torch.zeros_like(x))
    raise KeyError(name)


def df_formula(name, x):
    if name == "relu":
        return (x > 0).to(x.dtype)
    if name == "softplus":
        return 1 / (1 + torch.exp(-10 * x))
    if name == "silu":
        s = 1 / (1 + torch.exp(-x))
        return s + x * s * (1 - s)
    if name == "gelu":
        return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    if name == "elu":
        return torch.where(x > 0, torch.ones_like(x), torch.exp(x))
    if name == "smoothrelu":
        return torch.where(x >= 0, 10 * x / (1 + 10 * x.clamp_min(0)), torch.zeros_like(x))
    raise KeyError(name)


def test_registry_has_every_activation():
    assert set(ALL) <= set(ACTIVATIONS.names())
    assert ACTIVATIONS.canonical("SiLU") == "silu" and ACTIVATIONS.canonical("swish") == "silu"
    with pytest.raises(UnknownNameError, match="did you mean 'gelu'"):
        ACTIVATIONS.canonical("gelu2")


@pytest.mark.parametrize("name", ALL)
def test_values_match_formula(name):
    x = grid()
    act = ACTIVATIONS.create(name)
    torch.testing.assert_close(act(x), f_formula(name, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ALL)
def test_autograd_derivative_matches_formula_and_closed_form(name):
    x = grid().requires_grad_(True)
    act = ACTIVATIONS.create(name)
    (g,) = torch.autograd.grad(act(x).sum(), x)
    expected = df_formula(name, x.detach())
    torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(act.derivative(x.detach()), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", SMOOTH)
def test_gradcheck_float64(name):
    act = ACTIVATIONS.create(name)
    x = (torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2)
    x = x[x.abs() > 1e-3].requires_grad_(True)  # smoothrelu's second derivative jumps at 0
    assert torch.autograd.gradcheck(act, (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(act, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", SMOOTH)
def test_smooth_derivative_is_continuous_at_zero(name):
    act = ACTIVATIONS.create(name)
    h = torch.tensor([-1e-6, 1e-6], dtype=torch.float64)
    d = act.derivative(h)
    assert abs(float(d[1] - d[0])) < 1e-4
    # ReLU's derivative jumps by 1 at 0
    r = ACTIVATIONS.create("relu").derivative(h)
    assert float(r[1] - r[0]) == 1.0


def test_softplus_and_smoothrelu_parameters():
    from defenses.activations import SmoothReLU, Softplus

    x = grid()
    torch.testing.assert_close(Softplus(alpha=2.0)(x), F.softplus(x, beta=2.0))
    assert Softplus().alpha == 10.0 and SmoothReLU().alpha == 10.0
    # softplus with alpha=10 approaches ReLU: max gap log(2)/alpha at 0
    assert float((Softplus()(x) - x.clamp_min(0)).abs().max()) <= math.log(2) / 10 + 1e-9
    with pytest.raises(AdvbenchError):
        Softplus(alpha=0)
    with pytest.raises(AdvbenchError):
        SmoothReLU(alpha=-1)


@pytest.mark.parametrize("name", SMOOTH)
def test_smooth_backward_relu_values_are_relu_gradient_is_smooth(name):
    x = grid().requires_grad_(True)
    act = ACTIVATIONS.create("relu", smooth_backward=name)
    y = act(x)
    torch.testing.assert_close(y, F.relu(x.detach()), rtol=0, atol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, df_formula(name, x.detach()), rtol=1e-9, atol=1e-10)
    # the gradient is not ReLU's
    assert not torch.equal(g, (x.detach() > 0).to(g.dtype))


def test_smooth_backward_rejects_unknown_or_non_relu():
    with pytest.raises(UnknownNameError):
        ACTIVATIONS.create("relu", smooth_backward="nope")
    with pytest.raises(AdvbenchError, match="keeps ReLU in the forward pass"):
        create_model("smallcnn", in_channels=1, input_size=28, activation="silu", smooth_backward="gelu")


@pytest.mark.parametrize("model_name", ("smallcnn", "lenet", "resnet18"))
@pytest.mark.parametrize("name", ALL)
def test_any_model_builds_with_any_activation(model_name, name):
    from defenses.activations import Activation

    m = create_model(model_name, in_channels=1, input_size=28, activation=name)
    acts = [mod for mod in m.modules() if isinstance(mod, Activation)]
    assert acts and all(type(a) is type(ACTIVATIONS.create(name)) for a in acts)
    assert not any(isinstance(mod, torch.nn.ReLU) for mod in m.modules())
    if model_name != "resnet18":  # resnet18 forward on CPU is slow-ish; its build is what matters
        out = m(torch.rand(2, 1, 28, 28))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert m.spec["activation"] == name


def test_model_with_smooth_backward_has_relu_values():
    torch.manual_seed(0)
    plain = create_model("smallcnn", in_channels=1, input_size=28)
    smooth = create_model("smallcnn", in_channels=1, input_size=28, smooth_backward="softplus")
    smooth.load_state_dict(plain.state_dict())
    x = torch.rand(3, 1, 28, 28, requires_grad=True)
    torch.testing.assert_close(smooth(x), plain(x))
    g1 = torch.autograd.grad(plain(x).sum(), x)[0]
    g2 = torch.autograd.grad(smooth(x).sum(), x)[0]
    assert not torch.allclose(g1, g2)
    assert smooth.spec["smooth_backward"] == "softplus"
