"""robustbench_lite.benchmark, the Python API: the README's example runs as written; a run is recorded
only when asked; a model that cannot take the images is one clear error."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import robustbench_lite
from robustbench_lite import leaderboard
from robustbench_lite.data import load_dataset
from robustbench_lite.errors import AdvbenchError, SettingError
from robustbench_lite.evaluator import accuracy
from robustbench_lite.specs import attack_suite

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The python block of the README's "Python API" section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    code = readme_example()
    assert "robustbench_lite.benchmark(net" in code and len(code.strip().splitlines()) <= 16
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    record, net = ns["record"], ns["net"]
    x, y, _ = load_dataset("mnist-5k").subset("test", 100, seed=0)
    assert record.result.n_total == 100
    assert record.clean_acc == int(accuracy(net, x, y)) / 100
    labels = [s.label for s in attack_suite("standard").specs()]
    assert list(record.robust_acc) == labels and record.evaluation == "standard"
    assert record.worst_case_acc == record.robust_acc[labels[-1]] <= record.clean_acc  # a cascade's last number
    printed = capsys.readouterr().out.split()
    assert printed[0] == str(record.clean_acc) and printed[-1] == "standard"
    assert record.run_id == "" and record.run_dir is None and record.summary()["run_dir"] is None
    assert list(tmp_path.iterdir()) == []  # nothing recorded anywhere


class Brightness(nn.Module):
    """mnist-5k's digits by ink: a plain module with one weight per class."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, 10))

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))[:, None] * self.w * 10


def test_a_run_is_recorded_only_when_asked(tmp_path):
    net = Brightness()
    record = robustbench_lite.benchmark(net, "mnist-5k", eps=[0.1, 0.2], suite=None, attacks=["fgsm"],
                                        n_examples=30, device="cpu", masking_checks=False,
                                        results_dir=str(tmp_path / "results"), model_name="ink")
    assert record.run_id and record.run_dir.is_dir()
    assert [t.threat.eps for t in record.result.threats] == [0.1, 0.2] and list(record.robust_acc) == ["fgsm"]
    rows = leaderboard.read(str(tmp_path / "results"))
    assert set(rows["model"]) == {"ink"} and len(rows) == 4  # 2 eps x (fgsm + worst case)
    assert set(rows["checkpoint_sha256"]) == {record.info["checkpoint_sha256"]}
    assert len(record.info["checkpoint_sha256"]) == 64 and record.info["checkpoint"] == ""
    with torch.no_grad():
        net.w.mul_(2)  # other weights: another leaderboard entry
    again = robustbench_lite.benchmark(net, "mnist-5k", eps=0.1, suite=None, attacks=["fgsm"], n_examples=30,
                                       device="cpu", masking_checks=False)
    assert again.info["checkpoint_sha256"] != record.info["checkpoint_sha256"]


def test_bad_models_and_settings_are_one_clear_error():
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(AdvbenchError, match=r"^model 'Sequential' cannot take the 1x28x28 images of dataset "
                                            r"mnist-5k \(mat1 and mat2 shapes cannot be multiplied"):
        robustbench_lite.benchmark(wrong, "mnist-5k", eps=0.3, n_examples=10, device="cpu")
    classes = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 7))
    with pytest.raises(AdvbenchError, match=r"^model 'Sequential' gives 7 logits per image, dataset mnist-5k "
                                            r"has 10 classes$"):
        robustbench_lite.benchmark(classes, "mnist-5k", eps=0.3, n_examples=10, device="cpu")
    with pytest.raises(SettingError, match="^suite and attacks conflict"):
        robustbench_lite.benchmark(classes, eps=0.3, attacks=["pgd"])
    with pytest.raises(SettingError, match=r"^model must be a torch.nn.Module or a model name \(got int\)$"):
        robustbench_lite.benchmark(3, eps=0.3)


def test_the_package_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, robustbench_lite; assert 'robustbench_lite.runs' not in sys.modules; "
            "f = robustbench_lite.benchmark; assert 'robustbench_lite.runs' in sys.modules; print(f.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "robustbench_lite.api"
