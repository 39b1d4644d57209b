"""Checkpoints: format, atomic save, safe load, plain state_dicts, clear mismatch errors."""
import os
import pickle
import random

import pytest
import torch

from robustbench_lite.checkpoint import (FORMAT, build_checkpoint, model_from_checkpoint, read_checkpoint,
                                         save_checkpoint)
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.models import model_for_dataset


@pytest.fixture
def lenet(mnist5k):
    torch.manual_seed(0)
    return model_for_dataset("lenet", mnist5k, activation="silu")


def test_roundtrip_carries_everything(tmp_path, lenet, mnist5k):
    p = tmp_path / "m.pt"
    save_checkpoint(p, build_checkpoint(lenet, dataset="mnist-5k", metrics={"test_acc": 0.5}, epoch=3))
    ck = read_checkpoint(p)
    assert ck["format"] == FORMAT and ck["model"] == "lenet" and ck["epoch"] == 3
    assert ck["activation"] == "silu" and ck["input_shape"] == [1, 28, 28] and ck["num_classes"] == 10
    assert ck["normalization"]["mean"] == pytest.approx([0.1307])
    m2, _ = model_from_checkpoint(p, None, mnist5k)
    x = torch.rand(4, 1, 28, 28)
    lenet.eval()
    assert torch.equal(m2(x), lenet(x))
    assert not m2.training
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed away


def test_plain_state_dict_loads_with_model_name(tmp_path, lenet, mnist5k):
    p = tmp_path / "sd.pt"
    torch.save(lenet.body.state_dict(), p)  # a bare network's weights, as other tools save them
    m2, _ = model_from_checkpoint(p, "lenet", mnist5k)
    relu_lenet = model_for_dataset("lenet", mnist5k)
    assert set(m2.state_dict()) == set(relu_lenet.state_dict())
    with pytest.raises(AdvbenchError, match="plain state_dict: name its architecture with model"):
        model_from_checkpoint(p, None, mnist5k)


def test_architecture_mismatch_names_keys(tmp_path, lenet, mnist5k):
    p = tmp_path / "sd.pt"
    torch.save(lenet.state_dict(), p)
    with pytest.raises(AdvbenchError) as e:
        model_from_checkpoint(p, "smallcnn", mnist5k)
    msg = str(e.value)
    assert "does not match model 'smallcnn'" in msg
    assert "unexpected keys: body.11.weight, body.11.bias" in msg  # lenet has one layer more
    assert "shape mismatch: body.0.weight (6, 1, 5, 5) vs (32, 1, 5, 5)" in msg
    q = tmp_path / "ck.pt"
    save_checkpoint(q, build_checkpoint(lenet, dataset="mnist-5k"))
    with pytest.raises(AdvbenchError, match="holds model 'lenet', not 'smallcnn'"):
        model_from_checkpoint(q, "smallcnn", mnist5k)


def test_wrong_number_of_classes(tmp_path, lenet, mnist5k):
    from robustbench_lite.models import create_model

    m = create_model("lenet", in_channels=1, num_classes=3, input_size=28)
    p = tmp_path / "c3.pt"
    save_checkpoint(p, build_checkpoint(m, dataset="x"))
    with pytest.raises(AdvbenchError, match="has 3 classes, dataset mnist-5k has 10"):
        model_from_checkpoint(p, None, mnist5k)


def test_missing_corrupt_truncated(tmp_path, lenet):
    with pytest.raises(AdvbenchError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    for seed in range(20):
        junk.write_bytes(random.Random(seed).randbytes(300))
        with pytest.raises(AdvbenchError, match="is corrupt or truncated"):
            read_checkpoint(junk)
    good = tmp_path / "good.pt"
    save_checkpoint(good, build_checkpoint(lenet, dataset="mnist-5k"))
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdvbenchError, match="is corrupt or truncated"):
        read_checkpoint(cut)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_payload_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload()}, p)
    with pytest.raises(AdvbenchError, match="refused: it contains Python objects"):
        read_checkpoint(p)
    assert not (tmp_path / "PWNED").exists()
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(AdvbenchError):
        read_checkpoint(raw)
    assert not (tmp_path / "PWNED").exists()
