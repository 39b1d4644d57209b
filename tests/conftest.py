"""Shared fixtures: the embedded dataset, a quickly trained smallcnn, and a private model zoo per test."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def advbench_home(tmp_path, monkeypatch):
    """Every test gets its own empty ADVBENCH_HOME (the model zoo; subprocesses inherit it): no test
    reads or writes ~/.cache/advbench."""
    home = tmp_path / "advbench-home"
    monkeypatch.setenv("ADVBENCH_HOME", str(home))
    return home


def seed_zoo(checkpoint, model: str = "smallcnn", dataset: str = "mnist-5k") -> Path:
    """Copy ``checkpoint`` in as the standard zoo baseline of ``model`` on ``dataset`` (under the current
    ADVBENCH_HOME); returns the entry's path."""
    from robustbench_lite.zoo import zoo_path

    dest = zoo_path(model, dataset)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(checkpoint, dest)
    return dest


@pytest.fixture
def zoo_smallcnn(trained_smallcnn_path, advbench_home):
    """The session's trained smallcnn as this test's zoo baseline for mnist-5k; returns its path."""
    return seed_zoo(trained_smallcnn_path)


@pytest.fixture(scope="session")
def mnist5k():
    from robustbench_lite.data import load_dataset

    return load_dataset("mnist-5k")


@pytest.fixture(scope="session")
def trained_smallcnn_path(tmp_path_factory, mnist5k):
    """A standard smallcnn trained for 2 epochs on mnist-5k (about 10 s on 2 cores)."""
    from robustbench_lite.runtime import SILENT
    from robustbench_lite.training import TrainConfig, train

    out = tmp_path_factory.mktemp("zoo") / "smallcnn-mnist-5k-standard.pt"
    train(TrainConfig(model="smallcnn", dataset="mnist-5k", epochs=2, out=str(out), device="cpu", seed=0),
          dataset=mnist5k, narrator=SILENT)
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
