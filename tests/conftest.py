import os

import pytest

from kdray.config import RunConfig


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI", ""))


def small_cfg(**kw) -> RunConfig:
    """A config that trains in about a second on 2 CPU cores."""
    base = dict(dataset="fake", image_size=16, student="resnet8", epochs=2, batch_size=64,
                eval_batch_size=256, lr=0.05, device="cpu")
    base.update(kw)
    return RunConfig().replace(**base)


@pytest.fixture(scope="session")
def fake_teachers(tmp_path_factory):
    """Two tiny trained teachers on the fake dataset (different archs)."""
    from kdray.teachers import train_teachers

    out = tmp_path_factory.mktemp("teachers")
    train_teachers(small_cfg(epochs=2), ["resnet8", "resnet14"], 2, out, log=lambda s: None)
    return out
