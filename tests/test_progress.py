"""Progress a person can follow (issue 12, item 13): off a terminal, plain single lines every
ADVBENCH_PROGRESS_INTERVAL seconds and at the end of each task; attack progress moves per step."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from rich.markup import escape
from typer.testing import CliRunner

import attacks
from robustbench_lite.cli import app
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.runtime import PlainProgress, progress_bar, progress_interval
from robustbench_lite.threat import ThreatModel

CLI = [sys.executable, "-m", "robustbench_lite"]
LINE = re.compile(r"^(fgsm|pgd) linf eps=0\.3: (\d+)/(\d+) samples, \d+ s(, ETA \d+ s)?$")


def strip_timing(summary):
    text = json.dumps(summary)
    for key in ("run_id", "run_dir", "seconds", "images_per_s", "timestamp"):
        text = re.sub(rf'"{key}": ("[^"]*"|[0-9.e+-]+)', f'"{key}": null', text)
    return json.loads(text)


def test_attack_off_a_terminal_prints_plain_progress_lines_per_step(tmp_path, trained_smallcnn_path):
    args = ["attack", "--checkpoint", str(trained_smallcnn_path), "--eps", "0.3", "--attack", "fgsm,pgd",
            "--steps", "4", "-n", "40", "--batch-size", "40", "--device", "cpu", "--json", "--no-masking-checks"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADVBENCH_PROGRESS_INTERVAL": "0", "COLUMNS": "30"}
    r = subprocess.run(CLI + args + ["--results-dir", str(tmp_path / "a")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(("fgsm ", "pgd "))]
    assert lines and all(LINE.match(ln) for ln in lines), lines  # whole lines: no 30-column wrapping
    pgd = [tuple(map(int, LINE.match(ln).group(2, 3))) for ln in lines if ln.startswith("pgd")]
    done, total = zip(*pgd)
    assert done[-1] == total[-1] and "ETA" not in [ln for ln in lines if ln.startswith("pgd")][-1]
    assert any(0 < d < t for d, t in pgd), "the bar did not move inside the one batch (per step)"
    assert list(done) == sorted(done)
    # stdout: the same JSON results as without progress lines
    quiet = CliRunner().invoke(app, args + ["--results-dir", str(tmp_path / "b")])
    assert quiet.exit_code == 0, quiet.output
    assert strip_timing(json.loads(r.stdout)) == strip_timing(json.loads(quiet.stdout))


def test_training_off_a_terminal_prints_epoch_progress_lines(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADVBENCH_PROGRESS_INTERVAL": "0"}
    r = subprocess.run(CLI + ["train", "--model", "lenet", "--epochs", "1", "--n-train", "200", "--batch-size", "20",
                              "--device", "cpu", "--out", str(tmp_path / "m.pt")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("epoch 1/1: ")]
    pat = re.compile(r"^epoch 1/1: \d+/200 images, loss \d\.\d{3}  acc \d+\.\d%  \d+ img/s, \d+ s(, ETA \d+ s)?$")
    assert len(lines) >= 2 and all(pat.match(ln) for ln in lines), r.stderr
    assert lines[-1].startswith("epoch 1/1: 200/200 images")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_progress_prints_on_the_interval_and_at_the_end():
    out, clock = io.StringIO(), Clock()
    p = PlainProgress(stream=out, interval=10, unit="samples", clock=clock)
    with p:
        quick = p.add_task("fgsm", total=5)
        clock.now = 3
        p.update(quick, completed=5)  # done within the interval: silent (an error line stays alone)
        t = p.add_task(escape("pgd linf eps=[0.3]"), total=10)  # markup-escaped descriptions are shown plain
        clock.now = 8
        p.update(t, completed=2)  # within the interval: nothing
        assert out.getvalue() == ""
        clock.now = 14
        p.update(t, completed=4)  # 11 s after the start: a line with the ETA
        clock.now = 20
        p.update(t, completed=5)  # 6 s after the last line: nothing
        clock.now = 22
        p.update(t, completed=10)  # the end: a last line
        p.update(t, completed=10)
        p.remove_task(t)
        u = p.add_task("bim", total=5)
        clock.now = 40
        p.remove_task(u)  # removed before its end: a last line
    assert out.getvalue().splitlines() == ["pgd linf eps=[0.3]: 4/10 samples, 11 s, ETA 16 s",
                                           "pgd linf eps=[0.3]: 10/10 samples, 19 s",
                                           "bim: 0/5 samples, 18 s"]


def test_progress_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv("ADVBENCH_PROGRESS_INTERVAL", raising=False)
    assert progress_interval() == 10.0
    monkeypatch.setenv("ADVBENCH_PROGRESS_INTERVAL", "2.5")
    assert progress_interval() == 2.5
    assert isinstance(progress_bar(console=None), PlainProgress)  # pytest's stderr is no terminal
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("ADVBENCH_PROGRESS_INTERVAL", bad)
        with pytest.raises(AdvbenchError, match="ADVBENCH_PROGRESS_INTERVAL must be a number of seconds >= 0"):
            progress_interval()


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, fraction):
        self.calls.append(fraction)


@pytest.mark.parametrize("name, params", [("pgd", {"steps": 6, "restarts": 2}), ("bim", {"steps": 5}),
                                          ("apgd-ce", {"steps": 8}), ("apgd-t", {"steps": 4, "n_target_classes": 2})])
def test_attacks_report_each_step_to_the_progress_hook(name, params):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10))
    x = torch.rand(6, 1, 4, 4)
    y = model(x).argmax(1)
    atk = attacks.create(name, threat=ThreatModel("linf", 1e-4), early_stop=False, **params)  # nobody is fooled
    plain = atk(model, x, y)
    atk.on_step = Recorder()
    assert torch.equal(atk(model, x, y), plain)  # the hook changes nothing
    calls = atk.on_step.calls
    steps = params["steps"] * params.get("restarts", 1) * params.get("n_target_classes", 1)
    assert len(calls) >= steps and calls == sorted(calls) and 0 < calls[0] and calls[-1] <= 1.0
    assert calls[-1] >= 0.9
