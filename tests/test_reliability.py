"""Reliability (issue 7): bad input, untrusted files, and properties of eps parsing and projection.

* A catalogue of bad inputs across `attack`, `train`, `train-robust`, `run` and `leaderboard`. Each
  one exits with code 2, prints exactly one line on stderr that names the problem (its prefix is
  asserted), prints no traceback, and changes no file that was there before (every file of the
  results folder and the inputs: leaderboard.csv/md, run folders, checkpoints, by bytes and
  mtime) and adds none. Most cases run in-process (typer's CliRunner); a handful run as real
  processes (`python -m robustbench_lite`) to show the real stderr and exit code.
* Untrusted files: checkpoints that carry a pickle payload are refused (weights_only) and the
  payload never runs; suites with python tags are refused (safe_load); npz files with pickled
  object arrays are refused.
* Property tests (hypothesis): eps parsing round-trips through the CLI and ThreatModel, garbage
  only ever raises AdvbenchError, and a projected + clipped perturbation always satisfies the
  threat model the evaluator checks (both norms, large L2 budgets included).

Budgets are tiny: the session's trained smallcnn is linked in as the zoo entry (never trained
here), checkpoints of other shapes are untrained lenets, attacks use 20 examples.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st
from typer.testing import CliRunner

import attacks
from attacks.engine import Attack
from robustbench_lite import leaderboard as lb
from robustbench_lite.checkpoint import build_checkpoint, save_checkpoint
from robustbench_lite.cli import app
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.models import create_model
from robustbench_lite.threat import ThreatModel, format_eps, parse_eps, parse_eps_list

runner = CliRunner()
ZOO = "home/models/{}"  # a world's own zoo, under its ADVBENCH_HOME W/home (set by make_world)


def zoo_entry(w: Path, model: str = "smallcnn") -> Path:
    from robustbench_lite.zoo import zoo_path

    return w / ZOO.format(zoo_path(model, "mnist-5k").name)
REPO = Path(__file__).resolve().parents[1]


# --- attack plugins that break their threat model (registered in-process, as a plugin would) -------
class _Cheat(Attack):
    """x + 2 eps (clipped to the box) along one pixel of every sample: outside the eps-ball."""

    name = "reliability-cheat-ball"
    defaults = {"steps": 1}

    def _attack(self, model, x, y, target, ids):
        out = x.clone().flatten(1)
        out[:, 0] = torch.where(x.flatten(1)[:, 0] > 0.5, x.flatten(1)[:, 0] - 2 * min(self.threat.eps, 0.25),
                                x.flatten(1)[:, 0] + 2 * min(self.threat.eps, 0.25))
        return out.reshape(x.shape)


class _OutOfBox(Attack):
    name = "reliability-cheat-box"
    defaults = {"steps": 1}

    def _attack(self, model, x, y, target, ids):
        return x - 2.0  # far outside [0, 1]


class _NaNPixels(Attack):
    name = "reliability-cheat-nan"
    defaults = {"steps": 1}

    def _attack(self, model, x, y, target, ids):
        return torch.full_like(x, float("nan"))


class _WrongShape(Attack):
    name = "reliability-cheat-shape"
    defaults = {"steps": 1}

    def __call__(self, model, x, y, target=None, sample_ids=None):
        return x[:, :, :-1]


for _cls in (_Cheat, _OutOfBox, _NaNPixels, _WrongShape):
    if _cls.name not in attacks.ATTACKS.names():
        attacks.ATTACKS.register(_cls.name, _cls)


# --- the world every case starts from ----------------------------------------------------------------
def _lenet(num_classes: int = 10, in_channels: int = 1, size: int = 28, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("lenet", in_channels=in_channels, num_classes=num_classes, input_size=size,
                        mean=[0.1307] * in_channels, std=[0.3081] * in_channels)


def _npz(path: Path, channels: int, size: int, classes: int) -> None:
    rng = np.random.default_rng(0)
    shape = (30, size, size, channels) if channels > 1 else (30, size, size)
    np.savez(path, x_train=rng.integers(0, 256, shape, dtype=np.uint8), y_train=np.arange(30) % classes,
             x_test=rng.integers(0, 256, shape, dtype=np.uint8), y_test=np.arange(30) % classes)


@pytest.fixture(scope="module")
def template(tmp_path_factory, trained_smallcnn_path, mnist5k):
    """results/ with the zoo smallcnn and one real recorded run; in/ with every kind of bad file."""
    from robustbench_lite.runtime import SILENT
    from robustbench_lite.training import TrainConfig, train

    w = tmp_path_factory.mktemp("world")
    res, inp = w / "results", w / "in"
    zoo_entry(w).parent.mkdir(parents=True)
    inp.mkdir()
    shutil.copy2(trained_smallcnn_path, zoo_entry(w))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADVBENCH_HOME", str(w / "home"))
        r = runner.invoke(app, ["attack", "--model", "smallcnn", "--eps", "0.1", "--attack", "fgsm,pgd", "--steps",
                                "2", "-n", "20", "--results-dir", str(res), "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    assert (res / "leaderboard.csv").is_file() and (res / "leaderboard.md").is_file()
    (w / "afile").write_text("a regular file: nothing can be created below it\n")

    lenet = _lenet()
    save_checkpoint(inp / "lenet.pt", build_checkpoint(lenet, dataset="mnist-5k"))
    torch.save(lenet.body.state_dict(), inp / "lenet_sd.pt")  # a plain state_dict of the bare network
    save_checkpoint(inp / "c3.pt", build_checkpoint(_lenet(num_classes=3), dataset="mnist-5k"))
    nan = _lenet()
    with torch.no_grad():
        for p in nan.parameters():
            p.fill_(float("nan"))
    save_checkpoint(inp / "nan.pt", build_checkpoint(nan, dataset="mnist-5k"))
    good = (inp / "lenet.pt").read_bytes()
    (inp / "junk.pt").write_bytes(random.Random(7).randbytes(4096))
    (inp / "trunc.pt").write_bytes(good[: len(good) // 2])
    (inp / "empty.pt").write_bytes(b"")
    ck = build_checkpoint(lenet, dataset="mnist-5k")
    ck.pop("model")
    torch.save(ck, inp / "no_model.pt")
    ck = build_checkpoint(lenet, dataset="mnist-5k")
    ck["model_kwargs"]["depth"] = 50  # settings this version cannot build
    torch.save(ck, inp / "bad_kwargs.pt")
    ck = build_checkpoint(lenet, dataset="mnist-5k")
    ck["state_dict"]["body.0.weight"] = [[0.0]]
    torch.save(ck, inp / "not_tensor.pt")
    train(TrainConfig(model="lenet", epochs=1, n_train=100, batch_size=50, out=str(inp / "lenet_train.pt"),
                      device="cpu"), dataset=mnist5k, narrator=SILENT)
    _npz(inp / "rgb.npz", 3, 32, 10)
    _npz(inp / "three.npz", 1, 28, 3)
    _npz(inp / "one_class.npz", 1, 28, 1)
    _npz(inp / "tiny.npz", 1, 2, 10)  # 2x2 images
    with np.load(inp / "three.npz") as f:
        good_arrays = dict(f)
    np.savez(inp / "huge_label.npz", **{**good_arrays, "y_train": np.r_[good_arrays["y_train"][:-1], 10 ** 9]})
    np.savez(inp / "empty_test.npz", **{**good_arrays, "x_test": np.zeros((0, 28, 28), np.uint8),
                                       "y_test": np.zeros(0, np.int64)})
    np.savez(inp / "empty_train.npz", **{**good_arrays, "x_train": np.zeros((0, 28, 28), np.uint8),
                                        "y_train": np.zeros(0, np.int64)})
    np.savez(inp / "pickled.npz", x_train=np.array([_Payload(str(w / "PWNED"))], dtype=object),
             y_train=np.zeros(1), x_test=np.zeros(1), y_test=np.zeros(1))
    (inp / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    return w


class _Payload:
    """Pickles to a call of os.system: if it ever runs, the marker file appears."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


_HASHES: Dict[Tuple[int, int, int, int], str] = {}


def snapshot(root: Path) -> Dict[str, Tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)} of every file under root (hashes cached per stat signature,
    which includes ctime: a file written in place gets a new ctime)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            s = p.stat()
            key = (s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
            if key not in _HASHES:
                _HASHES[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = (_HASHES[key], s.st_mtime_ns)
    return out


def make_world(template: Path, dest: Path) -> Path:
    """A private copy of the template (hard links: fast; a tool that writes in place would still be
    caught, since our snapshot is taken after linking and compares content and mtime)."""
    shutil.copytree(template, dest, copy_function=os.link)
    os.environ["ADVBENCH_HOME"] = str(dest / "home")  # its zoo (conftest's autouse fixture restores the variable)
    return dest


def fill(text: str, w: Path) -> str:
    return text.format(W=w, R=w / "results", IN=w / "in", ZOO=zoo_entry(w))


# --- setups that put a bad file in place before the command runs -----------------------------------------
def suite(text: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        (w / "in" / "suite.yaml").write_text(fill(text, w))

    return setup


def corrupt_leaderboard(kind: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        p = w / "results" / "leaderboard.csv"
        text = p.read_bytes()
        data = {
            "missing-columns": b"run_id,model\nx,y\n",
            "truncated": text[: len(text) - 25],                   # the last row cut short, no newline
            "short-row": text.replace(b"\n", b"\nx,y,z\n", 1),     # a record with 3 of 25 fields
            "not-utf8": b"\xff\xfe" + os.urandom(64),
            "not-a-number": text.replace(b",linf,0.1,", b",linf,zero.one,", 1),
        }[kind]
        p.unlink()  # a private copy, not a write through the hard link into the template
        p.write_bytes(data)

    return setup


BASE_SUITE = "n_examples: 20\ndevice: cpu\nmodels:\n  - checkpoint: {ZOO}\n"


def suite_with(threats: str = "[{{norm: linf, eps: 0.1}}]", attacks_: str = "[fgsm]", extra: str = "",
               checkpoint: str = "{ZOO}") -> Callable[[Path], None]:
    return suite(BASE_SUITE.replace("{ZOO}", checkpoint) + f"threats: {threats}\nattacks: {attacks_}\n" + extra)


A = ["attack", "--results-dir", "{R}", "--device", "cpu", "-n", "20"]
M = A + ["--model", "smallcnn"]                       # the zoo entry (present: never trained here)
C = A + ["--checkpoint", "{ZOO}", "--eps", "0.1"]
T = ["train", "--device", "cpu", "--epochs", "1", "--n-train", "100", "--model", "lenet",
     "--out", "{R}/models/new.pt"]
TR = ["train-robust", "--results-dir", "{R}", "--device", "cpu", "--epochs", "1", "--n-train", "200",
      "--val-size", "100", "--val-steps", "2", "--no-eval", "--model", "lenet"]
RUN = ["run", "{IN}/suite.yaml", "--results-dir", "{R}"]
L = ["leaderboard", "--results-dir", "{R}"]
EPS_HINT = "expected a non-negative number or fraction such as 8/255, 0.03 or .5"
REP = ["report", "20", "--results-dir", "{R}"]  # "20": a prefix of the template's one run id (20YYMMDD-...)


def md_is_a_directory(w: Path) -> None:
    """results/leaderboard.md replaced by a directory: the CSV must not gain rows nobody can see."""
    md = w / "results" / "leaderboard.md"
    md.unlink()
    md.mkdir()


def in_the_run(action: Callable[[Path], None]) -> Callable[[Path], None]:
    """Apply ``action`` to the template's one run folder."""
    def setup(w: Path) -> None:
        (run,) = (w / "results" / "runs").iterdir()
        action(run)

    return setup


BILLION_LAUGHS = "".join(f"x{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(1, 9))
BILLION_LAUGHS = "x0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + BILLION_LAUGHS

# (id, argv, expected stderr prefix, setup)
CASES = [
    # -- attack: eps and names ------------------------------------------------------------------------
    ("attack-eps-malformed", M + ["--eps", "abc"], f"error: invalid eps 'abc': {EPS_HINT}", None),
    ("attack-eps-negative", M + ["--eps", "-8/255"], "error: invalid eps '-8/255': must be >= 0", None),
    ("attack-eps-division-by-zero", M + ["--eps", "8/0"], "error: invalid eps '8/0': division by zero", None),
    ("attack-eps-nan", M + ["--eps", "nan"], "error: invalid eps 'nan': must be a finite number", None),
    ("attack-eps-linf-above-1", M + ["--eps", "1.5"], "error: invalid eps '1.5' for linf: images are in [0, 1]",
     None),
    ("attack-eps-sweep-with-a-hole", M + ["--eps", "0.1,,0.3"], "error: invalid eps '': empty", None),
    ("attack-alpha-malformed", M + ["--eps", "0.1", "--alpha", "2/x"], f"error: invalid --alpha '2/x': {EPS_HINT}",
     None),
    ("attack-unknown-model", A + ["--model", "smalcnn", "--eps", "0.1"],
     "error: unknown model 'smalcnn'; did you mean 'smallcnn'?", None),
    ("attack-unknown-dataset", M + ["--dataset", "mnsit", "--eps", "0.1"],
     "error: unknown dataset 'mnsit'; did you mean", None),
    ("attack-unknown-attack", M + ["--eps", "0.1", "--attack", "fgsm,pgdd"],
     "error: unknown attack 'pgdd'; did you mean 'pgd'", None),
    ("attack-unknown-norm", M + ["--eps", "0.1", "--norm", "l3"], "error: invalid norm 'l3': expected one of linf, l2",
     None),
    ("attack-unknown-loss", M + ["--eps", "0.1", "--loss", "hinge"], "error: invalid loss='hinge' for attack 'fgsm'",
     None),
    ("attack-device-unknown", M + ["--eps", "0.1", "--device", "tpu"], "error: invalid --device 'tpu'", None),
    ("attack-seed-overflow", M + ["--eps", "0.1", "--seed", str(2 ** 70)],
     "error: --seed must be an integer between 0 and 4294967295", None),
    # -- attack: data and checkpoints -----------------------------------------------------------------
    ("attack-missing-data-dir", M + ["--dataset", "cifar10", "--data-dir", "{W}/no-data", "--eps", "8/255"],
     "error: dataset 'cifar10' not found at {W}/no-data/cifar-10-batches-py (pass --download to fetch it", None),
    ("attack-missing-npz", M + ["--dataset", "npz:{W}/no.npz", "--eps", "0.1"],
     "error: dataset file not found: {W}/no.npz", None),
    ("attack-missing-checkpoint", A + ["--checkpoint", "{IN}/missing.pt", "--eps", "0.1"],
     "error: checkpoint not found: {IN}/missing.pt", None),
    ("attack-corrupt-checkpoint", A + ["--checkpoint", "{IN}/junk.pt", "--eps", "0.1"],
     "error: checkpoint {IN}/junk.pt is corrupt or truncated (", None),
    ("attack-truncated-checkpoint", A + ["--checkpoint", "{IN}/trunc.pt", "--eps", "0.1"],
     "error: checkpoint {IN}/trunc.pt is corrupt or truncated (", None),
    ("attack-empty-checkpoint", A + ["--checkpoint", "{IN}/empty.pt", "--eps", "0.1"],
     "error: checkpoint {IN}/empty.pt is corrupt or truncated (", None),
    ("attack-checkpoint-without-model-name", A + ["--checkpoint", "{IN}/no_model.pt", "--eps", "0.1"],
     "error: checkpoint {IN}/no_model.pt is corrupt: it names no model", None),
    ("attack-checkpoint-with-unknown-settings", A + ["--checkpoint", "{IN}/bad_kwargs.pt", "--eps", "0.1"],
     "error: checkpoint {IN}/bad_kwargs.pt: cannot build model 'lenet' from its settings", None),
    ("attack-checkpoint-with-non-tensor-weights", A + ["--checkpoint", "{IN}/not_tensor.pt", "--eps", "0.1"],
     "error: checkpoint {IN}/not_tensor.pt is corrupt: state_dict entry 'body.0.weight' is not a named tensor",
     None),
    ("attack-checkpoint-of-another-architecture",
     A + ["--checkpoint", "{IN}/lenet.pt", "--model", "smallcnn", "--eps", "0.1"],
     "error: checkpoint {IN}/lenet.pt holds model 'lenet', not 'smallcnn'", None),
    ("attack-state-dict-of-another-architecture",
     A + ["--checkpoint", "{IN}/lenet_sd.pt", "--model", "smallcnn", "--eps", "0.1"],
     "error: checkpoint {IN}/lenet_sd.pt does not match model 'smallcnn': unexpected keys", None),
    ("attack-checkpoint-with-3-classes", A + ["--checkpoint", "{IN}/c3.pt", "--eps", "0.1"],
     "error: checkpoint {IN}/c3.pt has 3 classes, dataset mnist-5k has 10", None),
    ("attack-dataset-with-3-classes",
     A + ["--checkpoint", "{IN}/lenet.pt", "--dataset", "npz:{IN}/three.npz", "--eps", "0.1"],
     "error: checkpoint {IN}/lenet.pt has 10 classes, dataset npz:{IN}/three.npz has 3", None),
    ("attack-dataset-with-another-input-shape",
     A + ["--checkpoint", "{IN}/lenet.pt", "--dataset", "npz:{IN}/rgb.npz", "--eps", "0.1"],
     "error: checkpoint {IN}/lenet.pt expects 1x28x28 inputs, dataset npz:{IN}/rgb.npz has 3x32x32", None),
    ("attack-npz-with-pickled-objects", M + ["--dataset", "npz:{IN}/pickled.npz", "--eps", "0.1"],
     "error: {IN}/pickled.npz: not a readable .npz file", None),
    ("attack-npz-label-1e9", M + ["--dataset", "npz:{IN}/huge_label.npz", "--eps", "0.1"],
     "error: {IN}/huge_label.npz:y_train: label 1000000000 is too large: labels are class indices 0..N-1 and at "
     "most 100,000 classes are supported", None),
    ("attack-npz-one-class", M + ["--dataset", "npz:{IN}/one_class.npz", "--eps", "0.1"],
     "error: {IN}/one_class.npz: every label is 0: a classification dataset needs at least 2 classes", None),
    ("attack-npz-empty-test-split", M + ["--dataset", "npz:{IN}/empty_test.npz", "--eps", "0.1"],
     "error: {IN}/empty_test.npz:x_test holds no images (shape (0, 1, 28, 28))", None),
    ("attack-npz-2x2-images", M + ["--dataset", "npz:{IN}/tiny.npz", "--eps", "0.1"],
     "error: model 'smallcnn' needs inputs of at least 4x4 pixels, dataset npz:{IN}/tiny.npz has 2x2", None),
    ("attack-torchvision-vit-on-28-pixels", A + ["--model", "tv:vit_b_16", "--eps", "0.1"],
     "error: model 'tv:vit_b_16' cannot take the 1x28x28 images of dataset mnist-5k (Wrong image height! "
     "Expected 224 but got 28!)", None),
    ("attack-zoo-entry-is-a-directory", A + ["--model", "lenet", "--eps", "0.1"],
     "error: zoo entry {W}/home/models/lenet-mnist-5k-", lambda w: zoo_entry(w, "lenet").mkdir()),
    ("attack-n-examples-larger-than-split-without-zoo-entry", A + ["--model", "lenet", "--eps", "0.1", "-n", "999999"],
     "error: --n-examples 999999 is larger than the test split of mnist-5k (1000 examples)", None),
    # -- attack: sizes and budgets --------------------------------------------------------------------
    ("attack-n-examples-0", C + ["-n", "0"], "error: --n-examples must be >= 1 (got 0)", None),
    ("attack-n-examples-larger-than-split", C + ["-n", "1001"],
     "error: --n-examples 1001 is larger than the test split of mnist-5k (1000 examples)", None),
    ("attack-batch-size-0", C + ["--batch-size", "0"], "error: --batch-size must be >= 1 (got 0)", None),
    ("attack-steps-0", C + ["--attack", "pgd", "--steps", "0"],
     "error: invalid steps=0 for attack 'pgd': must be an integer between 1 and 10000", None),
    ("attack-restarts-0", C + ["--attack", "pgd", "--restarts", "0"],
     "error: invalid restarts=0 for attack 'pgd': must be an integer between 1 and 1000", None),
    ("attack-steps-for-fgsm-only", C + ["--attack", "fgsm", "--steps", "3"],
     "error: --steps applies to iterative (bim, pgd) attacks only", None),
    # -- attack: what only shows while running --------------------------------------------------------
    ("attack-unwritable-results-dir",
     ["attack", "--results-dir", "{W}/afile/sub", "--device", "cpu", "-n", "20", "--checkpoint", "{ZOO}",
      "--eps", "0.1"], "error: cannot create directory {W}/afile/sub: Not a directory", None),
    ("attack-model-outputs-nan", A + ["--checkpoint", "{IN}/nan.pt", "--eps", "0.1"],
     "error: model outputs NaN on 20 of 20 clean inputs; the checkpoint is broken or diverged, nothing was recorded",
     None),
    ("attack-plugin-leaves-the-eps-ball", C + ["--attack", "fgsm,reliability-cheat-ball"],
     "error: attack 'reliability-cheat-ball' violated the threat model linf eps=0.1 on ",
     None),
    ("attack-plugin-leaves-the-l2-ball",
     A + ["--checkpoint", "{ZOO}", "--norm", "l2", "--eps", "0.1", "--attack", "reliability-cheat-ball"],
     "error: attack 'reliability-cheat-ball' violated the threat model l2 eps=0.1", None),
    ("attack-plugin-leaves-the-image-box", C + ["--attack", "reliability-cheat-box"],
     "error: attack 'reliability-cheat-box' violated the threat model linf eps=0.1", None),
    ("attack-plugin-returns-nan", C + ["--attack", "reliability-cheat-nan"],
     "error: attack 'reliability-cheat-nan' violated the threat model linf eps=0.1", None),
    ("attack-plugin-returns-another-shape", C + ["--attack", "reliability-cheat-shape"],
     "error: attack 'reliability-cheat-shape' returned shape", None),
    ("attack-corrupt-leaderboard", C, "error: {R}/leaderboard.csv is corrupt: missing columns",
     corrupt_leaderboard("missing-columns")),
    ("attack-truncated-leaderboard", C, "error: {R}/leaderboard.csv is corrupt: its last row is incomplete",
     corrupt_leaderboard("truncated")),
    # -- train ----------------------------------------------------------------------------------------
    ("train-unknown-model", T + ["--model", "lenett"], "error: unknown model 'lenett'; did you mean 'lenet'", None),
    ("train-unknown-dataset", T + ["--dataset", "fashion"], "error: unknown dataset 'fashion'; did you mean", None),
    ("train-unknown-activation", T + ["--activation", "sliu"],
     "error: unknown activation 'sliu'; did you mean 'silu'", None),
    ("train-epochs-0", T + ["--epochs", "0"], "error: --epochs must be >= 1 (got 0)", None),
    ("train-batch-size-0", T + ["--batch-size", "0"], "error: --batch-size must be >= 1 (got 0)", None),
    pytest.param("train-n-train-0", T + ["--n-train", "0"], "error: --n-train must be >= 1 (got 0)", None,
                 id="train-n-train-0"),
    pytest.param("train-n-train-larger-than-split", T + ["--n-train", "4001"],
                 "error: --n-train 4001 is larger than the training examples (4000 examples)", None,
                 id="train-n-train-larger-than-split"),
    ("train-lr-negative", T + ["--lr", "-0.1"], "error: --lr must be a positive number (got -0.1)", None),
    ("train-diverges", T + ["--lr", "1e30"], "error: training diverged at epoch 1", None),
    ("train-seed-overflow", T + ["--seed", str(2 ** 64)], "error: --seed must be an integer between 0 and", None),
    ("train-missing-data-dir", T + ["--dataset", "mnist", "--data-dir", "{W}/no-data"],
     "error: dataset 'mnist' not found at {W}/no-data/MNIST", None),
    ("train-resume-corrupt-checkpoint", T + ["--resume", "--out", "{IN}/junk.pt"],
     "error: checkpoint {IN}/junk.pt is corrupt or truncated", None),
    ("train-resume-truncated-checkpoint", T + ["--resume", "--out", "{IN}/trunc.pt"],
     "error: checkpoint {IN}/trunc.pt is corrupt or truncated", None),
    ("train-resume-checkpoint-of-another-architecture",
     T + ["--resume", "--model", "smallcnn", "--epochs", "2", "--out", "{IN}/lenet_train.pt"],
     "error: --resume: {IN}/lenet_train.pt holds model 'lenet', not 'smallcnn'", None),
    ("train-resume-not-a-training-checkpoint", T + ["--resume", "--out", "{IN}/lenet.pt"],
     "error: --resume: {IN}/lenet.pt is not a resumable training checkpoint", None),
    ("train-unwritable-out", T + ["--out", "{W}/afile/sub/m.pt"],
     "error: cannot create directory {W}/afile/sub: Not a directory", None),
    ("train-out-is-a-directory", T + ["--out", "{IN}"], "error: checkpoint {IN} is a directory, not a file", None),
    ("train-npz-empty-train-split", T + ["--dataset", "npz:{IN}/empty_train.npz"],
     "error: {IN}/empty_train.npz:x_train holds no images", None),
    ("train-npz-2x2-images", T + ["--dataset", "npz:{IN}/tiny.npz"],
     "error: model 'lenet' needs inputs of at least 12x12 pixels, dataset npz:{IN}/tiny.npz has 2x2", None),
    ("train-robust-out-is-a-directory", TR + ["--out", "{IN}"], "error: checkpoint {IN} is a directory, not a file",
     None),
    ("train-robust-npz-2x2-images", TR + ["--dataset", "npz:{IN}/tiny.npz", "--n-train", "20", "--val-size", "5"],
     "error: model 'lenet' needs inputs of at least 12x12 pixels, dataset npz:{IN}/tiny.npz has 2x2", None),
    # -- run (suites) ---------------------------------------------------------------------------------
    ("run-missing-suite", ["run", "{IN}/none.yaml"], "error: suite file not found: {IN}/none.yaml", None),
    ("run-invalid-yaml", RUN, "error: {IN}/suite.yaml: line 2: invalid YAML:", suite("models: [smallcnn\nthreats: x\n")),
    ("run-tab-indented-yaml", RUN, "error: {IN}/suite.yaml: line 2: invalid YAML:", suite("models:\n\t- smallcnn\n")),
    ("run-not-utf8", ["run", "{IN}/latin1.yaml"], "error: cannot read suite {IN}/latin1.yaml:", None),
    ("run-unknown-key", RUN, "error: {IN}/suite.yaml: line 7: unknown key 'bogus' in the suite",
     suite_with(extra="bogus: 1\n")),
    ("run-unknown-attack-key-with-suggestion", RUN,
     "error: {IN}/suite.yaml: line 6: unknown key 'stepz' in attacks[0]; did you mean 'steps'?",
     suite_with(attacks_="[{{name: pgd, stepz: 3}}]")),
    ("run-unknown-threat-key", RUN, "error: {IN}/suite.yaml: line 5: unknown key 'epsilon' in threats[0]",
     suite_with(threats="[{{norm: linf, epsilon: 0.1}}]")),
    ("run-unknown-attack", RUN, "error: {IN}/suite.yaml: line 6: unknown attack 'pgdd'; did you mean 'pgd'",
     suite_with(attacks_="[pgdd]")),
    ("run-unknown-model", RUN, "error: {IN}/suite.yaml: line 1: unknown model 'smalcnn'; did you mean 'smallcnn'?",
     suite("models: [smalcnn]\nthreats: [{{eps: 0.1}}]\nattacks: [fgsm]\n")),
    ("run-eps-negative", RUN, "error: {IN}/suite.yaml: line 5: invalid eps -1: must be >= 0",
     suite_with(threats="[{{norm: l2, eps: -1}}]")),
    ("run-eps-huge-integer", RUN, "error: {IN}/suite.yaml: line 5: invalid eps 99999",
     suite_with(threats="[{{norm: l2, eps: " + "9" * 400 + "}}]")),
    ("run-n-examples-0", RUN, "error: {IN}/suite.yaml: line 1: n_examples must be >= 1 (got 0)",
     suite(BASE_SUITE.replace("n_examples: 20", "n_examples: 0") + "threats: [{{eps: 0.1}}]\nattacks: [fgsm]\n")),
    ("run-n-examples-larger-than-split", RUN, "error: --n-examples 5000 is larger than the test split",
     suite(BASE_SUITE.replace("n_examples: 20", "n_examples: 5000") + "threats: [{{eps: 0.1}}]\nattacks: [fgsm]\n")),
    ("run-batch-size-0", RUN, "error: {IN}/suite.yaml: line 7: batch_size must be >= 1 (got 0)",
     suite_with(extra="batch_size: 0\n")),
    ("run-steps-0", RUN, "error: {IN}/suite.yaml: line 6: invalid steps=0 for attack 'pgd'",
     suite_with(attacks_="[{{name: pgd, steps: 0}}]")),
    ("run-seed-overflow", RUN, "error: {IN}/suite.yaml: line 7: seed must be an integer between 0 and",
     suite_with(extra=f"seed: {2 ** 80}\n")),
    ("run-missing-checkpoint", RUN, "error: {IN}/suite.yaml: line 4: models[0]: checkpoint not found",
     suite_with(checkpoint="{IN}/missing.pt")),
    ("run-corrupt-checkpoint", RUN, "error: checkpoint {IN}/junk.pt is corrupt or truncated",
     suite_with(checkpoint="{IN}/junk.pt")),
    ("run-model-outputs-nan", RUN, "error: model outputs NaN on 20 of 20 clean inputs",
     suite_with(checkpoint="{IN}/nan.pt")),
    ("run-plugin-leaves-the-eps-ball", RUN, "error: attack 'reliability-cheat-ball' violated the threat model",
     suite_with(attacks_="[fgsm, reliability-cheat-ball]")),
    ("run-unwritable-results-dir", ["run", "{IN}/suite.yaml", "--results-dir", "{W}/afile/sub"],
     "error: cannot create directory {W}/afile/sub: Not a directory", suite_with()),
    ("run-corrupt-leaderboard", RUN, "error: {R}/leaderboard.csv is corrupt: record 2 has 3 fields",
     lambda w: (suite_with()(w), corrupt_leaderboard("short-row")(w))),
    # -- leaderboard ----------------------------------------------------------------------------------
    ("leaderboard-eps-malformed", L + ["--eps", "8/"], f"error: invalid eps '8/': {EPS_HINT}", None),
    ("leaderboard-eps-negative", L + ["--eps", "-0.1"], "error: invalid eps '-0.1': must be >= 0", None),
    ("leaderboard-unknown-norm", L + ["--norm", "l7"], "error: invalid norm 'l7': expected one of linf, l2", None),
    ("leaderboard-unknown-dataset", L + ["--dataset", "mnits"], "error: unknown dataset 'mnits'; did you mean", None),
    ("leaderboard-unknown-format", L + ["--format", "xml"], "error: invalid --format 'xml': expected md, csv, json or html",
     None),
    ("leaderboard-missing-columns", L, "error: {R}/leaderboard.csv is corrupt: missing columns dataset, norm, eps",
     corrupt_leaderboard("missing-columns")),
    ("leaderboard-truncated", L, "error: {R}/leaderboard.csv is corrupt: its last row is incomplete",
     corrupt_leaderboard("truncated")),
    ("leaderboard-short-row", L, "error: {R}/leaderboard.csv is corrupt: record 2 has 3 fields, the header has " + str(len(lb.COLUMNS)),
     corrupt_leaderboard("short-row")),
    ("leaderboard-not-utf8", L, "error: {R}/leaderboard.csv is corrupt (", corrupt_leaderboard("not-utf8")),
    ("leaderboard-not-a-number", L, "error: {R}/leaderboard.csv is corrupt: row 2 has eps='zero.one' (not a number)",
     corrupt_leaderboard("not-a-number")),
    # -- train-robust ---------------------------------------------------------------------------------
    ("train-robust-eps-malformed", TR + ["--eps", "0.3.1"], f"error: invalid eps '0.3.1': {EPS_HINT}", None),
    ("train-robust-eps-negative", TR + ["--eps", "-0.3"], "error: invalid eps '-0.3': must be >= 0", None),
    ("train-robust-eps-linf-above-1", TR + ["--eps", "3"], "error: invalid eps '3' for linf", None),
    ("train-robust-unknown-method", TR + ["--method", "pgdat"],
     "error: unknown defense 'pgdat'; did you mean 'pgd-at'?", None),
    ("train-robust-unknown-activation", TR + ["--activation", "sliu"],
     "error: unknown activation 'sliu'; did you mean 'silu'", None),
    ("train-robust-unknown-model", TR + ["--model", "smalcnn"],
     "error: unknown model 'smalcnn'; did you mean 'smallcnn'", None),
    ("train-robust-unknown-dataset", TR + ["--dataset", "cifar"], "error: unknown dataset 'cifar'; did you mean",
     None),
    ("train-robust-steps-0", TR + ["--steps", "0"], "error: --steps must be an integer >= 1 for pgd-at (got 0)", None),
    ("train-robust-batch-size-0", TR + ["--batch-size", "0"], "error: --batch-size must be >= 1 (got 0)", None),
    ("train-robust-n-eval-0", TR + ["--n-eval", "0"], "error: --n-eval must be >= 1 (got 0)", None),
    pytest.param("train-robust-n-train-0", TR + ["--n-train", "0"], "error: --n-train must be >= 1 (got 0)", None,
                 id="train-robust-n-train-0"),
    ("train-robust-missing-data-dir", TR + ["--dataset", "cifar10", "--data-dir", "{W}/no-data"],
     "error: dataset 'cifar10' not found at {W}/no-data/cifar-10-batches-py", None),
    ("train-robust-resume-corrupt-checkpoint", TR + ["--resume", "--out", "{IN}/junk.pt"],
     "error: checkpoint {IN}/junk.pt is corrupt or truncated", None),
    ("train-robust-resume-checkpoint-of-another-architecture",
     TR + ["--resume", "--model", "smallcnn", "--out", "{IN}/lenet_train.pt"],
     "error: --resume: {IN}/lenet_train.pt holds model 'lenet', not 'smallcnn'", None),
    ("train-robust-unwritable-results-dir",
     ["train-robust", "--results-dir", "{W}/afile/sub", "--device", "cpu", "--epochs", "1", "--n-train", "200",
      "--val-size", "100", "--model", "lenet"],
     "error: cannot create directory {W}/afile/sub", None),
    # -- issue 12: a run's record is all or nothing --------------------------------------------------
    ("attack-leaderboard-md-is-a-directory", C,
     "error: cannot write the leaderboard: {R}/leaderboard.md is a directory; move it away", md_is_a_directory),
    ("run-leaderboard-md-is-a-directory", RUN,
     "error: cannot write the leaderboard: {R}/leaderboard.md is a directory; move it away",
     lambda w: (suite_with()(w), md_is_a_directory(w))),
    # -- issue 12: absurd attack budgets (the engine's limits) ---------------------------------------
    ("attack-steps-1e9", C + ["--attack", "pgd", "--steps", "1000000000"],
     "error: invalid steps=1000000000 for attack 'pgd': must be an integer between 1 and 10000", None),
    ("attack-restarts-1e5", C + ["--attack", "pgd", "--restarts", "100000"],
     "error: invalid restarts=100000 for attack 'pgd': must be an integer between 1 and 1000", None),
    ("run-steps-1e23", RUN, "error: {IN}/suite.yaml: line 6: invalid steps='1e23' for attack 'pgd': must be an "
     "integer between 1 and 10000", suite_with(attacks_="[{{name: pgd, steps: 1e23}}]")),
    ("run-restarts-huge-integer", RUN, "error: {IN}/suite.yaml: line 6: invalid restarts=100000000000000000000000 "
     "for attack 'pgd': must be an integer between 1 and 1000",
     suite_with(attacks_="[{{name: pgd, restarts: 100000000000000000000000}}]")),
    ("run-steps-float-1e23", RUN, "error: {IN}/suite.yaml: line 6: invalid steps=1e+23 for attack 'pgd': must be an "
     "integer", suite_with(attacks_="[{{name: pgd, steps: 1.0e+23}}]")),
    ("run-restarts-1e23", RUN, "error: {IN}/suite.yaml: line 6: invalid restarts='1e23' for attack 'pgd': must be an "
     "integer", suite_with(attacks_="[{{name: pgd, restarts: 1e23}}]")),
    # -- issue 12: eps that float() takes but a person did not mean ----------------------------------
    ("attack-eps-with-underscore", M + ["--eps", "0.0_3"], f"error: invalid eps '0.0_3': {EPS_HINT}", None),
    ("attack-eps-arabic-indic-digits", M + ["--eps", "٠.٣"], f"error: invalid eps '٠.٣': {EPS_HINT}", None),
    ("attack-eps-full-width-digits", M + ["--eps", "８/２５５"], f"error: invalid eps '８/２５５': {EPS_HINT}", None),
    ("attack-eps-underflows-to-0", M + ["--eps", "1e-400"],
     "error: invalid eps '1e-400': too small for a float64, it would become 0", None),
    ("attack-eps-sweep-with-an-underflow", M + ["--eps", "0.1,1e-300/1e300"],
     "error: invalid eps '1e-300/1e300': too small for a float64, it would become 0", None),
    ("attack-l2-eps-beyond-any-image-distance", M + ["--norm", "l2", "--eps", "1e300"],
     "error: eps 1e+300 for l2 exceeds sqrt(784) = 28, the largest L2 distance between 1x28x28 images in [0, 1]",
     None),
    ("leaderboard-eps-with-underscore", L + ["--eps", "0.0_3"], f"error: invalid eps '0.0_3': {EPS_HINT}", None),
    ("train-robust-eps-underflows-to-0", TR + ["--eps", "1e-400"],
     "error: invalid eps '1e-400': too small for a float64, it would become 0", None),
    ("attack-l2-eps-beyond-any-image-distance-before-training-a-baseline",
     A + ["--model", "lenet", "--norm", "l2", "--eps", "29"],  # no lenet in the zoo: refused before training one
     "error: eps 29 for l2 exceeds sqrt(784) = 28", None),
    ("train-robust-l2-eps-beyond-any-image-distance", TR + ["--norm", "l2", "--eps", "1e300"],
     "error: eps 1e+300 for l2 exceeds sqrt(784) = 28, the largest L2 distance between 1x28x28 images", None),
    ("run-eps-with-underscore", RUN, "error: {IN}/suite.yaml: line 5: invalid eps '0.0_3'",
     suite_with(threats="[{{norm: linf, eps: '0.0_3'}}]")),
    ("run-l2-eps-beyond-any-image-distance", RUN, "error: eps 1e+300 for l2 exceeds sqrt(784) = 28",
     suite_with(threats="[{{norm: l2, eps: 1.0e+300}}]")),
    # -- issue 12: training settings -----------------------------------------------------------------
    ("train-weight-decay-negative", T + ["--weight-decay", "-1"],
     "error: --weight-decay must be a finite number >= 0 (got -1.0)", None),
    ("train-weight-decay-nan", T + ["--weight-decay", "nan"],
     "error: --weight-decay must be a finite number >= 0 (got nan)", None),
    ("train-robust-weight-decay-negative", TR + ["--weight-decay", "-1"],
     "error: --weight-decay must be a finite number >= 0 (got -1.0)", None),
    ("train-robust-weight-decay-inf", TR + ["--weight-decay", "inf"],
     "error: --weight-decay must be a finite number >= 0 (got inf)", None),
    # -- issue 12: suites that hang, explode or carry the wrong types --------------------------------
    ("run-recursive-alias", RUN,
     "error: {IN}/suite.yaml: line 1: recursive alias: the node anchored here contains an alias of itself",
     suite("&a [*a]\n")),
    ("run-recursive-alias-inside-a-field", RUN, "error: {IN}/suite.yaml: line 7: recursive alias",
     suite_with(extra="description: &d [x, *d]\n")),
    ("run-billion-laughs", RUN,
     "error: {IN}/suite.yaml: line 5: this node expands to more than 100,000 YAML nodes through aliases",
     suite(BILLION_LAUGHS + "models: [smallcnn]\nthreats: [{{eps: 0.1}}]\nattacks: [fgsm]\n")),
    ("run-seed-negative", RUN, "error: {IN}/suite.yaml: line 7: seed must be an integer between 0 and 4294967295 "
     "(got -1)", suite_with(extra="seed: -1\n")),
    ("run-attack-seed-negative", RUN, "error: {IN}/suite.yaml: line 6: attacks[0].seed must be an integer between 0 "
     "and 4294967295 (got -1)", suite_with(attacks_="[{{name: pgd, seed: -1}}]")),
    ("run-attack-label-is-a-list", RUN,
     "error: {IN}/suite.yaml: line 6: attacks[0].label must be a string (got ['a', 'b'])",
     suite_with(attacks_="[{{name: pgd, label: [a, b]}}]")),
    ("run-attack-label-is-a-number", RUN, "error: {IN}/suite.yaml: line 6: attacks[0].label must be a string (got 5)",
     suite_with(attacks_="[{{name: pgd, label: 5}}]")),
    ("run-attack-name-is-a-list", RUN,
     "error: {IN}/suite.yaml: line 6: attacks[0].name must be an attack name (got ['pgd'])",
     suite_with(attacks_="[{{name: [pgd]}}]")),
    # -- issue 12: report ------------------------------------------------------------------------------
    ("report-ambiguous-prefix", REP, "error: run prefix '20' is ambiguous: it matches 2 runs in {R}/runs (",
     lambda w: (w / "results" / "runs" / "20000101-000000-00000000").mkdir()),
    ("report-outcomes-missing", REP, "error: run {R}/runs/",
     in_the_run(lambda run: (run / "outcomes.csv").unlink())),
    ("report-destination-is-a-directory", REP, "error: cannot write the report: {R}/runs/",
     in_the_run(lambda run: (run / "report.md").mkdir())),
]


def _ids(cases):
    return [getattr(c, "id", None) or c[0] for c in cases]


def check_one_line_error(code: int, stderr: str, expected: str) -> None:
    assert code == 2, (code, stderr)
    assert "Traceback" not in stderr, stderr
    assert stderr.endswith("\n") and stderr.count("\n") == 1, f"not exactly one line on stderr: {stderr!r}"
    assert stderr.startswith(expected), f"\n  got:      {stderr!r}\n  expected: {expected!r}..."


def test_the_catalogue_is_big_and_covers_every_command():
    ids = _ids(CASES)
    assert len(ids) == len(set(ids)) >= 30
    for command in ("attack", "train", "train-robust", "run", "leaderboard"):
        assert sum(i.startswith(command + "-") for i in ids) >= 5, command


@pytest.mark.parametrize("case_id, argv, expected, setup", CASES, ids=_ids(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(template, tmp_path, case_id, argv, expected, setup):
    w = make_world(template, tmp_path / "w")
    if setup is not None:
        setup(w)
    before = snapshot(w)
    r = runner.invoke(app, [fill(a, w) for a in argv])
    assert isinstance(r.exception, SystemExit), r.exception  # not an exception escaping the CLI
    check_one_line_error(r.exit_code, r.stderr, fill(expected, w))
    assert snapshot(w) == before, "a failed command changed or added files"
    assert not (w / "PWNED").exists() and not (template / "PWNED").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: permission bits are not enforced, so a read-only folder is still "
                           "writable (the catalogue makes results dirs unwritable with a path below a regular file)")
def test_read_only_results_dir(template, tmp_path):
    w = make_world(template, tmp_path / "w")
    res = w / "results"
    before = snapshot(w)
    os.chmod(res, 0o555)
    try:
        r = runner.invoke(app, [fill(a, w) for a in C])
    finally:
        os.chmod(res, 0o755)
    check_one_line_error(r.exit_code, r.stderr, f"error: directory {res} is not writable")
    assert snapshot(w) == before


# a handful through real processes: the real stderr and exit status of `python -m robustbench_lite`
SUBPROCESS_CASES = ["attack-eps-malformed", "attack-corrupt-checkpoint", "run-invalid-yaml", "leaderboard-truncated",
                    "train-robust-unknown-method"]


def test_real_processes_exit_2_with_one_stderr_line(template, tmp_path):
    table = {c[0]: c for c in CASES if not hasattr(c, "marks")}
    procs = []
    for case_id in SUBPROCESS_CASES:  # started together: they overlap on the two cores
        _, argv, expected, setup = table[case_id]
        w = make_world(template, tmp_path / case_id)
        if setup is not None:
            setup(w)
        before = snapshot(w)
        p = subprocess.Popen([sys.executable, "-m", "robustbench_lite"] + [fill(a, w) for a in argv], cwd=w,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        procs.append((case_id, p, w, fill(expected, w), before))
    for case_id, p, w, expected, before in procs:
        out, err = p.communicate(timeout=120)
        check_one_line_error(p.returncode, err, expected)
        assert snapshot(w) == before, case_id


# --- untrusted files -----------------------------------------------------------------------------------------
class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _evil_checkpoints(d: Path, marker: Path) -> Dict[str, Path]:
    """Files that run code when unpickled without weights_only."""
    lenet = build_checkpoint(_lenet(), dataset="mnist-5k")
    out = {}
    out["reduce-os-system"] = d / "system.pt"
    torch.save({"state_dict": _Payload(str(marker))}, out["reduce-os-system"])
    out["reduce-exec-inside-an-advbench-checkpoint"] = d / "exec.pt"
    torch.save({**lenet, "metrics": {"acc": _Exec(str(marker))}}, out["reduce-exec-inside-an-advbench-checkpoint"])
    out["legacy-format"] = d / "legacy.pt"
    torch.save({"state_dict": _Payload(str(marker))}, out["legacy-format"], _use_new_zipfile_serialization=False)
    out["raw-pickle"] = d / "raw.pt"
    import pickle

    out["raw-pickle"].write_bytes(pickle.dumps(_Payload(str(marker))))
    return out


EVIL_KINDS = ["reduce-os-system", "reduce-exec-inside-an-advbench-checkpoint", "legacy-format", "raw-pickle"]


@pytest.mark.parametrize("kind", EVIL_KINDS)
@pytest.mark.parametrize("command", ["attack", "train --resume", "run"])
def test_checkpoint_with_a_code_payload_is_refused_and_never_runs(tmp_path, kind, command):
    marker = tmp_path / "PWNED"
    evil = _evil_checkpoints(tmp_path, marker)[kind]
    results = tmp_path / "results"
    if command == "attack":
        argv = ["attack", "--checkpoint", str(evil), "--eps", "0.1", "--results-dir", str(results)]
    elif command == "train --resume":
        argv = ["train", "--model", "lenet", "--resume", "--out", str(evil), "--epochs", "1", "--n-train", "100",
                "--device", "cpu"]
    else:
        s = tmp_path / "s.yaml"
        s.write_text(f"models: [{{checkpoint: {evil}}}]\nthreats: [{{eps: 0.1}}]\nattacks: [fgsm]\ndevice: cpu\n")
        argv = ["run", str(s), "--results-dir", str(results)]
    before = evil.read_bytes()
    r = runner.invoke(app, argv)
    expected = f"error: checkpoint {evil} "
    check_one_line_error(r.exit_code, r.stderr, expected)
    if kind != "raw-pickle":  # a raw pickle is not a torch file at all: refused as corrupt
        assert "was refused: it contains Python objects that would run code" in r.stderr
    assert not marker.exists(), "the payload ran"
    assert evil.read_bytes() == before and not (results / "leaderboard.csv").exists()


def test_code_payload_in_a_real_process(tmp_path):
    marker = tmp_path / "PWNED"
    evil = _evil_checkpoints(tmp_path, marker)["reduce-os-system"]
    p = subprocess.run([sys.executable, "-m", "robustbench_lite", "attack", "--checkpoint", str(evil), "--eps", "0.1",
                        "--results-dir", str(tmp_path / "results")], capture_output=True, text=True, cwd=tmp_path)
    check_one_line_error(p.returncode, p.stderr, f"error: checkpoint {evil} was refused")
    assert not marker.exists()


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['touch {m}']",
    "!!python/object/apply:subprocess.check_call [['touch', '{m}']]",
    "!!python/object/new:subprocess.Popen [['touch', '{m}']]",
    "!!python/name:os.system",
    "!!python/module:os",
    "!shell 'touch {m}'",
])
def test_suite_with_python_tags_is_refused_and_never_runs(tmp_path, tag):
    marker = tmp_path / "PWNED"
    s = tmp_path / "suite.yaml"
    s.write_text("models: [smallcnn]\nthreats: [{eps: 0.1}]\nattacks: [fgsm]\n"
                 f"description: {tag.format(m=marker)}\n")
    r = runner.invoke(app, ["run", str(s), "--results-dir", str(tmp_path / "results")])
    check_one_line_error(r.exit_code, r.stderr, f"error: {s}: line 4: tag ")
    assert "is not allowed: a suite is plain data (read with yaml.safe_load; python tags are refused)" in r.stderr
    assert not marker.exists() and not (tmp_path / "results").exists()


def test_npz_with_pickled_objects_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.npz"
    np.savez(p, x_train=np.array([_Payload(str(marker))], dtype=object), y_train=np.zeros(1), x_test=np.zeros(1),
             y_test=np.zeros(1))
    r = runner.invoke(app, ["train", "--dataset", f"npz:{p}", "--out", str(tmp_path / "m.pt"), "--device", "cpu"])
    check_one_line_error(r.exit_code, r.stderr, f"error: {p}: not a readable .npz file")
    assert "allow_pickle=False" in r.stderr and not marker.exists()


# --- property tests -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eps_board(tmp_path_factory):
    """A leaderboard with one synthetic run per eps k/255 (k = 0..255) and a few other values."""
    d = tmp_path_factory.mktemp("eps-board")
    values = sorted({k / 255 for k in range(256)} | {0.3, 0.5, 1.5, 2.0, 12.25})
    rows = []
    for i, e in enumerate(values):
        rows.append({c: "" for c in lb.COLUMNS} | {
            "run_id": f"r{i:03d}", "timestamp": "2026-01-01T00:00:00", "model": "m", "dataset": "d",
            "n_examples": "10", "norm": "l2" if e > 1 else "linf", "eps": repr(float(e)), "attack": "pgd",
            "clean_acc": "0.9", "robust_acc": "0.5"})
    lb.append(d, rows)
    return d, values


def _board_rows(d, text):
    r = runner.invoke(app, ["leaderboard", "--results-dir", str(d), "--format", "json", f"--eps={text}"])
    return r


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.integers(0, 255), form=st.sampled_from(["{k}/255", "{r}", " {k}/255 ", "{k2}/510", "{k}.0/255.0",
                                                     "+{k}/255", "{k}e0/255"]))
def test_eps_written_any_way_finds_its_leaderboard_rows(eps_board, k, form):
    """CLI level: `leaderboard --eps TEXT` parses TEXT with the one parser and finds exactly the run
    recorded at that eps, however the same number is written."""
    d, _ = eps_board
    text = form.format(k=k, k2=2 * k, r=repr(k / 255))
    r = _board_rows(d, text)
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 1 and rows[0]["eps"] == pytest.approx(k / 255, rel=1e-9, abs=0)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=20) | st.from_regex(r"\A[-+ .0-9/eEinfa_]{0,12}\Z"))
def test_garbage_eps_on_the_command_line_is_exit_2_or_a_valid_filter(eps_board, text):
    d, values = eps_board
    r = _board_rows(d, text)
    try:
        value = parse_eps(text)
    except AdvbenchError as exc:
        assert r.exit_code == 2 and r.stderr == f"error: {' '.join(str(exc).split())}\n"
        return
    assert r.exit_code == 0 and "Traceback" not in r.stderr
    assert value >= 0 and np.isfinite(value)


@settings(max_examples=100, deadline=None)
@given(x=st.one_of(
    st.text(max_size=30),
    st.from_regex(r"\A[-+]?[0-9]{0,5}(\.[0-9]{0,5})?([eE][-+]?[0-9]{1,4})?(/[-+]?[0-9]{0,5}(\.[0-9]*)?)?\Z"),
    st.integers(min_value=-(10 ** 400), max_value=10 ** 400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.lists(st.integers(), max_size=2)),
    norm=st.sampled_from([None, "linf", "l2", "Linf", "L-inf", "l1", "", "∞"]))
def test_parse_eps_and_threat_model_raise_only_advbench_errors(x, norm):
    """Garbage in any form: parse_eps / parse_eps_list / ThreatModel either give a finite eps >= 0
    (<= 1 under linf) or raise AdvbenchError, never another exception."""
    for fn in (lambda: parse_eps(x, norm), lambda: ThreatModel(norm if norm is not None else "linf", x),
               lambda: parse_eps_list(x if isinstance(x, str) else str(x), norm)):
        try:
            out = fn()
        except AdvbenchError as exc:
            assert str(exc)
            continue
        vals = [out.eps] if isinstance(out, ThreatModel) else (out if isinstance(out, list) else [out])
        assert all(np.isfinite(v) and v >= 0 for v in vals)


@settings(max_examples=60, deadline=None)
@given(num=st.decimals(min_value=0, max_value=1000, allow_nan=False, places=4),
       den=st.decimals(min_value="0.001", max_value=1000, allow_nan=False, places=3),
       pad=st.sampled_from(["", " ", "  "]), plus=st.booleans())
def test_any_non_negative_fraction_round_trips(num, den, pad, plus):
    """Decimal numerators and denominators, padding and a leading '+': the value is num/den, through
    parse_eps, an eps sweep and an L2 threat model alike (and under linf when <= 1)."""
    text = f"{pad}{'+' if plus else ''}{num}/{den}{pad}"
    value = float(num) / float(den)
    assert parse_eps(text) == value
    assert ThreatModel("l2", text).eps == value
    assert parse_eps_list(f"{text},{text},0.5") == ([value, 0.5] if value != 0.5 else [0.5])
    if value <= 1:
        assert ThreatModel("linf", text).eps == value
    else:
        with pytest.raises(AdvbenchError, match="for linf"):
            ThreatModel("linf", text)


@settings(max_examples=60, deadline=None)
@given(x=st.floats(min_value=0, max_value=1e6, allow_nan=False),
       form=st.sampled_from(["{x!r}", "{x:.17g}", "{x:.17e}", " +{x!r} ", "{x!r}/1", "{x!r}/1.0", "{x:.17E}"]))
def test_any_non_negative_number_string_round_trips(x, form):
    text = form.format(x=x)
    assert parse_eps(text) == x and ThreatModel("l2", text).eps == x
    assert parse_eps_list(f"{text},{text}") == [x]


@settings(max_examples=60, deadline=None)
@given(k=st.integers(0, 255))
def test_format_eps_round_trips_for_k_over_255(k):
    assert parse_eps(format_eps(k / 255)) == k / 255


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=25))
def test_any_eps_scalar_in_a_suite_is_a_line_numbered_error_or_valid(tmp_path_factory, text):
    """YAML turns scalars into str/int/float/bool/null/...: load_suite only ever raises
    AdvbenchError (a 400-digit integer used to escape as OverflowError)."""
    from robustbench_lite.suite import load_suite

    p = tmp_path_factory.mktemp("s") / "s.yaml"
    p.write_text(f"models: [smallcnn]\nthreats:\n  - norm: l2\n    eps: {text}\nattacks: [fgsm]\n", encoding="utf-8")
    try:
        s = load_suite(p)
    except AdvbenchError as exc:
        assert str(exc).startswith(str(p))
        return
    assert all(np.isfinite(t.eps) and t.eps >= 0 for t in s.threats)


@settings(max_examples=60, deadline=None)
@given(norm=st.sampled_from(["linf", "l2"]), eps=st.floats(1e-4, 1.0) | st.floats(1.0, 40.0),
       d=st.sampled_from([1, 16, 784, 3072]), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2 ** 31 - 1),
       interior=st.booleans())
@example(norm="l2", eps=7.0, d=3072, scale=100.0, seed=197, interior=True)  # 1.43e-6 over eps in float32
def test_projected_and_clipped_perturbations_satisfy_the_threat_model(norm, eps, d, scale, seed, interior):
    """What every attack step does: delta -> project onto the eps-ball -> clip x + delta to [0, 1].
    The result passes the evaluator's own check (ThreatModel.violations) for both norms, also for
    large L2 budgets on mid-grey images where clipping never binds (float32 rounding of the norm
    used to exceed an absolute 1e-6 slack there)."""
    assume(norm == "l2" or eps <= 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(8, d, generator=g)
    if interior:
        x = 0.4 + 0.2 * x
    threat = ThreatModel(norm, eps)
    delta = torch.randn(8, d, generator=g) * scale
    x_adv = (x + threat.geometry.project(delta, eps)).clamp(0, 1)
    assert 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    assert not threat.violations(x_adv, x).any()
    assert float(threat.distance(x_adv, x).max()) <= eps + threat.tolerance
    # one more ascent step from there, as the attack loop takes it, stays inside too
    step = threat.geometry.step(torch.randn(8, d, generator=g), eps / 4)
    x_next = (x + threat.geometry.project(x_adv - x + step, eps)).clamp(0, 1)
    assert not threat.violations(x_next, x).any()


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(["fgsm", "bim", "pgd"]), norm=st.sampled_from(["linf", "l2"]),
       eps=st.floats(0.0, 1.0) | st.floats(1.0, 8.0), steps=st.integers(1, 4), restarts=st.integers(1, 2),
       alpha_scale=st.floats(0.0, 3.0), loss=st.sampled_from(["ce", "margin"]), seed=st.integers(0, 1000))
def test_every_builtin_attack_returns_points_inside_the_threat_model(name, norm, eps, steps, restarts, alpha_scale,
                                                                     loss, seed):
    assume(norm == "l2" or eps <= 1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = torch.rand(6, 1, 4, 4)
    y = torch.randint(0, 3, (6,))
    threat = ThreatModel(norm, eps)
    params = {"loss": loss, "seed": seed}
    if name != "fgsm":
        params.update(steps=steps, alpha=alpha_scale * eps)
    if name == "pgd":
        params["restarts"] = restarts
    x_adv = attacks.create(name, threat=threat, **params)(model, x, y)
    assert x_adv.shape == x.shape and not threat.violations(x_adv, x).any()
