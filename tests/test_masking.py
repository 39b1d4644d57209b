"""Gradient-masking checks (robustbench_lite.masking)."""
from __future__ import annotations

import torch
from torch import nn

from robustbench_lite import masking
from robustbench_lite.evaluator import evaluate
from robustbench_lite.threat import ThreatModel


class Quantised(nn.Module):
    """A deliberately gradient-masked model: the input is rounded to 2 grey levels (torch.round
    has a zero gradient, and no straight-through estimator) before the real model."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x))


class Noisy(nn.Module):
    """A randomised model: Gaussian noise on the input, also in eval mode."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + 0.1 * torch.randn_like(x))


def _run(model, x, y, threats, attacks=("fgsm", "pgd")):
    res = evaluate(model, x, y, [{"name": a, "steps": 10} if a == "pgd" else a for a in attacks], threats,
                   batch_size=64, device="cpu")
    return masking.check_run(model, x, y, torch.arange(len(y)), res, n_check=40)


def test_normal_model_triggers_no_warning(trained_smallcnn):
    model, x_test, y_test = trained_smallcnn
    x, y = x_test[:60], y_test[:60]
    threats = [ThreatModel("linf", 0.05), ThreatModel("linf", 0.1)]
    warnings = _run(model, x, y, threats)
    assert warnings == [], [w.message for w in warnings]


def test_quantised_model_triggers_masking_warnings(trained_smallcnn):
    model, x_test, y_test = trained_smallcnn
    masked = Quantised(model).eval()
    x, y = x_test[:60], y_test[:60]
    warnings = _run(masked, x, y, [ThreatModel("linf", 0.05), ThreatModel("linf", 0.1)])
    checks = {w.check for w in warnings}
    assert "zero-gradient" in checks, checks
    assert all(w.flag.startswith("masking:") for w in warnings)


def test_randomised_model_is_flagged(trained_smallcnn):
    model, x_test, y_test = trained_smallcnn
    w = masking.check_model(Noisy(model).eval(), x_test[:20], y_test[:20], torch.arange(20),
                            [ThreatModel("linf", 0.1)])
    assert "random-outputs" in {x.check for x in w}


def _fake_result(accs_by_eps, fgsm_acc=None):
    """An EvalResult-like object with given robust accuracies (10 samples, all clean-correct)."""
    from robustbench_lite.evaluator import AttackResult, EvalResult, ThreatResult

    n = 10
    threats = []
    for eps, acc in accs_by_eps:
        fooled = torch.arange(n) >= round(acc * n)
        atts = {"pgd": AttackResult("pgd", "pgd", {"steps": 10}, torch.zeros(n, dtype=torch.long), fooled,
                                    torch.zeros(n), 0.1)}
        if fgsm_acc is not None:
            atts["fgsm"] = AttackResult("fgsm", "fgsm", {"steps": 1}, torch.zeros(n, dtype=torch.long),
                                        torch.arange(n) >= round(fgsm_acc * n), torch.zeros(n), 0.1)
        threats.append(ThreatResult(ThreatModel("linf", eps), atts, torch.ones(n, dtype=torch.bool)))
    return EvalResult(torch.arange(n), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), threats)


def test_eps_monotonicity_and_fgsm_checks_on_results():
    assert masking.check_results(_fake_result([(0.1, 0.8), (0.2, 0.5)], fgsm_acc=0.9)) == []
    w = masking.check_results(_fake_result([(0.1, 0.5), (0.2, 0.8)]))
    assert {x.check for x in w} == {"eps-monotonic"}
    w = masking.check_results(_fake_result([(0.1, 0.8)], fgsm_acc=0.3))
    assert {x.check for x in w} == {"weaker-than-fgsm"}
