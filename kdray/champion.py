"""The champion: the winning student logged as an MLflow PyTorch model and registered
under a name with the alias ``champion``."""

from __future__ import annotations

import re
from typing import Callable

from .errors import KdrayError

ALIAS = "champion"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,255}$")


def register_champion(uri: str, run_id: str, model_name: str, log: Callable[[str], None] = print) -> dict:
    """Log ``run_id``'s student (the whole student: EKD's ensemble, as its accuracy was logged) as
    ``model`` in that run, register it as ``model_name`` and point the alias ``champion`` at it.

    The registered model takes float images in [0, 1], shape [N, 3, H, W], and returns logits; it
    normalises inside, so ``mlflow.pytorch.load_model("models:/NAME@champion")(x)`` is all a user
    needs."""
    if not _NAME.match(model_name):
        raise KdrayError(f"--register {model_name!r} is not a valid model name; allowed: letters, digits, "
                         "'_', '.', '-', spaces, starting with a letter or digit")
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from . import tracking as tr
    from .checkpoint import safe_load
    from .export import deploy_module

    record = safe_load(tr.download_student(uri, run_id), "student")
    module = deploy_module(record, branch="all").eval()
    size = int(record["image_size"])
    example = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        out = module(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, out)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                module, name="model", input_example=example, signature=signature,
                registered_model_name=model_name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],  # a torch.export program: no kdray needed
            )
        version = str(info.registered_model_version)
        tr.client(uri).set_registered_model_alias(model_name, ALIAS, version)
    finally:
        mlflow.set_tracking_uri(previous)
    model_uri = f"models:/{model_name}@{ALIAS}"
    log(f"registered {model_name} version {version} (run {run_id}) with alias {ALIAS}")
    return {"model_name": model_name, "version": version, "alias": ALIAS, "model_uri": model_uri, "run_id": run_id,
            "logged_model_uri": info.model_uri}
