"""One MLflow run: what it logs (params, tags, its data set), starting and finishing it (or
discarding it, when its command was refused before it began), its student as a logged model,
:class:`RunLogger`, which logs each epoch as it ends, and a full store's disk as one error naming
the file."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from kdray.core.errors import KdrayError
from kdray.tracking.store import client, is_local_store, lost, scheme
from kdray.tracking.tags import (
    BOOKKEEPING,
    KIND_TAG,
    MLFLOW_STATUS,
    NOTE_TAG,
    REASON_TAG,
    RUNTIME_KEYS,
    STATE_TAG,
    STUDENT_ARTIFACT,
    STUDENT_MODEL_TYPE,
    TRIAL_TAG,
)

#: on a `kdray train` run: its run folder (relative to the working directory when inside it), so
#: that ``--resume`` finds the runs earlier attempts at the same folder left open
FOLDER_TAG = "kdray.run_folder"


# ---------------------------------------------------------------------------------------------
# what a run logs: params, tags, its data set
# ---------------------------------------------------------------------------------------------
def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("kdray", "ray", "torch", "torchvision", "optuna", "mlflow"):
        try:
            out[f"version.{pkg}"] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def relative_path(value: str, workdir: Optional[Path]) -> str:
    """A path inside the working directory as relative to it (runs of a workdir moved, copied or
    made in a temporary folder still read the same); anything else unchanged."""
    if workdir is None or not isinstance(value, str) or not os.path.isabs(value):
        return value
    try:
        return str(Path(value).resolve().relative_to(Path(workdir).resolve()))
    except ValueError:
        return value


def param_text(value) -> str:
    """A param as the UI shows it: floats to 4 significant digits (0.1904, not 0.190391...)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(param_text(v) for v in value) + "]"
    return str(value)


def config_params(values: dict, workdir: Optional[Path] = None) -> dict:
    """MLflow params of a run's config values (flat: the caller splits per-branch lists), without
    the runtime keys, rounded, paths relative to ``workdir``."""
    return {k: param_text(relative_path(v, workdir)) for k, v in sorted(values.items()) if k not in RUNTIME_KEYS}


def run_tags(values: dict, teacher_archs: Optional[Sequence[str]] = None) -> dict:
    """The tags naming what a run trains: method, data set, student (from its config ``values``), teachers."""
    tags = {"kdray.method": values.get("method"), "kdray.dataset": values.get("dataset"),
            "kdray.student": values.get("student")}
    if teacher_archs:
        tags["kdray.teacher_archs"] = ",".join(teacher_archs)
    return tags


def source_tags(kind: str) -> dict:
    """MLflow's source tags (the runs table's Source column): the kdray command that made the run."""
    command = {"train": "kdray train", "teacher": "kdray teachers train"}.get(kind, "kdray tune")
    return {"mlflow.source.type": "LOCAL", "mlflow.source.name": command}


def dataset_input(cfg_dict: dict):
    """The run's training data as an MLflow dataset input: the data set and how its train split
    is drawn (the digest changes when the split does); no data is read."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    split = {k: cfg_dict.get(k) for k in ("dataset", "train_fraction", "val_fraction", "data_seed", "image_size")}
    name = cfg_dict.get("dataset", "data")
    if cfg_dict.get("data_dir"):
        split["data_dir"] = Path(str(cfg_dict["data_dir"])).name
        name = f"{name}:{split['data_dir']}"
    digest = hashlib.sha256(json.dumps(split, sort_keys=True, default=str).encode()).hexdigest()[:8]
    dataset = Dataset(name=name, digest=digest, source_type="kdray", source=json.dumps(split, default=str))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])


def log_batch(c, run_id: str, params: Optional[dict] = None, tags: Optional[dict] = None,
              metrics: Optional[dict] = None, step: int = 0, model_id: Optional[str] = None) -> None:
    """``metrics``: numbers only (others skipped); ``model_id``: the logged model they also describe."""
    from mlflow.entities import Metric, Param, RunTag

    ts = int(time.time() * 1000)
    ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    ts_ = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
    ms = [Metric(k, float(v), ts, step, model_id=model_id) for k, v in (metrics or {}).items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    for i in range(0, max(len(ps), 1), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run_id, params=ps[i:i + 100], tags=ts_ if i == 0 else [], metrics=ms if i == 0 else [])


def run_metrics(metrics: dict) -> dict:
    """What a run logs of what the engine reports: everything but its bookkeeping."""
    return {k: v for k, v in metrics.items() if k not in BOOKKEEPING}


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
def start_run(uri: str, exp_id: str, *, run_name: str, cfg, kind: str, params: Optional[dict] = None,
              parent_run_id: Optional[str] = None, extra_tags: Optional[dict] = None,
              teacher_archs: Optional[Sequence[str]] = None, workdir: Optional[Path] = None) -> str:
    """Create a run with kdray's tags, ``params`` (the flat config values to log; default every
    key of ``cfg``) and its data set as input; returns its id."""
    c, values = client(uri), cfg.to_dict()
    tags = {KIND_TAG: kind, STATE_TAG: "running", **run_tags(values, teacher_archs), **source_tags(kind),
            **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    log_batch(c, run.info.run_id, params=config_params(values if params is None else params, workdir))
    c.log_inputs(run.info.run_id, datasets=[dataset_input(values)])
    return run.info.run_id


def describe_run(run, state: str, reason: Optional[str] = None) -> str:
    """A trial's or a training run's description: how it ended, and its numbers."""
    m = run.data.metrics
    when = f"after epoch {int(m['epoch'])}" if "epoch" in m else "in its first epoch"
    scores = ", ".join(f"{k} {m[k]:.4f}" for k in ("val_acc", "test_acc") if k in m) or "no score"
    size = f", {int(m['params']):,} params" if "params" in m else ""
    if state == "completed":
        return f"Completed {when}: {scores}{size}."
    if state == "pruned":
        return f"Pruned {when} (stopped early by the sweep's scheduler): {scores} so far{size}."
    return f"{state.capitalize()} {when}: {reason or 'no reason recorded'}"


def finish_run(uri: str, run_id: str, state: str, reason: Optional[str] = None) -> None:
    """Set kdray.state (completed / pruned / failed / interrupted), the run's description, close its
    student model, and end the MLflow run accordingly."""
    c = client(uri)
    run = c.get_run(run_id)
    tags = {STATE_TAG: state}
    if reason:
        tags[REASON_TAG] = reason[:4000]
    if run.data.tags.get(KIND_TAG) != "sweep":  # a sweep's description is its summary
        tags[NOTE_TAG] = describe_run(run, state, reason)
    log_batch(c, run_id, tags=tags)
    close_student_model(c, run, state)
    c.set_terminated(run_id, MLFLOW_STATUS.get(state, "FINISHED"))


def close_running_runs(uri: str, exp_id: str, state: str, reason: str) -> int:
    """End every run of the experiment that kdray left running (a driver killed, interrupted or cut
    off from the server) with ``state``; how many were closed."""
    runs = client(uri).search_runs([exp_id], filter_string=f"tags.`{STATE_TAG}` = 'running'", max_results=5000)
    for run in runs:
        finish_run(uri, run.info.run_id, state, reason)
    return len(runs)


def discard_run(uri: str, run_id: str) -> None:
    """Take away a run whose command was refused before it began: from a local store (sqlite,
    file) for good, as ``mlflow gc`` does; on a tracking server it is marked deleted (the server's
    ``mlflow gc`` removes it)."""
    c = client(uri)
    c.delete_run(run_id)
    store = getattr(getattr(c, "_tracking_client", None), "store", None)
    hard_delete = getattr(store, "_hard_delete_run", None)  # what `mlflow gc` calls; not on a REST store
    if is_local_store(uri) and hard_delete is not None:
        hard_delete(run_id)


def close_earlier_attempts(uri: str, exp_id: str, folder: str, current: str, reason: str) -> list:
    """End the runs of the experiment that earlier `kdray train` attempts at run folder ``folder``
    (its :data:`FOLDER_TAG`) left running (killed, or unable to write to the store as they failed)
    as failed, all but run ``current``; the ids of those closed."""
    runs = client(uri).search_runs([exp_id], filter_string=f"tags.`{STATE_TAG}` = 'running'", max_results=5000)
    closed = [r.info.run_id for r in runs if r.data.tags.get(KIND_TAG) == "train"
              and r.data.tags.get(FOLDER_TAG) == folder and r.info.run_id != current]
    for run_id in closed:
        finish_run(uri, run_id, "failed", reason)
    return closed


def find_trial_run(uri: str, exp_id: str, parent_run_id: str, trial_id: str):
    runs = client(uri).search_runs(
        [exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=5,
    )
    return runs[0] if runs else None


# ---------------------------------------------------------------------------------------------
# a run's student as an MLflow logged model (the runs table's Models column, the Models tab)
# ---------------------------------------------------------------------------------------------
def student_model(c, run, create: bool = False):
    """The logged model holding ``run``'s student (created, PENDING, when missing and ``create``),
    named ``<method>-<architecture>`` (what the Models column shows). Not ``student``: MLflow 3
    serves a run artifact path whose first folder is the name of one of the run's logged models
    (``student/student.pt``) from that model instead (RunsArtifactRepository)."""
    found = c.search_logged_models([run.info.experiment_id], max_results=1, filter_string=(
        f"source_run_id = '{run.info.run_id}' AND model_type = '{STUDENT_MODEL_TYPE}'"))
    if found or not create:
        return found[0] if found else None
    p = run.data.params
    name = f"{p.get('method', 'kdray')}-{p.get('student', 'student')}"
    return c.create_logged_model(run.info.experiment_id, name=name, source_run_id=run.info.run_id, params=dict(p),
                                 model_type=STUDENT_MODEL_TYPE)


def close_student_model(c, run, state: str) -> None:
    """A finished (or pruned) run's student goes into its logged model, which becomes READY; a
    failed or interrupted run's model is marked FAILED."""
    from mlflow.entities import LoggedModelStatus

    model = student_model(c, run)
    if model is None or model.status != LoggedModelStatus.PENDING:
        return
    c.set_logged_model_tags(model.model_id, {STATE_TAG: state})
    if state not in ("completed", "pruned"):
        c.finalize_logged_model(model.model_id, "FAILED")
        return
    with tempfile.TemporaryDirectory(prefix="kdray-student-") as tmp:
        try:
            local = c.download_artifacts(run.info.run_id, STUDENT_ARTIFACT, tmp)
        except Exception:  # noqa: BLE001 - no student logged (a trial stopped before its first epoch)
            c.finalize_logged_model(model.model_id, "FAILED")
            return
        c.log_model_artifacts(model.model_id, str(Path(local).parent))
    c.finalize_logged_model(model.model_id, "READY")


# ---------------------------------------------------------------------------------------------
# a store whose disk is full
# ---------------------------------------------------------------------------------------------
def store_full(uri: str, exc: BaseException, run_id: Optional[str] = None) -> Optional[OSError]:
    """When ``exc`` says the disk of the local MLflow store at ``uri`` is full: an OSError ENOSPC
    naming what it was writing (the sqlite database; an artifact: the file when MLflow says it,
    else the run's artifact folder), which the one-line report of a full disk names; else None."""
    from kdray.core.outcome import causes, is_disk_full

    if not is_local_store(uri) or not is_disk_full(exc):
        return None
    full = [e for e in causes(exc) if isinstance(e, OSError) and e.errno == errno.ENOSPC]
    if not full and uri.startswith("sqlite:///"):
        where = uri[len("sqlite:///"):]
    elif full and full[0].filename:
        where = full[0].filename
    else:
        where = _artifact_folder(uri, run_id) or uri
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where)


def _artifact_folder(uri: str, run_id: Optional[str]) -> Optional[str]:
    if run_id is None:
        return None
    try:
        location = client(uri).get_run(run_id).info.artifact_uri
    except Exception:  # noqa: BLE001 - only a better name for the error being raised
        return None
    return location[len("file://"):] if location.startswith("file://") else location


@contextlib.contextmanager
def store_writes(uri: str, run_id: Optional[str] = None) -> Iterator[None]:
    """Inside, a full disk under the local store is raised as :func:`store_full`'s OSError."""
    try:
        yield
    except Exception as exc:
        full = store_full(uri, exc, run_id)
        if full is None:
            raise
        raise full from None


class RunLogger:
    """Per-epoch logging of one run, picklable so it travels to Ray Train workers.

    ``epoch(metrics, ckpt_dir)`` is called on the logging rank after every epoch with what to
    log: the metrics with step = epoch (the caller adds ``latency_ms`` to the last epoch's; the
    engine's bookkeeping is left out), also linked to the run's logged student model, and the
    latest student as ``student/student.pt``. When the metrics say ``done``, it also logs the
    teachers' manifest and ``kdray.state = completed`` *before* the report that may end the trial
    (ASHA stops a trial at ``max_t`` without letting its driver run anything after ``fit``)."""

    def __init__(self, uri: str, run_id: str, teachers: Optional[str] = None, node_ip: Optional[str] = None):
        self.uri, self.run_id = uri, run_id
        self.teachers, self.node_ip = teachers, node_ip
        self._started = False
        self._model_id: Optional[str] = None

    def epoch(self, metrics: dict, ckpt_dir: Optional[str]) -> None:
        try:
            self._log_epoch(metrics, ckpt_dir)
        except KdrayError:
            raise
        except Exception as exc:
            full = store_full(self.uri, exc, self.run_id)
            if full is not None:  # a local store's disk is full: an OSError naming the file
                raise full from None
            if scheme(self.uri) not in ("http", "https"):
                raise
            raise lost(self.uri, exc) from None  # MLflow's errors after its (bounded) retries: the server is gone

    def _start(self, c) -> dict:
        """Once per process: the run's logged model (found again when Tune retries the trial)."""
        self._started = True
        self._model_id = student_model(c, c.get_run(self.run_id), create=True).model_id
        return {"node_ip": self.node_ip} if self.node_ip else {}

    def _log_epoch(self, metrics: dict, ckpt_dir: Optional[str]) -> None:
        c = client(self.uri)
        tags = {} if self._started else self._start(c)
        step = int(metrics.get("epoch", 0))
        student = Path(ckpt_dir) / "student.pt" if ckpt_dir else None
        log_batch(c, self.run_id, tags=tags, metrics=run_metrics(metrics), step=step, model_id=self._model_id)
        if student is not None and student.is_file():
            c.log_artifact(self.run_id, str(student), "student")
        if metrics.get("done"):
            if self.teachers and (Path(self.teachers) / "manifest.json").is_file():
                c.log_artifact(self.run_id, str(Path(self.teachers) / "manifest.json"), "teachers")
            finish_run(self.uri, self.run_id, "completed")

    def failed(self, reason: str) -> None:
        finish_run(self.uri, self.run_id, "failed", reason)

