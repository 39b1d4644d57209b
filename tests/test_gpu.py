"""The CUDA paths (skipped by default and where there is no GPU: run with `pytest -m gpu`).

Each fast path must agree with the float32 default: attacks (bf16 autocast, channels_last,
torch.compile) and a training run (bf16, channels_last)."""
import pytest
import torch

import attacks
from robustbench_lite.threat import ThreatModel
from robustbench_lite.runtime import SILENT
from robustbench_lite.training import TrainConfig, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _robust_acc(model, x, y, **kw):
    atk = attacks.create("pgd", threat=ThreatModel("linf", 0.15), steps=10, **kw)
    xa = atk(model, x, y)
    assert (xa - x).abs().max() <= 0.15 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        return (model(xa).argmax(1) == y).float().mean().item()


def test_attack_fast_paths_agree_on_cuda(trained_smallcnn):
    import copy

    from robustbench_lite.runtime import accelerate, to_memory_format

    dev = torch.device("cuda")
    net, x, y = trained_smallcnn
    model = copy.deepcopy(net).to(dev)  # the session fixture stays on the CPU
    x, y = x[:500].to(dev), y[:500].to(dev)
    base = _robust_acc(model, x, y)
    assert _robust_acc(model, x, y, amp="bf16") == pytest.approx(base, abs=0.05)
    cl = accelerate(copy.deepcopy(model), dev, channels_last=True)
    assert _robust_acc(cl, to_memory_format(x, True), y) == pytest.approx(base, abs=0.02)
    comp = accelerate(model, dev, compile=True)
    assert _robust_acc(comp, x, y) == pytest.approx(base, abs=0.02)


@pytest.mark.parametrize("flags", [dict(amp="bf16"), dict(channels_last=True), dict(amp="bf16", channels_last=True)])
def test_training_fast_paths_on_cuda(tmp_path, mnist5k, flags):
    def run(name, **kw):
        cfg = TrainConfig(epochs=1, n_train=2000, batch_size=64, out=str(tmp_path / f"{name}.pt"), device="cuda",
                          **kw)
        return train(cfg, dataset=mnist5k, narrator=SILENT).metrics[-1]["test_acc"]

    base = run("base")
    assert base > 0.85
    assert run("fast", **flags) == pytest.approx(base, abs=0.03)
