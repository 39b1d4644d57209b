"""The models researchers have: their own architecture (file:PATH.py:NAME with a plain state_dict and
--normalize), torchvision / timm pretrained weights (tv:/timm: --weights), RobustBench's zoo (rb:NAME,
its layout under --model-dir). Everything offline: the tests write the model files, weights and data;
every bad case is one exact error line and exit code 2; a missing optional extra is its install hint."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from robustbench_lite import runs, sources, zoo
from robustbench_lite.checkpoint import build_checkpoint, file_sha256, save_checkpoint
from robustbench_lite.cli import app
from robustbench_lite.data import load_dataset
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.suite import load_suite

from conftest import shared_npz

runner = CliRunner()

NET_PY = '''
import torch
import torch.nn as nn


class Net(nn.Module):
    """A small CNN for 3x32x32 images, 10 classes, that takes the images as they come; its first
    module is called body, as our own models' network is (its state_dict keys start with body.)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.body(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 4), 1))


def make():
    return Net()


def needs_width(width):
    return Net()


class WantsArgs(nn.Module):
    def __init__(self, width):
        super().__init__()


NOT_A_MODEL = 3
'''


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(r) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # one line, no traceback
    return lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with the user's model file (net.py), its state_dict (net.pt), a CIFAR-shaped dataset the
    test makes (cifar10.npz: 3x32x32, 10 classes) and an empty torch hub (TORCH_HOME)."""
    (tmp_path / "net.py").write_text(NET_PY)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        net_module = importlib.import_module("net")
        importlib.reload(net_module)
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    net = net_module.Net()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    rs = np.random.RandomState(0)
    x = rs.randint(0, 256, size=(60, 32, 32, 3), dtype=np.uint8)
    y = np.arange(60) % 10
    np.savez(tmp_path / "cifar10.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path, net


def npz(work_dir: Path) -> str:
    return f"npz:{work_dir / 'cifar10.npz'}"


def attack(*args):
    return run("attack", "--eps", "8/255", "--attack", "fgsm", "--device", "cpu", "--no-masking-checks", *args)


def leaderboard_rows(results: Path):
    with open(results / "leaderboard.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- file: your own architecture ------------------------------------------------------------------------
def test_file_model_with_its_state_dict_end_to_end(work):
    d, net = work
    r = attack("--model", f"file:{d}/net.py:Net", "--checkpoint", d / "net.pt", "--dataset", npz(d), "-n", "20",
               "--results-dir", d / "results", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    ds = load_dataset(npz(d))
    x, y, _ = ds.subset("test", 20, 0)
    with torch.no_grad():  # the raw [0, 1] images go to the user's network (no --normalize)
        expected = (net.eval()(x).argmax(1) == y).float().mean().item()
    assert out["clean_acc"] == pytest.approx(expected)
    assert out["model"] == f"file:{d}/net.py:Net" and out["checkpoint_sha256"] == file_sha256(d / "net.pt")
    (row,) = [r for r in leaderboard_rows(d / "results") if r["attack"] == "fgsm"]
    assert row["model"] == f"file:{d}/net.py:Net"


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "net", "dataparallel"])
def test_file_model_state_dict_nested_or_from_dataparallel(work, wrap):
    d, net = work
    sd = net.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd, "optimizer": {}},
           "net": {"net": sd, "acc": 0.5},
           "dataparallel": {"state_dict": {f"module.{k}": v for k, v in sd.items()}}}[wrap]
    torch.save(obj, d / "wrapped.pt")
    ds = load_dataset(npz(d))
    model, info = zoo.load_model("file:net.py:Net", str(d / "wrapped.pt"), ds)
    x = ds.x_test[:5]
    with torch.no_grad():
        assert torch.equal(model(x), net.eval()(x))
    assert info["model"] == "file:net.py:Net" and info["defense"] == ""


def test_file_model_normalize_wraps_it_in_our_normalize_layer(work):
    d, net = work
    ds = load_dataset(npz(d))
    x = ds.x_test[:5]
    model, info = zoo.load_model("file:net.py:make", str(d / "net.pt"), ds, normalize="0.5/0.25")
    assert model.normalize.mean.flatten().tolist() == [0.5] * 3 and model.normalize.std.flatten().tolist() == [0.25] * 3
    with torch.no_grad():
        assert torch.allclose(model(x), net.eval()((x - 0.5) / 0.25))
    model, _ = zoo.load_model("file:net.py:Net", str(d / "net.pt"), ds, normalize="cifar10")
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.4914, 0.4822, 0.4465])
    assert sources.parse_normalize("0.1,0.2,0.3/1,2,3") == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    assert "normalize" in info["flags"]


def test_file_model_from_an_importable_module(work, monkeypatch):
    d, net = work
    monkeypatch.syspath_prepend(str(d))
    ds = load_dataset(npz(d))
    model, _ = zoo.load_model("file:net:make", str(d / "net.pt"), ds)
    with torch.no_grad():
        assert torch.equal(model(ds.x_test[:3]), net.eval()(ds.x_test[:3]))


def test_a_checkpoint_naming_a_file_model_never_runs_it_unless_named(work):
    d, _ = work
    ds = load_dataset(npz(d))
    model, _ = zoo.load_model("file:net.py:Net", str(d / "net.pt"), ds)
    save_checkpoint(d / "adv.pt", build_checkpoint(model, dataset=ds.name))
    line = error_line(attack("--checkpoint", d / "adv.pt", "--dataset", npz(d), "-n", "5", "--results-dir", d / "r"))
    assert line == (f"error: checkpoint {d}/adv.pt holds model 'file:net.py:Net', your own code: name it with "
                    f"--model file:net.py:Net to run it (a checkpoint alone never runs code)")
    r = attack("--model", "file:net.py:Net", "--checkpoint", d / "adv.pt", "--dataset", npz(d), "-n", "5",
               "--results-dir", d / "r")
    assert r.exit_code == 0, r.stderr


def test_file_model_errors_are_one_line(work):
    d, _ = work
    base = ["--dataset", npz(d), "-n", "5", "--results-dir", d / "r"]
    torch.save(nn.Linear(3, 2).state_dict(), d / "linear.pt")
    (d / "broken.py").write_text("import torch\nraise ValueError('no GPU here')\n")
    cases = [
        (["--model", "file:net.py:Nett", "--checkpoint", d / "net.pt"],
         "error: model file net.py does not define Nett; did you mean 'Net'? (it defines Net, WantsArgs, make, "
         "needs_width)"),
        (["--model", "file:missing.py:Net", "--checkpoint", d / "net.pt"], "error: model file not found: missing.py"),
        (["--model", "file:net.py", "--checkpoint", d / "net.pt"],
         "error: model 'file:net.py' must name a file and what it defines, file:PATH.py:NAME (or an importable "
         "module, file:module.sub:NAME)"),
        (["--model", "file:broken.py:Net", "--checkpoint", d / "net.pt"],
         "error: model file broken.py could not be imported (ValueError: no GPU here)"),
        (["--model", "file:net.py:WantsArgs", "--checkpoint", d / "net.pt"],
         "error: WantsArgs of model file net.py needs arguments (width): name a class or a factory that takes none "
         "(e.g. def make(): return WantsArgs(...))"),
        (["--model", "file:net.py:NOT_A_MODEL", "--checkpoint", d / "net.pt"],
         "error: NOT_A_MODEL of model file net.py is a int, not an nn.Module class or a factory"),
        (["--model", "file:net.py:Net", "--checkpoint", d / "linear.pt"],
         f"error: checkpoint {d}/linear.pt does not match model 'file:net.py:Net': missing keys: body.body.weight, "
         f"body.body.bias, body.head.weight, body.head.bias; unexpected keys: body.weight, body.bias"),
        (["--model", "file:net.py:Net", "--checkpoint", d / "net.pt", "--normalize", "0.5"],
         "error: --normalize must be MEAN/STD (e.g. 0.5/0.25, or one value per channel: "
         "0.4914,0.4822,0.4465/0.2471,0.2435,0.2616) or a dataset name such as cifar10 or imagenet (got '0.5')"),
        (["--model", "file:net.py:Net", "--checkpoint", d / "net.pt", "--weights", "DEFAULT"],
         "error: --weights takes a tv:NAME or timm:NAME model (got 'file:net.py:Net'); your own network's "
         "state_dict goes with --checkpoint"),
        (["--model", "smallcnn", "--normalize", "cifar10"],
         "error: --normalize states what the network of --checkpoint or --weights expects (the zoo baseline uses "
         "its dataset's)"),
    ]
    for args, expected in cases:
        assert error_line(attack(*args, *base)) == expected, args
    # a model that does not take the dataset's inputs (3-channel convolution, 1-channel digits)
    line = error_line(attack("--model", "file:net.py:Net", "--checkpoint", d / "net.pt", "-n", "5",
                             "--results-dir", d / "r"))
    assert line.startswith("error: model 'file:net.py:Net' cannot take the 1x28x28 images of dataset mnist-5k (")


def test_file_model_with_the_wrong_number_of_classes(work):
    d, _ = work
    rs = np.random.RandomState(1)
    np.savez(d / "five.npz", x_train=rs.randint(0, 256, (20, 32, 32, 3), dtype=np.uint8), y_train=np.arange(20) % 5,
             x_test=rs.randint(0, 256, (10, 32, 32, 3), dtype=np.uint8), y_test=np.arange(10) % 5)
    line = error_line(attack("--model", "file:net.py:Net", "--checkpoint", d / "net.pt", "--dataset",
                             f"npz:{d}/five.npz", "-n", "5", "--results-dir", d / "r"))
    assert line == f"error: model 'file:net.py:Net' gives 10 logits per image, dataset npz:{d}/five.npz has 5 classes"


def test_suite_takes_the_model_sources(work):
    d, _ = work
    (d / "suite.yaml").write_text(f"""
dataset: {npz(d)}
n_examples: 10
device: cpu
masking_checks: false
results_dir: {d}/results
models:
  - {{name: "file:net.py:Net", checkpoint: net.pt, normalize: "0.5/0.25"}}
  - {{name: "tv:resnet18", weights: DEFAULT}}
threats: [{{norm: linf, eps: 8/255}}]
attacks: [fgsm]
""")
    s = load_suite(d / "suite.yaml")
    runs = s.runs()
    assert (runs[0].model, runs[0].checkpoint, runs[0].normalize) == ("file:net.py:Net", "net.pt", "0.5/0.25")
    assert (runs[1].model, runs[1].weights) == ("tv:resnet18", "DEFAULT")
    r = run("run", d / "suite.yaml")  # the tv:resnet18 weights are not in the (empty) hub cache
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: tv:resnet18 weights IMAGENET1K_V1 not found at {d}/torch-home/hub/checkpoints/resnet18-f37072fd.pth "
        f"(no download without --download; offline, put the file resnet18-f37072fd.pth there, or give the file "
        f"with --weights PATH)")
    (row,) = [r for r in leaderboard_rows(d / "results") if r["attack"] == "fgsm"]  # the first model ran
    assert row["model"] == "file:net.py:Net"
    assert (f"for a reportable robust accuracy run `advbench attack --model file:net.py:Net --checkpoint net.pt "
            f"--normalize 0.5/0.25 --dataset {npz(d)} --norm linf --eps 8/255 -n 10 --suite standard`") in r.stdout
    (d / "bad.yaml").write_text((d / "suite.yaml").read_text().replace("weights: DEFAULT", "model_dir: models"))
    with pytest.raises(AdvbenchError, match=r"bad.yaml: line 9: model_dir is where rb:NAME models"):
        load_suite(d / "bad.yaml")


# --- tv: torchvision's pretrained weights ------------------------------------------------------------------
def test_tv_weights_file_takes_the_weights_preprocessing(work):
    import torchvision

    d, _ = work
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(ref.state_dict(), d / "resnet18.pth")
    ds = load_dataset(npz(d))
    model, info = zoo.load_model("tv:resnet18", None, ds, weights=str(d / "resnet18.pth"))
    x = ds.x_test[:4]
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), ref((x - mean) / std), atol=1e-5)
    assert model.spec["weights_input_size"] == 224 and model.spec["weights_resize_size"] == 256
    assert info["checkpoint_sha256"] == file_sha256(d / "resnet18.pth") and "weights=file" in info["flags"]
    r = attack("--model", "tv:resnet18", "--weights", d / "resnet18.pth", "--dataset", npz(d), "-n", "10",
               "--results-dir", d / "results", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "tv:resnet18"


def test_an_image_folder_is_cropped_to_the_tv_weights_input_size(work, monkeypatch):
    """tv:NAME --weights on an image folder: the crop is the weights' (efficientnet_b1: 240 px), unless
    --image-size says otherwise; other models keep the folder's default."""
    import torchvision
    from PIL import Image

    d, _ = work
    for c in range(3):
        (d / "folder" / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.full((300, 260, 3), 60 * c, np.uint8)).save(d / "folder" / f"c{c}" / "a.jpg")
    torch.save(torchvision.models.efficientnet_b1(num_classes=3).state_dict(), d / "b1.pth")
    assert sources.weights_image_size("tv:efficientnet_b1", str(d / "b1.pth")) == 240
    assert sources.weights_image_size("tv:resnet18", "DEFAULT") == 224
    assert sources.weights_image_size("smallcnn", None) is None and sources.weights_image_size("tv:resnet18", None) is None
    loaded = []

    def load(*args, **kw):
        ds = load_dataset(*args, **kw)
        loaded.append(ds.input_shape)
        return ds

    monkeypatch.setattr(runs, "load_dataset", load)
    for extra, size in (([], 240), (["--image-size", "64"], 64)):
        r = attack("--model", "tv:efficientnet_b1", "--weights", d / "b1.pth", "--dataset",
                   f"imagefolder:{d / 'folder'}", "-n", "all", "--results-dir", d / "results", *extra)
        assert r.exit_code == 0, r.stderr
        assert loaded[-1] == (3, size, size)


def test_tv_default_weights_come_from_the_torch_hub_cache(work):
    import torchvision

    d, _ = work
    # a 1000-class dataset, and torchvision's file name in the (test's) hub cache: no network
    rs = np.random.RandomState(2)
    np.savez(d / "thousand.npz", x_train=rs.randint(0, 256, (20, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(20) * 50, x_test=rs.randint(0, 256, (4, 32, 32, 3), dtype=np.uint8),
             y_test=np.array([0, 1, 2, 999]))
    hub = d / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(2)
    ref = torchvision.models.resnet18().eval()
    torch.save(ref.state_dict(), hub / "resnet18-f37072fd.pth")
    ds = load_dataset(f"npz:{d}/thousand.npz")
    model, info = zoo.load_model("tv:resnet18", None, ds, weights="DEFAULT")
    with torch.no_grad():
        assert torch.allclose(model(ds.x_test), ref((ds.x_test - model.normalize.mean) / model.normalize.std),
                              atol=1e-5)
    assert info["checkpoint"] == str(hub / "resnet18-f37072fd.pth") and "weights=IMAGENET1K_V1" in info["flags"]
    same, _ = zoo.load_model("tv:resnet18", None, ds, weights="ResNet18_Weights.IMAGENET1K_V1")
    with torch.no_grad():
        assert torch.equal(same(ds.x_test), model(ds.x_test))
    # ImageNet weights on a 10-class dataset: refused in one line
    line = error_line(attack("--model", "tv:resnet18", "--weights", "DEFAULT", "--dataset", npz(d), "-n", "5",
                             "--results-dir", d / "r"))
    assert line == f"error: model 'tv:resnet18' gives 1000 logits per image, dataset {npz(d)} has 10 classes"
    line = error_line(attack("--model", "tv:resnet18", "--weights", "IMAGENET1K_V7", "--dataset", npz(d), "-n", "5",
                             "--results-dir", d / "r"))
    assert line == "error: tv:resnet18 has no --weights 'IMAGENET1K_V7' (known: DEFAULT, IMAGENET1K_V1, or a file)"


def test_tv_weights_errors(work, monkeypatch):
    d, _ = work
    base = ["--dataset", npz(d), "-n", "5", "--results-dir", d / "r"]
    torch.save(nn.Linear(3, 2).state_dict(), d / "linear.pth")
    assert error_line(attack("--model", "tv:resnet18", "--weights", "DEFAULT", *base)) == (
        f"error: tv:resnet18 weights IMAGENET1K_V1 not found at {d}/torch-home/hub/checkpoints/resnet18-f37072fd.pth "
        f"(no download without --download; offline, put the file resnet18-f37072fd.pth there, or give the file with "
        f"--weights PATH)")
    assert error_line(attack("--model", "tv:resnet18", "--weights", d / "nope.pth", *base)) == (
        f"error: weights file not found: {d}/nope.pth")
    line = error_line(attack("--model", "tv:resnet18", "--weights", d / "linear.pth", *base))
    assert line.startswith(f"error: weights {d}/linear.pth does not match model 'tv:resnet18': missing keys: "
                           f"body.conv1.weight, body.bn1.weight")
    assert error_line(attack("--model", "tv:resnet18", "--weights", "DEFAULT", "--checkpoint", d / "net.pt",
                             *base)) == "error: --weights and --checkpoint conflict: give the pretrained weights once"
    # --download without a network: one line naming the file it could not fetch (never a traceback)
    import urllib.error

    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert error_line(attack("--model", "tv:resnet18", "--weights", "DEFAULT", "--download", *base)) == (
        f"error: could not download the weights of tv:resnet18 to {d}/torch-home/hub/checkpoints/resnet18-f37072fd.pth "
        f"(URLError: <urlopen error [Errno -2] Name or service not known>)")


# --- timm ----------------------------------------------------------------------------------------------------
def test_timm_weights_file_and_pretrained_cache(work, monkeypatch):
    timm = pytest.importorskip("timm")
    hf = pytest.importorskip("huggingface_hub")
    d, _ = work
    torch.manual_seed(3)
    ref = timm.create_model("resnet18", num_classes=10).eval()
    torch.save(ref.state_dict(), d / "timm-resnet18.pth")
    ds = load_dataset(npz(d))
    model, info = zoo.load_model("timm:resnet18", None, ds, weights=str(d / "timm-resnet18.pth"))
    x = ds.x_test[:4]
    with torch.no_grad():
        assert torch.allclose(model(x), ref((x - model.normalize.mean) / model.normalize.std), atol=1e-5)
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])  # timm's cfg
    assert model.spec["weights_input_size"] == 224 and "weights=file" in info["flags"]
    r = attack("--model", "timm:resnet18", "--weights", d / "timm-resnet18.pth", "--dataset", npz(d), "-n", "10",
               "--results-dir", d / "results", "--json")
    assert r.exit_code == 0, r.stderr
    # DEFAULT: timm's pretrained weights from the Hugging Face hub cache (laid out as the hub does), no network
    cache = d / "hf-cache"
    monkeypatch.setattr(hf.constants, "HF_HUB_CACHE", str(cache))
    line = error_line(attack("--model", "timm:resnet18", "--weights", "DEFAULT", "--dataset", npz(d), "-n", "5",
                             "--results-dir", d / "r"))
    assert line == (f"error: timm:resnet18 pretrained weights not found in the Hugging Face hub cache at "
                    f"{cache}/models--timm--resnet18.a1_in1k (no download without --download; offline, give the "
                    f"file with --weights PATH)")
    from safetensors.torch import save_file

    snap = cache / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (cache / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (cache / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0" * 40)
    full = timm.create_model("resnet18").eval()
    save_file(full.state_dict(), str(snap / "model.safetensors"))
    rs = np.random.RandomState(2)
    np.savez(d / "thousand.npz", x_train=rs.randint(0, 256, (20, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(20) * 50, x_test=rs.randint(0, 256, (4, 32, 32, 3), dtype=np.uint8),
             y_test=np.array([0, 1, 2, 999]))
    ds1k = load_dataset(f"npz:{d}/thousand.npz")
    model, info = zoo.load_model("timm:resnet18", None, ds1k, weights="DEFAULT")
    with torch.no_grad():
        assert torch.allclose(model(ds1k.x_test), full((ds1k.x_test - model.normalize.mean) / model.normalize.std),
                              atol=1e-5)
    assert info["checkpoint"] == str(snap / "model.safetensors")


# --- rb: RobustBench's zoo -----------------------------------------------------------------------------------
def need_robustbench():
    try:
        sources._import_robustbench("these tests")
    except AdvbenchError as exc:  # the extra is not installed here
        pytest.skip(str(exc))


def robustbench_net(name: str, dataset: str = "cifar10", threat: str = "Linf"):
    need_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)][name]["model"]()


@pytest.fixture
def rb_dir(work):
    """RobustBench's layout with Wong2020Fast (cifar10, Linf: a PreActResNet-18 that normalises inside
    itself), its weights written by the test (seeded random init)."""
    need_robustbench()
    d, _ = work
    torch.manual_seed(4)
    net = robustbench_net("Wong2020Fast").eval()
    path = d / "rb-models" / "cifar10" / "Linf" / "Wong2020Fast.pt"
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)
    return d / "rb-models", net


def test_robustbench_model_from_its_layout_gets_images_in_0_1(work, rb_dir):
    d, _ = work
    root, ref = rb_dir
    ds = load_dataset(npz(d))
    model, info = zoo.load_model("rb:Wong2020Fast", None, ds, model_dir=str(root), norm="linf")
    x = ds.x_test[:4]
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # our Normalize is the identity: it normalises inside itself
    assert model.normalize.mean.abs().max() == 0 and (model.normalize.std == 1).all()
    assert info["checkpoint"] == str(root / "cifar10" / "Linf" / "Wong2020Fast.pt")
    assert info["checkpoint_sha256"] == file_sha256(root / "cifar10" / "Linf" / "Wong2020Fast.pt")
    assert "robustbench=cifar10/Linf" in info["flags"]
    seen = []
    model.body.register_forward_pre_hook(lambda m, inp: seen.append((inp[0].min().item(), inp[0].max().item())))
    r = attack("--model", "rb:Wong2020Fast", "--model-dir", root, "--dataset", npz(d), "-n", "10",
               "--results-dir", d / "results", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == "rb:Wong2020Fast" and out["checkpoint_sha256"] == info["checkpoint_sha256"]
    xs, ys, _ = ds.subset("test", 10, 0)
    with torch.no_grad():
        assert out["clean_acc"] == pytest.approx((ref(xs).argmax(1) == ys).float().mean().item())
    # the report re-runs the attack on the model as the run loaded it (its config records --model-dir)
    r = run("report", out["run_id"], "--results-dir", d / "results", "--n-images", "2")
    assert r.exit_code == 0, r.stderr
    assert (Path(out["run_dir"]) / "report.md").is_file()
    # the attacked network itself only ever sees images in [0, 1]
    from robustbench_lite.evaluator import evaluate
    from robustbench_lite.specs import with_overrides

    res = evaluate(model, xs, ys, with_overrides("fgsm,pgd", steps=2), eps="8/255")
    assert res.n_total == 10 and seen and all(lo >= 0 and hi <= 1 for lo, hi in seen)


def test_robustbench_errors(work, rb_dir):
    d, _ = work
    root, _ = rb_dir
    base = ["--dataset", npz(d), "-n", "5", "--results-dir", d / "r"]
    cases = [
        (["--model", "rb:Standard", "--model-dir", root],
         f"error: rb:Standard weights not found at {root}/cifar10/Linf/Standard.pt (RobustBench's layout "
         f"<model-dir>/cifar10/Linf/Standard.pt; no download without --download; offline, put the file there)"),
        (["--model", "rb:corruptions/Standard", "--model-dir", root],  # a threat model of its own, not --norm's
         f"error: rb:Standard weights not found at {root}/cifar10/corruptions/Standard.pt (RobustBench's layout "
         f"<model-dir>/cifar10/corruptions/Standard.pt; no download without --download; offline, put the file "
         f"there)"),
        (["--model", "rb:Wong2020Fast", "--model-dir", root, "--norm", "l2", "--eps", "0.5"],
         "error: unknown RobustBench model 'Wong2020Fast' for cifar10 L2 (RobustBench's leaderboard lists its models)"),
        (["--model", "rb:Wong2020Fst", "--model-dir", root],
         "error: unknown RobustBench model 'Wong2020Fst' for cifar10 Linf; did you mean rb:Wong2020Fast? "
         "(RobustBench's leaderboard lists its models)"),
        (["--model", "rb:Wong2020Fast", "--model-dir", root, "--normalize", "cifar10"],
         "error: rb:Wong2020Fast normalises its inputs inside itself (RobustBench's models take images in [0, 1]): "
         "drop --normalize"),
        (["--model", "rb:Wong2020Fast", "--model-dir", root, "--checkpoint", d / "net.pt"],
         "error: rb:Wong2020Fast loads its weights from --model-dir (RobustBench's layout): drop --checkpoint"),
        (["--model", "smallcnn", "--model-dir", root],
         "error: --model-dir is where rb:NAME models (RobustBench's zoo) keep their weights (got model 'smallcnn')"),
    ]
    for args, expected in cases:
        assert error_line(attack(*args, *base)) == expected, args
    # not RobustBench's datasets
    assert error_line(attack("--model", "rb:Wong2020Fast", "--model-dir", root, "-n", "5", "--results-dir",
                             d / "r")) == (
        "error: RobustBench's models are for cifar10, cifar100 and imagenet: dataset mnist-5k is none of them (an npz "
        "file counts by its name, e.g. npz:DIR/cifar10.npz)")
    # a file that is not this architecture's weights
    torch.save(nn.Linear(3, 2).state_dict(), root / "cifar10" / "Linf" / "Sehwag2021Proxy_R18.pt")
    line = error_line(attack("--model", "rb:Sehwag2021Proxy_R18", "--model-dir", root, *base))
    assert line.startswith(f"error: {root}/cifar10/Linf/Sehwag2021Proxy_R18.pt does not match "
                           f"RobustBench's rb:Sehwag2021Proxy_R18 architecture (Missing key(s) in "
                           f"state_dict: ")


def test_robustbench_download_goes_through_robustbench_only_when_asked(work, rb_dir, monkeypatch):
    import robustbench.utils

    d, _ = work
    root, ref = rb_dir
    fetched = []

    def fake_gdrive(gdrive_id, fname_save):  # RobustBench's own download path, without the network
        fetched.append((gdrive_id, str(fname_save)))
        torch.save(ref.state_dict(), fname_save)

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", fake_gdrive)
    other = d / "elsewhere"
    base = ["--model", "rb:Wong2020Fast", "--model-dir", other, "--dataset", npz(d), "-n", "5", "--results-dir",
            d / "r"]
    assert error_line(attack(*base)).startswith(f"error: rb:Wong2020Fast weights not found at {other}/cifar10/Linf/")
    assert not fetched
    r = attack(*base, "--download")
    assert r.exit_code == 0, r.stderr
    assert fetched == [("1Re--_lf3jCEw9bnQqGkjw3J7v2tSZKrv", f"{other}/cifar10/Linf/Wong2020Fast.pt")]


@pytest.mark.slow
def test_robustbench_standard_wrn_28_10_end_to_end(work):
    """The command of the issue, offline: rb:Standard (a WideResNet-28-10) from a RobustBench layout the
    test writes, on the real CIFAR-10 test images of ../shared/data/cifar10.npz (about 40 s on 2 cores)."""
    need_robustbench()
    d, _ = work
    data = shared_npz("cifar10.npz")
    torch.manual_seed(5)
    net = robustbench_net("Standard").eval()
    path = d / "rb-models" / "cifar10" / "Linf" / "Standard.pt"
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)
    r = run("attack", "--model", "rb:Standard", "--dataset", f"npz:{data}", "--model-dir", d / "rb-models", "--eps",
            "8/255", "-n", "50", "--device", "cpu", "--results-dir", d / "results", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == "rb:Standard" and out["n_examples"] == 50
    assert out["checkpoint_sha256"] == file_sha256(path)


# --- optional extras -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module,model,extra", [("robustbench", "rb:Standard", "robustbench"),
                                                ("timm", "timm:resnet18", "timm")])
def test_a_missing_extra_is_its_install_hint(work, monkeypatch, module, model, extra):
    d, _ = work
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    extra_args = ["--weights", "DEFAULT"] if extra == "timm" else []
    line = error_line(attack("--model", model, *extra_args, "--dataset", npz(d), "-n", "5", "--results-dir", d / "r"))
    assert line == f"error: model {model} needs the optional package {module}: pip install 'advbench[{extra}]'"
    from robustbench_lite.models import optional_import

    with pytest.raises(AdvbenchError, match=rf"^x needs the optional package {module}: pip install "
                                            rf"'advbench\[{extra}\]'$"):
        optional_import(module, extra, "x")
