"""The champion: the winning student registered in the MLflow Model Registry (alias ``champion``)
as a model that takes the data set's own images and carries kdray's preprocessing inside.

The registered model is a ``torch.export`` program (it loads without kdray) of :class:`RawImages`:
the student behind the exact preprocessing its training and evaluation saw (scale to 0..255,
round, resize with antialiased bilinear as ``kdray.data`` does, normalise). Its input is the data
set's images as they come from their usual loader (:data:`RAW_INPUTS`), so that
``mlflow.pytorch.load_model("models:/NAME@champion")(images)`` gives the logged accuracy (in
fp32, the precision kdray logs accuracies in whatever ``amp`` the run trained with: within one
image of it, ``tests/test_sweep_mlflow.py``); a different resize (nearest instead of bilinear)
costs digits five points.

Registering reads the winning run and never writes to it: the model is a new logged model whose
source run is the winner (the run's start and end time, metrics and tags stay as they were).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from kdray.core.errors import KdrayError
from kdray.tracking.store import global_tracking_uri

ALIAS = "champion"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,255}$")


@dataclass(frozen=True)
class RawInput:
    """What a registered model takes: dtype, the shape of one image (``None``: the run's image
    size), the largest pixel value (scaled to 255 inside), and where such arrays come from."""

    dtype: torch.dtype
    shape: tuple  # (H, W) for grey [N, H, W] input, (H, W, 3) for HWC colour input
    max_value: float
    source: str

    def layout(self, size: int) -> tuple:
        return tuple(size if d is None else d for d in self.shape)

    def describe(self, size: int) -> str:
        dims = ", ".join(str(d) for d in self.layout(size))
        kind = "float32" if self.dtype == torch.float32 else "uint8"
        return f"{kind} [N, {dims}], values 0..{self.max_value:g}: {self.source}"


# Digits stay as scikit-learn gives them (8x8 floats 0..16: the data set's own form, and what a
# user has at hand); colour images as uint8 HWC, the layout of numpy/PIL images and of
# torchvision's CIFAR ``.data`` arrays (channels-first is torch's convention, not the data's).
RAW_INPUTS = {
    "digits": RawInput(torch.float32, (8, 8), 16.0, "sklearn.datasets.load_digits().images"),
    "cifar10": RawInput(torch.uint8, (32, 32, 3), 255.0, "torchvision.datasets.CIFAR10(...).data (RGB, HWC)"),
    "cifar100": RawInput(torch.uint8, (32, 32, 3), 255.0, "torchvision.datasets.CIFAR100(...).data (RGB, HWC)"),
    "imagefolder": RawInput(torch.uint8, (None, None, 3), 255.0,
                            "RGB images (HWC) fitted to the run's image size as kdray does "
                            "(shorter side resized, antialiased bilinear, then centre-cropped)"),
    "fake": RawInput(torch.uint8, (None, None, 3), 255.0, "kdray's synthetic images (RGB, HWC)"),
}


class RawImages(nn.Module):
    """The data set's raw images -> the student's logits, with kdray's preprocessing inside.

    The arithmetic is ``kdray.data``'s: pixels scaled to 0..255 and rounded (uint8 values), three
    channels, resized to ``image_size`` with antialiased bilinear (rounded again), then the
    deploy module (``kdray.deploy.deployed.Deployed``: normalisation, then the student)."""

    def __init__(self, deployed: nn.Module, raw: RawInput, image_size: int):
        super().__init__()
        self.deployed, self.image_size = deployed, int(image_size)
        self.grey = len(raw.shape) == 2
        self.scale = 255.0 / raw.max_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        u = x.mul(self.scale).round().clamp(0, 255) if self.scale != 1.0 else x
        u = u[:, None].expand(-1, 3, -1, -1) if self.grey else u.permute(0, 3, 1, 2)
        if tuple(u.shape[-2:]) != (self.image_size, self.image_size):
            u = F.interpolate(u, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False).round().clamp(0, 255)
        return self.deployed(u / 255.0)  # Deployed takes u / 255 (its normalisation is exact for uint8 u)


def raw_input_of(record: dict) -> RawInput:
    dataset = record.get("dataset") or record.get("config", {}).get("dataset")
    if dataset not in RAW_INPUTS:
        raise KdrayError(f"cannot register a student of data set {dataset!r}; known: {', '.join(RAW_INPUTS)}")
    return RAW_INPUTS[dataset]


def champion_module(record: dict) -> tuple[RawImages, RawInput]:
    """The whole student (EKD: the ensemble, as its accuracy was logged) behind its preprocessing."""
    from kdray.deploy.deployed import deploy_module

    raw = raw_input_of(record)
    return RawImages(deploy_module(record, branch="all"), raw, int(record["image_size"])).eval(), raw


def input_example(raw: RawInput, size: int):
    """Two images (a batch of two keeps the exported batch size dynamic) in the raw input's range."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (2, *raw.layout(size))
    if raw.dtype == torch.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.integers(0, int(raw.max_value) + 1, shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# what the registry shows: the version's description and tags
# ---------------------------------------------------------------------------------------------
def version_facts(run, record: dict, raw: RawInput, parent) -> dict:
    """The model version's tags: its scores, data, teachers, and the sweep and trial it won."""
    m, t = run.data.metrics, run.data.tags
    facts = {"val_acc": m.get("val_acc"), "test_acc": m.get("test_acc"), "params": m.get("params"),
             "latency_ms": m.get("latency_ms"), "dataset": record.get("dataset"), "method": record.get("method"),
             "student": record.get("arch"), "teachers": t.get("kdray.teacher_archs", "none"),
             "trial": run.info.run_name, "run_id": run.info.run_id,
             "sweep": parent.info.run_name if parent is not None else "none",
             "input": raw.describe(int(record["image_size"]))}
    shown = {"val_acc": "{:.4f}", "test_acc": "{:.4f}", "params": "{:.0f}", "latency_ms": "{:.3g}"}
    return {k: shown.get(k, "{}").format(v) for k, v in facts.items() if v is not None}


def version_description(facts: dict, record: dict) -> str:
    size = int(record["image_size"])
    classes = list(record["classes"])
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    return (
        f"{facts.get('method', '?')} student ({facts.get('student', '?')}) of trial `{facts['trial']}` "
        f"(sweep `{facts.get('sweep')}`, teachers {facts.get('teachers')}): val_acc {facts.get('val_acc', '?')}, "
        f"test_acc {facts.get('test_acc', '?')}, {facts.get('params', '?')} params, "
        f"latency {facts.get('latency_ms', '?')} ms (CPU, batch 1, 1 thread).\n\n"
        f"Input: {facts['input']}. Inside: scaled to 0..255 and rounded, resized to {size}x{size} "
        "(bilinear, antialiased, rounded), normalised with the training split's mean and std. "
        f"Output: logits [N, {len(classes)}] for classes {shown}."
    )


# ---------------------------------------------------------------------------------------------
# registering
# ---------------------------------------------------------------------------------------------
def check_model_name(model_name: str) -> None:
    if not _NAME.match(model_name):
        raise KdrayError(f"--register {model_name!r} is not a valid model name; allowed: letters, digits, "
                         "'_', '.', '-', spaces, starting with a letter or digit")


def log_champion_model(uri: str, run, module: nn.Module, example, name: str, facts: dict):
    """A new logged model (source run: the winner) holding the exported program. Created here and
    handed to ``log_model`` by id: given a run instead, MLflow would log to that run (its outputs,
    copies of its metrics)."""
    import mlflow
    from mlflow.models import infer_signature

    from kdray.tracking.store import client

    with torch.no_grad():
        signature = infer_signature(example, module(torch.from_numpy(example)).numpy())
    c = client(uri)
    model = c.create_logged_model(run.info.experiment_id, name=name, source_run_id=run.info.run_id,
                                  params=dict(run.data.params), tags=facts, model_type="kdray-champion")
    with global_tracking_uri(uri):
        mlflow.pytorch.log_model(module, name=name, model_id=model.model_id, input_example=example,
                                 signature=signature,
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])  # no kdray needed
    c.finalize_logged_model(model.model_id, "READY")
    return model


def register_version(uri: str, model, run, name: str, facts: dict, description: str):
    """A new version of registered model ``name`` from ``model``, the alias pointing at it."""
    from mlflow.exceptions import MlflowException

    from kdray.tracking.store import client

    c = client(uri)
    try:
        c.create_registered_model(name, description="kdray students; the alias `champion` is the current best.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # source: the model's artifact location, not ``models:/<id>``, which MLflow 3.17's sqlalchemy
    # registry store resolves through the *global* tracking URI (a TODO in its
    # create_model_version): with none set that reads, and creates, ./mlflow.db in the caller's cwd
    version = c.create_model_version(name, source=model.artifact_location, run_id=run.info.run_id,
                                     tags=facts, description=description, model_id=model.model_id)
    c.set_registered_model_alias(name, ALIAS, version.version)
    return version


def register_champion(uri: str, run_id: str, model_name: str, log: Callable[[str], None] = print) -> dict:
    """Register ``run_id``'s student as ``model_name`` (alias ``champion``): a model of the data set's
    raw images (:data:`RAW_INPUTS`) with its preprocessing inside, a description and tags. The
    run is read, not written."""
    check_model_name(model_name)
    from kdray.core.io import safe_load
    from kdray.tracking.query import download_student, get_run

    run = get_run(uri, run_id)
    record = safe_load(download_student(uri, run_id), "student")
    module, raw = champion_module(record)
    parent_id = run.data.tags.get("mlflow.parentRunId")
    parent: Optional[object] = get_run(uri, parent_id) if parent_id else None
    facts = version_facts(run, record, raw, parent)
    model = log_champion_model(uri, run, module, input_example(raw, int(record["image_size"])), model_name, facts)
    version = register_version(uri, model, run, model_name, facts, version_description(facts, record))
    model_uri = f"models:/{model_name}@{ALIAS}"
    log(f"registered {model_name} version {version.version} (run {run_id}) with alias {ALIAS}; "
        f"input: {facts['input']}")
    return {"model_name": model_name, "version": str(version.version), "alias": ALIAS, "model_uri": model_uri,
            "run_id": run_id, "logged_model_uri": f"models:/{model.model_id}", "input": facts["input"]}
