"""Datasets (embedded default, npz, torchvision path) and model zoo architectures."""
import numpy as np
import pytest
import torch

from robustbench_lite.data import load_dataset
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.models import Normalize, create_model, model_for_dataset

from conftest import shared_npz


def test_mnist5k_is_real_stratified_and_in_range(mnist5k):
    ds = mnist5k
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert 0 <= ds.x_train.min() and ds.x_train.max() <= 1 and ds.x_train.max() == 1
    assert ds.y_train.bincount().tolist() == [400] * 10
    assert ds.y_test.bincount().tolist() == [100] * 10
    # disjoint splits: no test image equals a training image
    tr = {bytes(r) for r in (ds.x_train.flatten(1) * 255).round().to(torch.uint8).numpy()}
    te = [bytes(r) for r in (ds.x_test.flatten(1) * 255).round().to(torch.uint8).numpy()]
    assert sum(r in tr for r in te) <= 5  # MNIST has a handful of exact duplicates, not a leak
    assert ds.mean == (0.1307,) and ds.num_classes == 10


def test_subsets_are_deterministic(mnist5k):
    x1, y1, i1 = mnist5k.subset("test", 100, seed=3)
    x2, y2, i2 = mnist5k.subset("test", 100, seed=3)
    _, _, i3 = mnist5k.subset("test", 100, seed=4)
    assert torch.equal(i1, i2) and torch.equal(x1, x2) and not torch.equal(i1, i3)
    assert torch.equal(x1, mnist5k.x_test[i1])
    with pytest.raises(AdvbenchError, match=r"n_examples 5000 is larger than the test split of mnist-5k \(1000"):
        mnist5k.subset("test", 5000)
    with pytest.raises(AdvbenchError, match="n_examples must be >= 1"):
        mnist5k.subset("test", 0)


def test_npz_uint8_nhwc_and_float_nchw(tmp_path):
    rs = np.random.RandomState(0)
    p = tmp_path / "d.npz"
    np.savez(p, x_train=rs.randint(0, 256, (20, 8, 8, 3)).astype(np.uint8), y_train=rs.randint(0, 4, 20),
             x_test=rs.randint(0, 256, (6, 8, 8, 3)).astype(np.uint8), y_test=np.arange(6) % 4)
    ds = load_dataset(f"npz:{p}")
    assert ds.x_train.shape == (20, 3, 8, 8) and ds.num_classes == 4 and len(ds.mean) == 3
    q = tmp_path / "f.npz"
    np.savez(q, x_train=rs.rand(10, 1, 8, 8).astype(np.float32), y_train=np.arange(10) % 2,
             x_test=rs.rand(4, 1, 8, 8).astype(np.float32), y_test=np.arange(4) % 2)
    assert load_dataset(f"npz:{q}").x_test.shape == (4, 1, 8, 8)


def test_npz_errors(tmp_path):
    with pytest.raises(AdvbenchError, match="dataset file not found"):
        load_dataset(f"npz:{tmp_path / 'none.npz'}")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(AdvbenchError, match="missing arrays y_train, x_test, y_test"):
        load_dataset(f"npz:{bad}")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(AdvbenchError, match="not a readable .npz file"):
        load_dataset(f"npz:{junk}")


def test_torchvision_dataset_missing_offline_names_the_path(tmp_path):
    with pytest.raises(AdvbenchError) as e:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert f"dataset 'cifar10' not found at {tmp_path}/cifar-10-batches-py (pass download" in str(e.value)


def test_shared_cifar10_npz_loads():
    ds = load_dataset(f"npz:{shared_npz('cifar10.npz')}")
    assert ds.x_train.shape == (4000, 3, 32, 32) and ds.x_test.shape == (1000, 3, 32, 32)
    assert ds.y_test[:20].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]


@pytest.mark.parametrize("name", ["smallcnn", "lenet", "resnet18", "preact-resnet18", "tv:resnet18"])
@pytest.mark.parametrize("shape", [(1, 28), (3, 32)])
def test_models_build_for_both_shapes(name, shape):
    c, s = shape
    m = create_model(name, in_channels=c, num_classes=7, input_size=s, mean=(0.5,), std=(0.25,))
    assert isinstance(list(m.children())[0], Normalize)
    m.eval()
    with torch.no_grad():
        out = m(torch.rand(2, c, s, s))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_normalize_is_inside_the_model():
    m = create_model("lenet", in_channels=1, num_classes=10, input_size=28, mean=(0.5,), std=(0.25,))
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(m.normalize(x), (x - 0.5) / 0.25)


def test_a_quantized_model_rounds_its_inputs_to_4_levels_and_has_no_input_gradient(mnist5k, tmp_path):
    from robustbench_lite.checkpoint import build_checkpoint, model_from_checkpoint, save_checkpoint

    model = model_for_dataset("quantized:smallcnn", mnist5k).eval()
    assert model.spec["name"] == "quantized:smallcnn" and model.levels == 4
    inner = create_model("smallcnn", in_channels=1, num_classes=10, input_size=28, mean=mnist5k.mean,
                         std=mnist5k.std)
    inner.load_state_dict(model.state_dict())  # the same parameters: the quantiser has none
    x = torch.rand(8, 1, 28, 28, requires_grad=True)
    grey = torch.round(x.detach() * 3) / 3
    assert torch.equal(model(x), inner(grey)) and torch.equal(model(grey), inner(grey))
    model(x).sum().backward()
    assert torch.count_nonzero(x.grad) == 0  # shattered gradients: what gradient attacks see
    path = tmp_path / "q.pt"
    save_checkpoint(path, build_checkpoint(model, dataset=mnist5k.name))
    again, ckpt = model_from_checkpoint(path, "quantized:smallcnn", mnist5k)
    assert ckpt["model"] == "quantized:smallcnn" and torch.equal(again(grey), model(grey))


def test_activation_is_applied_everywhere():
    m = create_model("resnet18", in_channels=3, num_classes=10, input_size=32, activation="silu")
    kinds = {type(mod).__name__ for mod in m.modules()}
    assert "SiLU" in kinds and "ReLU" not in kinds
    tv = create_model("tv:resnet18", in_channels=3, num_classes=10, activation="gelu")
    assert not any(isinstance(mod, torch.nn.ReLU) for mod in tv.modules())
    with pytest.raises(AdvbenchError, match="unknown activation 'sliu'; did you mean 'silu'"):
        create_model("smallcnn", activation="sliu")
    with pytest.raises(AdvbenchError, match="unknown torchvision model 'resnet19'"):
        create_model("tv:resnet19")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet34", "resnet50", "wrn-28-10", "wrn-34-10"])
def test_big_models_build(name):
    m = create_model(name, in_channels=3, num_classes=10, input_size=32).eval()
    with torch.no_grad():
        assert m(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_model_for_dataset(mnist5k):
    m = model_for_dataset("smallcnn", mnist5k)
    assert m.spec["in_channels"] == 1 and m.spec["num_classes"] == 10 and m.spec["input_size"] == 28
