"""Shared fixtures: the embedded dataset and a quickly trained smallcnn."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def mnist5k():
    from robustbench_lite.data import load_dataset

    return load_dataset("mnist-5k")


@pytest.fixture(scope="session")
def trained_smallcnn_path(tmp_path_factory, mnist5k):
    """A standard smallcnn trained for 2 epochs on mnist-5k (about 10 s on 2 cores)."""
    from robustbench_lite.training import TrainConfig, train

    out = tmp_path_factory.mktemp("zoo") / "smallcnn-mnist-5k-standard.pt"
    train(TrainConfig(model="smallcnn", dataset="mnist-5k", epochs=2, out=str(out), device="cpu", seed=0),
          dataset=mnist5k, quiet=True)
    return out


@pytest.fixture(scope="session")
def trained_smallcnn(trained_smallcnn_path, mnist5k):
    """(model in eval mode, x_test, y_test) for the trained smallcnn."""
    from robustbench_lite.checkpoint import model_from_checkpoint

    model, _ = model_from_checkpoint(trained_smallcnn_path, "smallcnn", mnist5k)
    return model, mnist5k.x_test, mnist5k.y_test


def shared_npz(name: str) -> Path:
    p = SHARED_DATA / name
    if not p.is_file():
        pytest.skip(f"{p} not present")
    return p
