"""`advbench train` / `advbench list` and the CLI error policy (one stderr line, exit 2)."""
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from robustbench_lite.checkpoint import read_checkpoint
from robustbench_lite.cli import app
from robustbench_lite.training import accuracy

runner = CliRunner()


def run(args):
    return runner.invoke(app, args)


def test_trained_smallcnn_is_sane(trained_smallcnn):
    model, x, y = trained_smallcnn
    assert accuracy(model, x, y) >= 0.95


def test_train_writes_checkpoint_metrics_and_resumes(tmp_path):
    out = tmp_path / "lenet.pt"
    args = ["train", "--model", "lenet", "--epochs", "1", "--n-train", "1000", "--out", str(out), "--device", "cpu",
            "--batch-size", "50", "--optimizer", "adam", "--lr", "0.003"]
    r = run(args)
    assert r.exit_code == 0, r.output
    assert "epoch 1/1" in r.output and "test acc" in r.output
    ck = read_checkpoint(out)
    assert ck["epoch"] == 1 and ck["model"] == "lenet" and ck["optimizer"] is not None
    assert ck["metrics"]["test_acc"] > 0.3
    csv = (tmp_path / "lenet.metrics.csv").read_text().splitlines()
    assert csv[0].startswith("epoch,lr,train_loss,train_acc") and len(csv) == 2
    # --resume of a finished run trains nothing more
    r = run(args + ["--resume"])
    assert r.exit_code == 0 and "resuming" in r.output and "epoch 1/1" not in r.output


def test_resume_after_a_crash_gives_the_same_weights(tmp_path, mnist5k):
    from robustbench_lite.runtime import SILENT
    from robustbench_lite.training import TrainConfig, train

    def cfg(out, resume=False):
        return TrainConfig(model="lenet", epochs=3, n_train=600, batch_size=50, optimizer="adam", lr=0.003,
                           augment=True, out=str(out), device="cpu", seed=5, resume=resume)

    def crash_after_1(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    out = tmp_path / "crashed.pt"
    with pytest.raises(KeyboardInterrupt):
        train(cfg(out), dataset=mnist5k, narrator=SILENT, on_epoch_end=crash_after_1)
    assert read_checkpoint(out)["epoch"] == 1
    resumed = train(cfg(out, resume=True), dataset=mnist5k, narrator=SILENT)
    assert resumed.epochs_run == 2
    straight = train(cfg(tmp_path / "straight.pt"), dataset=mnist5k, narrator=SILENT)
    a, b = read_checkpoint(out)["state_dict"], read_checkpoint(straight.out)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in resumed.metrics] == [1, 2, 3]


def test_train_on_shared_cifar10_npz(tmp_path):
    from conftest import shared_npz

    p = shared_npz("cifar10.npz")
    r = run(["train", "--model", "lenet", "--dataset", f"npz:{p}", "--epochs", "1", "--n-train", "256",
             "--out", str(tmp_path / "c.pt"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert read_checkpoint(tmp_path / "c.pt")["input_shape"] == [3, 32, 32]


def test_list_shows_every_registry():
    r = run(["list"])
    assert r.exit_code == 0
    for word in ("smallcnn", "resnet18", "mnist-5k", "npz:PATH", "pgd", "fgsm", "smoothrelu", "standard"):
        assert word in r.output


@pytest.mark.parametrize("args,message", [
    (["train", "--model", "resnt18"], "error: unknown model 'resnt18'; did you mean 'resnet18'"),
    (["train", "--dataset", "mnst"], "error: unknown dataset 'mnst'; did you mean"),
    (["train", "--epochs", "0"], "error: --epochs must be >= 1 (got 0)"),
    (["train", "--batch-size", "0"], "error: --batch-size must be >= 1 (got 0)"),
    (["train", "--activation", "sliu"], "error: unknown activation 'sliu'; did you mean 'silu'"),
    (["train", "--optimizer", "rmsprop"], "error: invalid --optimizer 'rmsprop': expected sgd or adam"),
    (["train", "--epochs", "x"], "error: Invalid value for '--epochs'"),
    (["train", "--device", "tpu"], "error: invalid --device 'tpu': expected auto, cpu or cuda"),
    (["train", "--dataset", "npz:/nonexistent/x.npz"], "error: dataset file not found: /nonexistent/x.npz"),
])
def test_bad_train_input_is_one_line_exit_2(tmp_path, args, message):
    r = runner.invoke(app, args + ["--out", str(tmp_path / "m.pt")])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith(message), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "m.pt").exists()


def test_real_process_bad_input_and_python_m(tmp_path):
    p = subprocess.run([sys.executable, "-m", "robustbench_lite", "train", "--model", "nope"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.startswith("error: unknown model 'nope'") and p.stderr.count("\n") == 1
    p = subprocess.run([sys.executable, "-m", "robustbench_lite", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("advbench ")
