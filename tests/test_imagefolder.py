"""Image folders (imagefolder:PATH, imagenet): streamed through DataLoader workers batch by batch, never
one tensor; attacked end to end through the CLI; their error lines; RobustBench's imagenet list."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from robustbench_lite import data
from robustbench_lite.checkpoint import build_checkpoint, save_checkpoint
from robustbench_lite.cli import app
from robustbench_lite.data import StreamedImages, load_dataset
from robustbench_lite.evaluator import Journal, evaluate
from robustbench_lite.models import create_model
from robustbench_lite.specs import AttackSpec

runner = CliRunner()
CLASSES = ("cat", "dog", "fox")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def fails(*args) -> str:
    r = run(*args)
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stdout == "", r.stderr
    return r.stderr


def make_folder(root: Path, per_class: int = 7, classes=CLASSES, seed: int = 0) -> Path:
    """JPEGs of varied sizes (and one PNG), class k brighter than class k-1 (mean (80 k + 40) / 255, give or
    take 25 / 255)."""
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
            a = (rng.random((h, w, 3)) * 80 + k * 80 + rng.integers(-25, 26)).clip(0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / c / f"{i:02d}.{'png' if i == 0 else 'jpg'}")
    return root


def make_checkpoint(path: Path, size: int = 32, classes: int = 3) -> Path:
    torch.manual_seed(0)
    m = create_model("smallcnn", in_channels=3, num_classes=classes, input_size=size,
                     mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD)
    save_checkpoint(path, build_checkpoint(m, dataset="imagefolder"))
    return path


class Brightness(torch.nn.Module):
    """A plain model of the folders make_folder makes: class k's pixels average (80 k + 40) / 255."""

    def forward(self, x):
        centres = (torch.arange(3, dtype=x.dtype, device=x.device) * 80 + 40) / 255
        return -200 * (x.mean(dim=(1, 2, 3))[:, None] - centres) ** 2


def reference_tensors(root: Path, size: int):
    """The folder as tensors by torchvision's own ImageFolder and transforms (RobustBench's Res256Crop224
    scaled to ``size``): what the streamed images must equal."""
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    ds = tvd.ImageFolder(str(root), T.Compose([T.Resize(data.resize_for(size)), T.CenterCrop(size), T.ToTensor()]))
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack(xs), torch.tensor(ys)


def test_streamed_images_equal_torchvision_imagefolder(tmp_path):
    root = make_folder(tmp_path / "folder")
    ds = load_dataset(f"imagefolder:{root}", image_size=32)
    assert ds.streamed and ds.num_classes == 3 and len(ds.y_test) == 21 and ds.input_shape == (3, 32, 32)
    assert len(ds.x_train) == 0
    x_ref, y_ref = reference_tensors(root, 32)
    assert torch.equal(ds.y_test, y_ref)
    batches = list(ds.x_test.batches([range(0, 8), range(8, 16), range(16, 21)]))
    assert [b.shape[0] for b in batches] == [8, 8, 5]
    assert torch.equal(torch.cat(batches), x_ref)
    # a lazy selection stays streamed until loaded
    x, y, ids = ds.subset("test", 5, seed=3)
    assert isinstance(x, StreamedImages) and len(x) == 5
    assert torch.equal(x.to("cpu"), x_ref[ids]) and torch.equal(y, y_ref[ids])
    # an empty selection (no clean-correct sample for the masking checks) is an empty batch
    none = torch.zeros(21, dtype=torch.bool)
    assert ds.x_test[none].to("cpu").shape == (0, 3, 32, 32)
    mask = torch.arange(21) % 4 == 1  # a boolean mask selects as it does on a tensor
    assert torch.equal(ds.x_test[mask].to("cpu"), x_ref[mask])
    parts = list(ds.x_test.batches([range(0, 2), [], range(19, 21)]))
    assert [b.shape[0] for b in parts] == [2, 0, 2] and torch.equal(parts[2], x_ref[19:21])
    # the fingerprint is the files' and the size's: another crop is another dataset
    assert load_dataset(f"imagefolder:{root}", image_size=40).fingerprint != ds.fingerprint
    assert load_dataset(f"imagefolder:{root}").input_shape == (3, 224, 224)


def test_streamed_evaluation_equals_the_tensor_one_and_resumes(tmp_path):
    root = make_folder(tmp_path / "folder")
    model = Brightness()
    ds = load_dataset(f"imagefolder:{root}", image_size=32)
    x_ref, y_ref = reference_tensors(root, 32)
    kw = dict(attacks=["fgsm", "pgd"], eps=0.12, batch_size=4, device="cpu", cascade=True)
    ref = evaluate(model, x_ref, y_ref, **kw)
    journal = Journal(tmp_path / "journal")
    got = evaluate(model, ds.x_test, ds.y_test, journal=journal, **kw)
    assert torch.equal(got.clean_pred, ref.clean_pred) and got.clean_acc == 1.0
    assert 0 < ref.threats[0].worst_case_acc < 1
    for label in ("fgsm", "pgd"):
        a, b = got.threats[0].attacks[label], ref.threats[0].attacks[label]
        assert torch.equal(a.adv_pred, b.adv_pred) and torch.equal(a.fooled, b.fooled)
    assert got.threats[0].worst_case_acc == ref.threats[0].worst_case_acc
    saved = journal.count()
    assert saved >= 1
    again = evaluate(model, ds.x_test, ds.y_test, journal=journal, **kw)  # every batch from the journal
    assert journal.count() == saved
    assert torch.equal(again.threats[0].attacks["pgd"].fooled, got.threats[0].attacks["pgd"].fooled)


def test_imagefolder_attacked_end_to_end_through_the_cli(tmp_path):
    root = make_folder(tmp_path / "folder")
    ckpt = make_checkpoint(tmp_path / "ck.pt", size=32)
    results = tmp_path / "results"
    r = run("attack", "--checkpoint", ckpt, "--dataset", f"imagefolder:{root}", "--n-examples", "all",
            "--attack", "fgsm,pgd", "--steps", "3", "--eps", "8/255", "--batch-size", "8", "--device", "cpu",
            "--results-dir", results, "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["n_examples"] == 21 and summary["dataset"] == f"imagefolder:{root}"
    # the checkpoint's 32 px decided the crop; the numbers are those of the tensor evaluation
    model = create_model("smallcnn", in_channels=3, num_classes=3, input_size=32, mean=data.IMAGENET_MEAN,
                         std=data.IMAGENET_STD)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    x_ref, y_ref = reference_tensors(root, 32)
    ref = evaluate(model, x_ref, y_ref, ["fgsm", AttackSpec("pgd", {"steps": 3}, "pgd")], eps=8 / 255, device="cpu")
    assert summary["clean_acc"] == ref.clean_acc
    assert summary["threats"][0]["attacks"]["pgd"]["robust_acc"] == ref.threats[0].robust_acc("pgd")
    with open(Path(summary["run_dir"]) / "outcomes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["sample_id"]) for r in rows] == list(range(21))
    assert [int(r["label"]) for r in rows] == y_ref.tolist()
    # the report reloads the folder at the run's crop and re-runs the attack for its example images
    run_dir = Path(summary["run_dir"])
    r = run("report", run_dir.name, "--results-dir", results)
    assert r.exit_code == 0, r.stderr
    assert (run_dir / "examples.png").is_file() and "no example images" not in (run_dir / "report.md").read_text()
    # a crop the checkpoint cannot take is refused in one line
    assert fails("attack", "--checkpoint", ckpt, "--dataset", f"imagefolder:{root}", "--image-size", "40",
                 "--eps", "8/255", "--results-dir", results, "-n", "all") == (
        f"error: checkpoint {ckpt} expects 3x32x32 inputs, dataset imagefolder:{root} has 3x40x40\n")


def test_image_folder_error_lines(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck.pt")
    results = tmp_path / "results"

    def attack(dataset, *extra):
        return fails("attack", "--checkpoint", ckpt, "--dataset", dataset, "--eps", "8/255", "--device", "cpu",
                     "--results-dir", results, *extra)

    missing = tmp_path / "missing"
    assert attack(f"imagefolder:{missing}") == f"error: dataset imagefolder:{missing}: directory not found: {missing}\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert attack(f"imagefolder:{empty}") == (
        f"error: dataset imagefolder:{empty}: {empty} holds no class folders (expected {empty}/CLASS/IMAGE.jpg, "
        f"one folder per class)\n")
    for c in ("a", "b"):
        (empty / c).mkdir()
    assert attack(f"imagefolder:{empty}") == f"error: dataset imagefolder:{empty}: {empty} holds no images (its " \
                                             f"class folders a, b are empty)\n"
    one = make_folder(tmp_path / "one", per_class=3, classes=("only",))
    assert attack(f"imagefolder:{one}") == (
        f"error: dataset imagefolder:{one}: {one} has one class folder (only): a classification dataset needs at "
        f"least 2 classes\n")
    notes = make_folder(tmp_path / "notes", per_class=3)
    (notes / "dog" / "notes.txt").write_text("not a picture")
    assert attack(f"imagefolder:{notes}") == (
        f"error: dataset imagefolder:{notes}: {notes / 'dog' / 'notes.txt'} is not an image file (expected jpg, "
        f"jpeg, png, ppm, bmp, pgm, tif, tiff, webp)\n")
    broken = make_folder(tmp_path / "broken", per_class=3)
    (broken / "fox" / "00.png").write_bytes(b"\x89PNG but not really")
    r = run("attack", "--checkpoint", ckpt, "--dataset", f"imagefolder:{broken}", "--eps", "8/255", "--device", "cpu",
            "--results-dir", results, "--n-examples", "all")  # found by the clean pass, after the run's first line
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {broken / 'fox' / '00.png'} is not a readable image (cannot identify image "
                               f"file")
    few = make_folder(tmp_path / "few", per_class=3)
    assert attack(f"imagefolder:{few}", "--n-examples", "50") == (
        f"error: --n-examples 50 is larger than the test split of imagefolder:{few} (9 examples)\n")
    assert attack(f"imagefolder:{few}", "--n-examples", "some") == (
        "error: --n-examples must be a number of test examples or all (got 'some')\n")
    assert attack(f"imagefolder:{few}", "--image-size", "4") == "error: --image-size must be an integer >= 8 (got 4)\n"
    assert fails("attack", "--model", "smallcnn", "--eps", "0.3", "--image-size", "64", "--results-dir",
                 results) == "error: --image-size applies to image folders (imagenet, imagefolder:PATH), not to " \
                             "mnist-5k\n"
    assert not any((results / "runs").glob("*"))  # nothing recorded


def test_an_image_folder_trains_nothing(tmp_path):
    root = make_folder(tmp_path / "folder", per_class=3)
    r = run("attack", "--model", "smallcnn", "--dataset", f"imagefolder:{root}", "--eps", "8/255",
            "--device", "cpu", "--results-dir", tmp_path / "results", "-n", "all")
    assert r.exit_code == 2 and r.stderr == (
        f"error: dataset imagefolder:{root} has no training images (an evaluation-only image folder): nothing to "
        f"train a model on; evaluate a checkpoint instead\n")


# --- imagenet ---------------------------------------------------------------------------------------
def imagenet_folder(root: Path, images: dict) -> Path:
    """1,000 synset folders (n00000000 ...); ``images``: synset index -> number of JPEGs in it."""
    rng = np.random.default_rng(1)
    for k in range(data.IMAGENET_CLASSES):
        d = root / f"n{k:08d}"
        d.mkdir(parents=True)
        for i in range(images.get(k, 0)):
            a = (rng.random((int(rng.integers(30, 60)), int(rng.integers(30, 60)), 3)) * 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"ILSVRC2012_val_{k:04d}{i:04d}.JPEG")
    return root


@pytest.fixture
def fake_robustbench(tmp_path, monkeypatch):
    """A stand-in for the installed package robustbench: only its list of evaluation images."""
    pkg = tmp_path / "site" / "robustbench"
    (pkg / "helper_files").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "robustbench", raising=False)

    def write(lines):
        (pkg / data.ROBUSTBENCH_IMAGENET_LIST).write_text("\n".join(lines))
    return write


def test_imagenet_takes_robustbench_list_in_its_order(tmp_path, fake_robustbench):
    root = imagenet_folder(tmp_path / "imagenet" / "val", {3: 2, 7: 2, 999: 1})
    listed = ["n00000999/ILSVRC2012_val_09990000.JPEG", "n00000003/ILSVRC2012_val_00030001.JPEG",
              "n00000007/ILSVRC2012_val_00070000.JPEG", "n00000003/ILSVRC2012_val_00030000.JPEG"]
    fake_robustbench(listed)
    ds = load_dataset("imagenet", data_dir=str(tmp_path / "imagenet"), image_size=16)  # DATA_DIR/val as RobustBench
    assert ds.num_classes == 1000 and ds.y_test.tolist() == [999, 3, 7, 3] and ds.first_n
    assert [Path(f).relative_to(root).as_posix() for f in ds.x_test.files] == listed
    x, y, ids = ds.subset("test", 2, seed=5)  # RobustBench's n examples: the first n of its list
    assert ids.tolist() == [0, 1] and y.tolist() == [999, 3] and x.to("cpu").shape == (2, 3, 16, 16)
    assert load_dataset("imagenet", data_dir=str(root)).input_shape == (3, 224, 224)

    fake_robustbench(listed + ["n00000005/ILSVRC2012_val_00050000.JPEG"])
    data._CACHE.clear()
    with pytest.raises(data.AdvbenchError, match=r"^dataset 'imagenet': 1 of the 5 images of RobustBench's "
                                                 r"evaluation list are missing from .* \(first: n00000005/"):
        load_dataset("imagenet", data_dir=str(root))


def test_imagenet_without_robustbench_is_every_image_seeded(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "robustbench_imagenet_list", lambda: None)
    root = imagenet_folder(tmp_path / "val", {0: 2, 500: 3})
    ds = load_dataset("imagenet", data_dir=str(root), image_size=16)
    assert ds.y_test.tolist() == [0, 0, 500, 500, 500] and not ds.first_n
    assert ds.subset("test", 2, seed=0)[2].tolist() == ds.subset("test", 2, seed=0)[2].tolist()
    ckpt = make_checkpoint(tmp_path / "ck.pt", size=16, classes=1000)  # its 16 px decide the crop
    r = run("attack", "--checkpoint", ckpt, "--dataset", "imagenet", "--data-dir", root, "-n", "4", "--attack",
            "fgsm", "--eps", "4/255", "--device", "cpu", "--results-dir", tmp_path / "results", "--no-masking-checks")
    assert r.exit_code == 0, r.stderr
    assert ("imagenet: the package robustbench is not installed, so the test split is all 5 images (seeded "
            "subsets), not RobustBench's list of 5,000 (pip install 'advbench[robustbench]')") in r.stdout
    assert "n=4" in r.stdout


def test_imagenet_error_lines(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck.pt", classes=1000)
    results = tmp_path / "results"

    def attack(*extra):
        return fails("attack", "--checkpoint", ckpt, "--dataset", "imagenet", "--eps", "4/255", "--results-dir",
                     results, *extra)

    assert attack() == ("error: dataset 'imagenet' needs --data-dir: ImageNet's validation folder, one folder per "
                        "class (n01440764/ILSVRC2012_val_00000293.JPEG, ...)\n")
    folder = make_folder(tmp_path / "small", per_class=2)
    assert attack("--data-dir", folder) == (
        f"error: dataset 'imagenet': {folder} has 3 class folders, ImageNet's validation split has 1,000 "
        f"(n01440764, ...); use imagefolder:PATH for another folder\n")
    assert attack("--data-dir", folder, "--download").startswith("error: dataset 'imagenet' cannot be downloaded")


def test_n_examples_all_takes_the_whole_test_split(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, x_train=rng.integers(0, 255, (40, 8, 8, 3), dtype=np.uint8), y_train=np.arange(40) % 3,
             x_test=rng.integers(0, 255, (23, 8, 8, 3), dtype=np.uint8), y_test=np.arange(23) % 3)
    torch.manual_seed(0)
    ds = load_dataset(f"npz:{npz}")
    m = create_model("smallcnn", in_channels=3, num_classes=3, input_size=8, mean=ds.mean, std=ds.std)
    ckpt = tmp_path / "ck.pt"
    save_checkpoint(ckpt, build_checkpoint(m, dataset=f"npz:{npz}"))
    r = run("attack", "--checkpoint", ckpt, "--n-examples", "all", "--attack", "fgsm", "--eps", "8/255",
            "--device", "cpu", "--results-dir", tmp_path / "results", "--json", "--no-masking-checks")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["n_examples"] == 23


def test_a_python_model_on_an_image_folder_at_224_px(tmp_path):
    """The Python API on an image folder at the default 224 px: several streamed batches, the same numbers
    as the tensor evaluation of torchvision's own ImageFolder."""
    import robustbench_lite

    root = make_folder(tmp_path / "folder")
    net = Brightness()
    record = robustbench_lite.benchmark(net, f"imagefolder:{root}", eps=0.12, suite=None, attacks=["pgd"],
                                        n_examples=None, batch_size=8, device="cpu")
    assert record.result.n_total == 21 and record.info["dataset"] == f"imagefolder:{root}"
    x_ref, y_ref = reference_tensors(root, 224)
    ref = evaluate(net, x_ref, y_ref, ["pgd"], eps=0.12, device="cpu")
    assert record.clean_acc == ref.clean_acc == 1.0
    assert record.robust_acc == {"pgd": ref.threats[0].robust_acc("pgd")} and 0 < record.worst_case_acc < 1
