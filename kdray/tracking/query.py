"""Reading tracked runs back: a run, its student file, an experiment's best runs."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Optional

from kdray.core.errors import KdrayError
from kdray.core.io import first_line
from kdray.core.values import mask_credentials
from kdray.tracking.store import client, experiment_id
from kdray.tracking.tags import (
    KIND_TAG,
    STATE_TAG,
    STUDENT_ARTIFACT,
)


def get_run(uri: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client(uri).get_run(run_id)
    except MlflowException as exc:
        raise KdrayError(f"MLflow run {run_id!r} does not exist at {mask_credentials(uri)} "
                         f"({first_line(exc, 120)})") from None


def download_student(uri: str, run_id: str, dst: Optional[Path] = None) -> Path:
    """The run's ``student/student.pt`` as a local file."""
    get_run(uri, run_id)
    dst = Path(dst or tempfile.mkdtemp(prefix="kdray-student-"))
    try:
        local = client(uri).download_artifacts(run_id, STUDENT_ARTIFACT, str(dst))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
        raise KdrayError(f"run {run_id} has no {STUDENT_ARTIFACT} artifact ({first_line(exc, 120)})") from None
    return Path(local)


#: the runs `kdray best` ranks: one student each
RANKED_KINDS = ("train", "trial")


def best_runs(uri: str, experiment: str, *, metric: Optional[str] = None, mode: Optional[str] = None,
              max_params: Optional[int] = None, max_latency_ms: Optional[float] = None, top: int = 5,
              states: tuple = ("completed",), without_tag: Optional[str] = None) -> tuple[list, str, str]:
    """Top runs of ``experiment`` (trials and train runs: not sweep or seed-group parents, nor
    compare runs) by ``metric``; ``without_tag``: runs carrying that tag are not candidates."""
    c = client(uri)
    exp_id = experiment_id(uri, experiment, create=False)
    if metric is None or mode is None:
        parents = c.search_runs([exp_id], filter_string=f"tags.`{KIND_TAG}` = 'sweep'", max_results=1)
        tags = parents[0].data.tags if parents else {}
        metric = metric or tags.get("kdray.metric", "val_acc").split(",")[0]
        mode = mode or tags.get("kdray.mode", "max").split(",")[0]
    if mode not in ("max", "min"):
        raise KdrayError(f"--mode {mode!r} is not allowed; allowed: max, min")
    candidates = c.search_runs([exp_id], filter_string=f"tags.`{KIND_TAG}` != 'sweep'",
                               order_by=[f"metrics.{metric} {'DESC' if mode == 'max' else 'ASC'}"],
                               max_results=5000)
    candidates = [r for r in candidates if r.data.tags.get(STATE_TAG) in states
                  and r.data.tags.get(KIND_TAG) in RANKED_KINDS and not (without_tag and without_tag in r.data.tags)]
    if not candidates:
        raise KdrayError(f"experiment {experiment!r} has no {'/'.join(states)} run yet")
    with_metric = [r for r in candidates if metric in r.data.metrics]
    if not with_metric:
        have = sorted({k for r in candidates for k in r.data.metrics})
        raise KdrayError(f"no run in {experiment!r} logged metric {metric!r}; logged: {', '.join(have[:20])}")
    pool = with_metric
    if max_params is not None:
        fit = [r for r in pool if r.data.metrics.get("params", math.inf) <= max_params]
        if not fit:
            smallest = min(r.data.metrics.get("params", math.inf) for r in pool)
            raise KdrayError(f"no run in {experiment!r} has params <= {max_params}; the smallest has {smallest:.0f}")
        pool = fit
    if max_latency_ms is not None:
        fit = [r for r in pool if r.data.metrics.get("latency_ms", math.inf) <= max_latency_ms]
        if not fit:
            fastest = min(r.data.metrics.get("latency_ms", math.inf) for r in pool)
            raise KdrayError(f"no run in {experiment!r} has latency_ms <= {max_latency_ms:g}; "
                             f"the fastest has {fastest:.3f} ms")
        pool = fit
    return pool[:top], metric, mode
