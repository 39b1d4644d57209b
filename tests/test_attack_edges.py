"""Edge cases of the attacks: APGD when its last (gradient-free) iterate fools part of the working
batch, images outside [0, 1], and absurd step / restart counts."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import attacks
from attacks import engine
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.threat import ThreatModel

APGD_NAMES = ("apgd-ce", "apgd-dlr", "apgd-t")
STEPS = (1, 2, 3, 5, 10)
BATCHES = (1, 7, 64)


class LastIterateSpy(nn.Module):
    """Wraps a classifier and counts APGD walks whose final iterate fools some, but not all, of the
    samples still in the working batch. APGD evaluates that iterate with the only no-grad forward
    of a walk (the clean forwards of APGD-T and random targets are no-grad too, but the labels here
    are the clean predictions, so those never fool part of a batch). A row of that forward is
    mapped back to its clean sample by the nearest clean image (eps is far below the distance
    between two random images)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        super().__init__()
        self.model, self.x, self.y = model, x.flatten(1), y
        self.partial = 0

    def forward(self, inp):
        out = self.model(inp)
        if not torch.is_grad_enabled():
            rows = torch.cdist(inp.flatten(1).to(self.x.dtype), self.x).argmin(1)
            fooled = out.argmax(1) != self.y[rows]
            self.partial += int(0 < int(fooled.sum()) < fooled.numel())
        return out


def random_linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def random_cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 3 * 3, 10))


# model -> an eps at which, for some steps and batch sizes, the last iterate fools part of the batch
GRID_EPS = {"linear": 0.01, "cnn": 0.03, "trained-smallcnn": 0.01}
# the trained smallcnn costs 40x the tiny models per step in float64: its few steps are where its
# last iterates fool part of the batch (with more, the batch is mostly fooled before the end)
GRID_STEPS = {"linear": STEPS, "cnn": STEPS, "trained-smallcnn": (1, 2, 3)}


@pytest.mark.parametrize("model_name", list(GRID_EPS))
def test_apgd_when_the_last_iterate_fools_part_of_the_batch(model_name, request):
    if model_name == "trained-smallcnn":
        model = copy.deepcopy(request.getfixturevalue("trained_smallcnn")[0])
    else:
        model = {"linear": random_linear, "cnn": random_cnn}[model_name]()
    # float64: batch-size dependent kernels must not flip a decision in the batch-vs-alone check
    model = model.double().eval()
    threat = ThreatModel("linf", GRID_EPS[model_name])
    g = torch.Generator().manual_seed(0)
    x_all = torch.rand(max(BATCHES), 1, 28, 28, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y_all = model(x_all).argmax(1)
    partial = {name: 0 for name in APGD_NAMES}
    for name in APGD_NAMES:
        extra = {"n_target_classes": 2} if name == "apgd-t" else {}
        for steps in GRID_STEPS[model_name]:
            atk = attacks.create(name, threat=threat, steps=steps, **extra)
            for n in BATCHES:
                case = (name, steps, n)
                x, y = x_all[:n], y_all[:n]
                ids = torch.arange(1000, 1000 + n)
                spy = LastIterateSpy(model, x, y)
                x_adv = atk(spy, x, y, sample_ids=ids)
                partial[name] += spy.partial
                assert not bool(threat.violations(x_adv, x).any()), case
                for i in sorted({0, n // 2, n - 1}):
                    alone = atk(model, x[i:i + 1], y[i:i + 1], sample_ids=ids[i:i + 1])
                    assert torch.allclose(alone, x_adv[i:i + 1], atol=1e-9, rtol=0), (case, i)
                if n == max(BATCHES) and model_name != "trained-smallcnn":  # (there: twice the time)
                    # first-fool: stopping early changes the cost, not the result
                    no_stop = attacks.create(name, threat=threat, steps=steps, early_stop=False, **extra)
                    assert torch.allclose(no_stop(model, x, y, sample_ids=ids), x_adv, atol=1e-9, rtol=0), case
    # the grid must contain the case that used to crash, for every attack
    assert all(partial.values()), partial


# --- images outside [0, 1] ----------------------------------------------------------------------------
RANGE_ERROR = "images must be finite and in [0, 1] (normalisation belongs inside the model)"
BUILTIN = ("fgsm", "bim", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t")


class CountingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.calls = random_linear(), 0

    def forward(self, x):
        self.calls += 1
        return self.body(x)


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("bad", ["0-255", "negative", "nan", "inf"])
def test_images_outside_the_unit_box_are_refused_before_any_forward(name, bad):
    model = CountingModel()
    x = torch.rand(4, 1, 28, 28)
    x = {"0-255": x * 255, "negative": x - 0.01, "nan": x.index_put((torch.tensor(2),), torch.tensor(float("nan"))),
         "inf": x.index_put((torch.tensor(1),), torch.tensor(float("inf")))}[bad]
    atk = attacks.create(name, threat=ThreatModel("linf", 0.1), steps=2)
    with pytest.raises(AdvbenchError) as info:
        atk(model, x, torch.zeros(4, dtype=torch.long))
    assert str(info.value) == RANGE_ERROR
    assert model.calls == 0


def test_the_box_itself_is_accepted_and_evaluate_uses_the_same_check():
    from robustbench_lite import evaluator

    model = random_linear()
    x = torch.zeros(4, 1, 28, 28)
    x[2:] = 1.0
    x_adv = attacks.create("pgd", threat=ThreatModel("linf", 0.1), steps=2)(model, x, torch.zeros(4, dtype=torch.long))
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    with pytest.raises(AdvbenchError) as info:
        evaluator.check_inputs(x * 255, torch.zeros(4, dtype=torch.long), None)
    assert str(info.value) == RANGE_ERROR


# --- absurd step / restart counts ---------------------------------------------------------------------
def test_limits_are_sane():
    # AutoAttack runs 100 steps and 1-5 restarts; the limits only catch typos and overflows
    assert 1_000 <= engine.MAX_STEPS <= 100_000 and 10 <= engine.MAX_RESTARTS <= 10_000


@pytest.mark.parametrize("param, value", [
    ("steps", 1_000_000_000), ("steps", "limit + 1"), ("restarts", 10 ** 23),
    ("restarts", "limit + 1"), ("restarts", "1e23"), ("restarts", 1e23), ("steps", 0), ("steps", -3),
    ("steps", 2.5), ("steps", True),
])
def test_steps_and_restarts_have_an_upper_bound(param, value):
    limit = engine.MAX_STEPS if param == "steps" else engine.MAX_RESTARTS
    value = limit + 1 if value == "limit + 1" else value
    with pytest.raises(AdvbenchError) as info:
        attacks.create("pgd", threat=ThreatModel("linf", 0.1), **{param: value})
    assert str(info.value) == f"invalid {param}={value!r} for attack 'pgd': must be an integer between 1 and {limit}"


def test_the_limits_themselves_are_accepted():
    a = attacks.create("pgd", threat=ThreatModel("linf", 0.1), steps=engine.MAX_STEPS, restarts=engine.MAX_RESTARTS)
    assert (a.steps, a.restarts) == (engine.MAX_STEPS, engine.MAX_RESTARTS)
    from attacks.apgd import MAX_TARGET_CLASSES

    t = attacks.create("apgd-t", threat=ThreatModel("linf", 0.1), n_target_classes=MAX_TARGET_CLASSES)
    assert t.config()["n_target_classes"] == MAX_TARGET_CLASSES


@pytest.mark.parametrize("value", [10 ** 9, 0, "9"])
def test_apgd_t_target_classes_have_an_upper_bound(value):
    from attacks.apgd import MAX_TARGET_CLASSES

    with pytest.raises(AdvbenchError) as info:
        attacks.create("apgd-t", threat=ThreatModel("linf", 0.1), n_target_classes=value)
    assert str(info.value) == (f"invalid n_target_classes={value!r} for attack 'apgd-t': "
                               f"must be an integer between 1 and {MAX_TARGET_CLASSES}")
