"""The evaluator: per-attack and worst-case robust accuracy, batching/shard independence, the
threat-model check, NaN models, per-sample outcomes. Tiny random models (fast on CPU), plus the
trained smallcnn fixture for "PGD at eps=0.3 breaks a standard MNIST model"."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import attacks
from attacks.engine import Attack
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.evaluator import EvalResult, evaluate
from robustbench_lite.specs import AttackSpec, parse_attack_specs, resolve_threats
from robustbench_lite.threat import ThreatModel


def tiny_model(seed=0, classes=4, d=36):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, classes))


def tiny_data(n=40, seed=0, model=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    if model is not None:  # make most samples clean-correct so attacks have work to do
        with torch.no_grad():
            pred = model(x).argmax(1)
        keep = torch.rand(n, generator=g) < 0.8
        y = torch.where(keep, pred, y)
    return x, y


@pytest.fixture
def setup():
    m = tiny_model()
    x, y = tiny_data(model=m)
    return m, x, y


ATTACKS3 = [{"name": "fgsm"}, {"name": "bim", "steps": 3}, {"name": "pgd", "steps": 3, "restarts": 2}]


def test_per_attack_numbers_match_running_the_attack_by_hand(setup):
    model, x, y = setup
    threat = ThreatModel("linf", 0.1)
    res = evaluate(model, x, y, ATTACKS3, threat, batch_size=16, seed=3)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    assert res.clean_acc == pytest.approx(float(clean.float().mean()))
    t = res.threats[0]
    ids = torch.arange(len(y))
    for spec in ATTACKS3:
        params = {k: v for k, v in spec.items() if k != "name"}
        atk = attacks.create(spec["name"], threat=threat, seed=3, **params)
        xa = atk(model, x[clean], y[clean], sample_ids=ids[clean])
        with torch.no_grad():
            survived = (model(xa).argmax(1) == y[clean]).sum().item()
        assert t.robust_acc(spec["name"]) == pytest.approx(survived / len(y))
        r = t.attacks[spec["name"]]
        assert r.n_attacked == int(clean.sum())
        assert r.success_rate == pytest.approx(1 - survived / int(clean.sum()))
        assert r.seconds > 0 and r.images_per_s > 0
        assert r.config["attack"] == spec["name"] and r.config["eps"] == 0.1
        if r.n_fooled:
            assert 0 < r.mean_norm <= r.max_norm <= 0.1 + 1e-6


def test_worst_case_is_robust_only_if_every_attack_fails(setup):
    model, x, y = setup
    res = evaluate(model, x, y, ATTACKS3, ThreatModel("l2", 0.5), batch_size=64)
    t = res.threats[0]
    mask = res.clean_correct.clone()
    for r in t.attacks.values():
        mask &= ~r.fooled
    assert torch.equal(t.robust_mask(), mask)
    assert t.worst_case_acc == pytest.approx(mask.float().mean().item())
    assert t.worst_case_acc <= min(t.robust_acc(lab) for lab in t.attacks) + 1e-12
    assert t.worst_case_acc < res.clean_acc  # the attacks do something on this model


def test_results_do_not_depend_on_batching_or_sharding(setup):
    model, x, y = setup
    threats = resolve_threats(eps="0.05,0.2", norm="linf")
    ids = torch.arange(100, 100 + len(y))  # dataset indices, not positions
    full = evaluate(model, x, y, ATTACKS3, threats, batch_size=64, sample_ids=ids, seed=1)
    small = evaluate(model, x, y, ATTACKS3, threats, batch_size=7, sample_ids=ids, seed=1)
    half = len(y) // 2
    shards = [evaluate(model, x[s], y[s], ATTACKS3, threats, batch_size=5, sample_ids=ids[s], seed=1)
              for s in (slice(half, None), slice(0, half))]
    merged = EvalResult.merge(shards)
    for other in (small, merged):
        assert torch.equal(other.sample_ids, full.sample_ids)
        assert torch.equal(other.clean_pred, full.clean_pred)
        for ta, tb in zip(full.threats, other.threats):
            for lab in ta.attacks:
                assert torch.equal(ta.attacks[lab].adv_pred, tb.attacks[lab].adv_pred), lab
                assert torch.equal(ta.attacks[lab].fooled, tb.attacks[lab].fooled), lab
            assert ta.worst_case_acc == tb.worst_case_acc


def test_eps_sweep_and_eps_zero(setup):
    model, x, y = setup
    res = evaluate(model, x, y, "fgsm,pgd", eps=[0.0, 0.05, 0.3], norm="linf", batch_size=32)
    assert [t.threat.eps for t in res.threats] == [0.0, 0.05, 0.3]
    assert res.threats[0].worst_case_acc == pytest.approx(res.clean_acc)  # eps 0 moves nothing
    pgd = [t.robust_acc("pgd") for t in res.threats]
    assert pgd[2] <= pgd[1] <= pgd[0]


def test_misclassified_samples_are_not_attacked_and_outcomes_are_per_sample(setup):
    model, x, y = setup
    res = evaluate(model, x, y, ["fgsm", "pgd"], ThreatModel("linf", 0.1), batch_size=16)
    wrong = ~res.clean_correct
    assert wrong.any()
    for r in res.threats[0].attacks.values():
        assert (r.adv_pred[wrong] == -1).all() and not r.fooled[wrong].any() and r.dist[wrong].isnan().all()
    rows = res.outcome_rows()
    assert len(rows) == len(y)
    assert set(rows[0]) >= {"sample_id", "label", "clean_pred", "fgsm_pred", "fgsm_fooled", "pgd_pred",
                            "pgd_fooled", "worst_case_robust"}
    i = int(wrong.nonzero()[0])
    assert rows[i]["fgsm_pred"] == "" and rows[i]["worst_case_robust"] == 0
    json.dumps(res.summary())  # JSON-able


# -- a cheating attack: the evaluator refuses to record its result ----------------------------------
class _Cheat(Attack):
    """Returns x + 2 eps on one pixel of every other sample: outside the L-inf ball."""

    name = "test-cheat"
    defaults = {"steps": 1}

    def _attack(self, model, x, y, target, ids):
        out = x.clone()
        out[::2].view(out[::2].shape[0], -1)[:, 0] = (x[::2].view(x[::2].shape[0], -1)[:, 0] + 2 * self.threat.eps)
        return out


class _OutOfBox(Attack):
    name = "test-outofbox"
    defaults = {"steps": 1}

    def _attack(self, model, x, y, target, ids):
        return x - 1.0  # norm-wise too far and outside [0, 1]


for _cls in (_Cheat, _OutOfBox):
    if _cls.name not in attacks.ATTACKS.names():
        attacks.ATTACKS.register(_cls.name, _cls)


def test_an_attack_that_leaves_the_threat_model_is_refused():
    model = tiny_model()
    x = torch.full((6, 1, 6, 6), 0.5)
    y = torch.zeros(6, dtype=torch.long)
    with torch.no_grad():
        y = model(x).argmax(1)
    with pytest.raises(AdvbenchError) as e:
        evaluate(model, x, y, ["fgsm", "test-cheat"], ThreatModel("linf", 0.1), batch_size=4)
    msg = str(e.value)
    assert "attack 'test-cheat' violated the threat model linf eps=0.1 on 2 samples" in msg
    assert "worst linf norm 0.2 > eps 0.1" in msg and "refusing to record" in msg
    with pytest.raises(AdvbenchError, match=r"'test-outofbox' violated .* on 6 samples .*outside \[0, 1\]"):
        evaluate(model, x, y, ["test-outofbox"], ThreatModel("linf", 0.1))


def test_a_model_that_outputs_nan_is_an_error():
    model = tiny_model()
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    x, y = tiny_data(8)
    with pytest.raises(AdvbenchError, match=r"^model outputs NaN on 8 of 8 clean inputs"):
        evaluate(model, x, y, ["fgsm"], ThreatModel("linf", 0.1))


def test_bad_inputs_are_errors(setup):
    model, x, y = setup
    with pytest.raises(AdvbenchError, match="in \\[0, 1\\]"):
        evaluate(model, x * 255, y, ["fgsm"], ThreatModel("linf", 0.1))
    with pytest.raises(AdvbenchError, match="labels for"):
        evaluate(model, x, y[:-1], ["fgsm"], ThreatModel("linf", 0.1))
    with pytest.raises(AdvbenchError, match="unknown attack 'pgx'; did you mean 'pgd'"):
        evaluate(model, x, y, "fgsm,pgx", ThreatModel("linf", 0.1))
    with pytest.raises(AdvbenchError, match="invalid steps=0 for attack 'pgd'"):
        evaluate(model, x, y, [{"name": "pgd", "steps": 0}], ThreatModel("linf", 0.1))
    with pytest.raises(AdvbenchError, match="invalid eps"):
        resolve_threats(eps="8/255,x")


def test_attack_specs_labels():
    specs = parse_attack_specs(["ifgsm", {"name": "pgd"}, {"name": "pgd", "steps": 40, "loss": "margin"},
                                AttackSpec("pgd", {"restarts": 2}, "pgd-rr")])
    assert [s.label for s in specs] == ["bim", "pgd", "pgd(loss=margin,steps=40)", "pgd-rr"]
    assert [s.name for s in specs] == ["bim", "pgd", "pgd", "pgd"]
    with pytest.raises(AdvbenchError, match="listed twice"):
        parse_attack_specs("pgd,pgd")


def test_attack_instances_are_accepted_and_reused_for_every_threat(setup):
    model, x, y = setup
    inst = attacks.create("pgd", threat=ThreatModel("linf", 0.5), steps=2, loss="margin", seed=4)
    res = evaluate(model, x, y, [inst], eps="0.05,0.1", batch_size=64)
    for t in res.threats:
        cfg = t.attacks["pgd"].config
        assert (cfg["eps"], cfg["steps"], cfg["loss"], cfg["seed"]) == (t.threat.eps, 2, "margin", 4)
    by_name = evaluate(model, x, y, [{"name": "pgd", "steps": 2, "loss": "margin", "seed": 4}], eps="0.05,0.1")
    for a, b in zip(res.threats, by_name.threats):
        assert a.attacks["pgd"].config == b.attacks["pgd"].config
        assert torch.equal(a.attacks["pgd"].fooled, b.attacks["pgd"].fooled)


def test_pgd_breaks_a_standard_mnist_model_at_eps_03(trained_smallcnn):
    model, x, y = trained_smallcnn
    res = evaluate(model, x[:200], y[:200], ["fgsm", "pgd"], ThreatModel("linf", 0.3), batch_size=200)
    t = res.threats[0]
    assert res.clean_acc > 0.9
    assert t.robust_acc("pgd") <= 0.02
    assert t.robust_acc("pgd") <= t.robust_acc("fgsm") + 1e-9
    assert math.isclose(t.attacks["pgd"].max_norm, 0.3, rel_tol=1e-5)
