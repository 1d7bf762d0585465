"""MLflow tracking: one parent run per sweep, one child run per trial, one run per `kdray train`.

The store is a local sqlite file in the kdray working directory unless ``--tracking-uri`` or
``MLFLOW_TRACKING_URI`` names another (an ``mlflow server`` over HTTP on clusters). Every call
goes through an explicit :class:`mlflow.MlflowClient` for that URI, never MLflow's global state,
so trial drivers and Ray Train workers on any node log to the same place.

What a user sees, and what ``kdray best`` / ``kdray export`` rely on:

- experiments are tagged ``mlflow.experimentKind = custom_model_development`` (model training, not
  GenAI); a sweep's experiment has a saved view ``kdray-trials`` (trials ranked by the objective,
  with state, method, searched parameters, val/test accuracy, size, latency) and a description
  linking to it;
- runs: tags ``kdray.kind`` (sweep | trial | train), ``kdray.state`` (running | completed | pruned |
  failed | interrupted; MLflow's status FINISHED / KILLED / FAILED), ``kdray.failure_reason``,
  ``kdray.method``, ``kdray.dataset``, ``kdray.student``, ``kdray.teacher_archs``,
  ``kdray.trial_id``, ``node_ip``; children carry ``mlflow.parentRunId``; a description
  (``mlflow.note.content``) saying how the run ended; a trial is named after its Optuna trial
  (``ekd-3``, :func:`name_trial_run`);
- params: the run config (the run's own method's hyperparameters only, one param per branch for
  per-branch ones, floats to 4 significant digits, paths relative to the working directory);
- metrics: everything the engine reports per epoch (step = epoch) except its bookkeeping
  (:data:`BOOKKEEPING`), plus ``latency_ms`` (:data:`kdray.export.LATENCY`);
- the data set as a run input (``log_input``); the student as a logged model of the run
  (``ekd-resnet8``, type ``kdray-student``, its metrics linked) and as the run artifact
  ``student/student.pt``; the teachers' manifest ``teachers/manifest.json``;
- a sweep's parent: the space file, resolved base config, plots, and at the end the best trial's
  metrics and params, a description linking to it and ``kdray.best_run_id``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterable, Optional

from kdray.core.errors import KdrayError
from kdray.core.values import mask_credentials

STATE_TAG = "kdray.state"
KIND_TAG = "kdray.kind"
REASON_TAG = "kdray.failure_reason"
TRIAL_TAG = "kdray.trial_id"
STORE_TAG = "kdray.teacher_store"  # where a run's teacher outputs came from
BEST_TAG = "kdray.best_run_id"  # on a sweep's parent: its best trial's run
STUDENT_ARTIFACT = "student/student.pt"
STUDENT_MODEL_TYPE = "kdray-student"  # the logged model holding a run's student
LOCAL_SCHEMES = ("sqlite", "file", "")

# MLflow's own tags
NOTE_TAG = "mlflow.note.content"  # a run's or an experiment's description (markdown)
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # a saved view of the experiment's runs page
TRIALS_VIEW = "kdray-trials"

#: what the engine reports to steer its loop, not results: never logged as metrics
BOOKKEEPING = frozenset({"done", "epochs", "total_epochs", "generation", "generations", "epoch_in_generation",
                         "branch_params", "epoch_wall_s"})
#: config keys that say how a run was executed, not what it is (and hold local paths): never params
RUNTIME_KEYS = frozenset({"checkpoint_dir", "resume"})

# ---------------------------------------------------------------------------------------------
# stores
# ---------------------------------------------------------------------------------------------
def default_uri(workdir: Path) -> str:
    return f"sqlite:///{(Path(workdir).resolve() / 'mlflow.db')}"


def resolve_uri(uri: Optional[str], workdir: Path) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite in the working directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(workdir)
    if "://" not in uri and not uri.startswith("sqlite:"):
        uri = Path(uri).resolve().as_uri()  # a bare folder: a file store
    return uri


def scheme(uri: str) -> str:
    return urllib.parse.urlparse(uri).scheme


def is_local_store(uri: str) -> bool:
    return scheme(uri) in LOCAL_SCHEMES


def _check_server(uri: str, timeout: float) -> None:
    """An ``mlflow server`` must answer its /health page now."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            body = resp.read(200).decode(errors="replace")
        if resp.status != 200:
            raise OSError(f"HTTP {resp.status}: {body.strip()[:80]}")
    except (OSError, urllib.error.URLError, socket.timeout) as exc:
        reason = getattr(exc, "reason", exc)
        raise KdrayError(
            f"the MLflow tracking server at {mask_credentials(uri)} does not answer ({reason}); start it "
            "(e.g. `mlflow server --host 127.0.0.1 --port 5000`), fix --tracking-uri / MLFLOW_TRACKING_URI, "
            "or pass --no-track"
        ) from None


def _check_sqlite_folder(uri: str) -> None:
    path = uri[len("sqlite:///"):]
    if not path or path == ":memory:":
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdrayError(f"cannot create the MLflow store {uri}: {exc.strerror}") from None


def check_store(uri: str, timeout: float = 5.0) -> None:
    """Fail now, before any training, when the tracking store cannot be used."""
    s = scheme(uri)
    if s in ("http", "https"):
        _check_server(uri, timeout)
    elif s == "sqlite":
        _check_sqlite_folder(uri)
    elif s not in ("file", "", "databricks", "postgresql", "mysql", "mssql"):
        raise KdrayError(f"tracking URI {uri!r} has an unknown scheme {s!r}; allowed: http(s)://, sqlite:///, file://")


def client(uri: str):
    # MLflow draws a progress bar on stderr for every artifact it downloads (a student copied into
    # its logged model, `kdray best` fetching one): noise between kdray's own lines
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)



def experiment_id(uri: str, name: str, workdir: Optional[Path] = None, create: bool = True) -> str:
    """The id of experiment ``name``; created when missing (artifacts beside a local store), and
    marked as a model-training experiment either way."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise KdrayError(f"MLflow experiment {name!r} is deleted; restore it or use another --experiment")
        if create and EXPERIMENT_KIND_TAG not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return exp.experiment_id
    if not create:
        known = sorted(e.name for e in c.search_experiments(max_results=50))
        raise KdrayError(f"MLflow experiment {name!r} does not exist at {mask_credentials(uri)}; known: {', '.join(known) or 'none'}")
    location = None
    if is_local_store(uri) and workdir is not None:
        location = (Path(workdir).resolve() / "mlartifacts").as_uri()
    try:
        return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    except Exception:  # created by a concurrent process in the meantime
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ---------------------------------------------------------------------------------------------
# the MLflow UI: links, the trials view
# ---------------------------------------------------------------------------------------------
def ui_path(exp_id: str, view: Optional[str] = TRIALS_VIEW) -> str:
    """The UI's address of an experiment's runs page (in ``view``), relative to the UI's root.

    ``workflowType``: MLflow 3.17's UI takes an experiment's kind from its global "GenAI / Model
    training" switch (kept in the browser, GenAI on a first visit), not from the
    ``mlflow.experimentKind`` tag (``useExperimentKind`` returns the switch's value while the
    feature flag behind it, hard-wired on, stays on); without it a link opens an empty Traces /
    Overview page."""
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={view}" if view else "")
    return f"#/experiments/{exp_id}/runs?{query}"


def ui_url(uri: str, exp_id: str) -> str:
    """Where the trials view opens: on the tracking server, or on `mlflow ui`'s default address."""
    root = uri.rstrip("/") if scheme(uri) in ("http", "https") else "http://127.0.0.1:5000"
    return f"{mask_credentials(root)}/{ui_path(exp_id)}"


def ui_hint(uri: str, exp_id: str) -> str:
    """One line telling where to look at an experiment's trials."""
    if scheme(uri) in ("http", "https"):
        return f"ranked trials: {ui_url(uri, exp_id)}"
    return f"ranked trials: `mlflow ui --backend-store-uri {mask_credentials(uri)}`, then {ui_url(uri, exp_id)}"


def trials_view_state(metric: str, mode: str, searched: Iterable[str]) -> dict:
    """The runs page of a sweep's experiment as kdray sets it up: trials only, best first (a
    sort by anything but creation time also lists them flat rather than folded under their
    sweep), the columns that tell the story first (the UI's keys: ``<type>.`<name>```)."""
    metrics = [metric] + [m for m in ("val_acc", "test_acc", "params", "latency_ms") if m != metric]
    columns = (["tags.`kdray.state`", "params.`method`"] + [f"metrics.`{m}`" for m in metrics]
               + [f"params.`{p}`" for p in searched if p != "method"] + ["attributes.`Models`"])
    return {"searchFilter": f"tags.`{KIND_TAG}` = 'trial'", "orderByKey": f"metrics.`{metric}`",
            "orderByAsc": mode == "min", "selectedColumns": columns,
            "columnOrder": ["tags.`mlflow.runName`", "attributes.start_time", *columns]}


def save_trials_view(uri: str, exp_id: str, *, metric: str, mode: str, searched: Iterable[str]) -> None:
    """The saved view :data:`TRIALS_VIEW` of the experiment, in the format MLflow's UI writes
    ("Save view": an experiment tag holding a JSON envelope {name, createdAt, state}), and an
    experiment description linking to it."""
    state = trials_view_state(metric, mode, searched)
    envelope = {"name": f"kdray: trials by {metric}", "createdAt": int(time.time() * 1000),
                "state": json.dumps(state)}
    c = client(uri)
    c.set_experiment_tag(exp_id, VIEW_TAG_PREFIX + TRIALS_VIEW, json.dumps(envelope))
    c.set_experiment_tag(exp_id, NOTE_TAG, (
        f"[Trials ranked by {metric}]({ui_path(exp_id)}) (the saved view {envelope['name']!r}): state, "
        "method, searched parameters, accuracy, size, latency. One parent run per sweep session "
        "carries its best trial's numbers."))


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


def git_commit(path: Optional[Path] = None) -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path or Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


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


def run_tags(cfg, teacher_archs: Optional[list] = None) -> dict:
    tags = {"kdray.method": cfg.method, "kdray.dataset": cfg.dataset, "kdray.student": cfg.student}
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
              teacher_archs: Optional[list] = None, workdir: Optional[Path] = None) -> str:
    """Create a run with kdray's tags, ``params`` (the flat config values to log; default every
    key of ``cfg``) and its data set as input; returns its id."""
    c = client(uri)
    tags = {KIND_TAG: kind, STATE_TAG: "running", **run_tags(cfg, teacher_archs), **source_tags(kind),
            **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    log_batch(c, run.info.run_id, params=config_params(cfg.to_dict() if params is None else params, workdir))
    c.log_inputs(run.info.run_id, datasets=[dataset_input(cfg.to_dict())])
    return run.info.run_id


def trial_run_name(method: Optional[str], trial_id: str) -> str:
    """A trial run's name until its Optuna trial is known (:func:`name_trial_run`): the method and
    Tune's trial id."""
    return f"{method or 'trial'}-{trial_id}"


def name_trial_run(uri: str, run_id: str, number: int) -> None:
    """Name a trial's run after its Optuna trial: ``ekd-12`` (method, trial number), the same in
    every session of a resumed sweep and in the study."""
    c = client(uri)
    method = c.get_run(run_id).data.params.get("method")
    c.set_tag(run_id, "mlflow.runName", f"{method or 'trial'}-{number}")


#: kdray.state -> MLflow's run status: pruned trials were stopped, not finished (the UI draws
#: KILLED and FAILED with the same red icon; the state tag and the description tell them apart)
MLFLOW_STATUS = {"failed": "FAILED", "interrupted": "KILLED", "pruned": "KILLED"}


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
    return c.create_logged_model(run.info.experiment_id, name=f"{p.get('method', 'kdray')}-{p.get('student', 'student')}",
                                 source_run_id=run.info.run_id, params=dict(p), model_type=STUDENT_MODEL_TYPE)


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


# MLflow's HTTP client retries a lost server for about 8 minutes by default (7 retries, backoff
# factor 2, 120 s timeout per request); these bound one call to under a minute, so that a trial
# whose server died fails with a clear reason instead of hanging. A value the user exported wins.
BOUNDED_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def bounded_http_env() -> dict:
    return {k: os.environ.get(k, v) for k, v in BOUNDED_HTTP_ENV.items()}


class TrackingLost(KdrayError):
    """The tracking server stopped answering while a run was logging to it."""

    exit_code = 1  # not the user's input: the run was fine until the server went away


def lost(uri: str, exc: BaseException) -> TrackingLost:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return TrackingLost(f"the MLflow tracking server at {mask_credentials(uri)} stopped answering ({first}); "
                        "training stopped with its checkpoints kept; --resume runs it again once the server is back")



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
        except Exception as exc:  # MLflow's errors after its (bounded) retries: the server is gone
            if scheme(self.uri) not in ("http", "https"):
                raise
            raise lost(self.uri, exc) from None

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


# ---------------------------------------------------------------------------------------------
# sweeps
# ---------------------------------------------------------------------------------------------
def start_sweep_run(uri: str, exp_id: str, *, name: str, space, study_name: str, storage_url: str,
                    teachers: Optional[str], teacher_archs: Optional[list] = None,
                    workdir: Optional[Path] = None) -> str:
    """The parent run: space file and resolved base config as artifacts, study, versions, commit.
    Its params and metrics are the best trial's, logged when the sweep ends (:func:`summarize_sweep`).
    ``storage_url``: the Optuna study's; a sqlite file in ``workdir`` is tagged relative to it."""
    import yaml

    c = client(uri)
    storage_url = mask_credentials(storage_url)  # masked here too: a tag is readable by every user of the store
    if storage_url.startswith("sqlite:///"):
        storage_url = "sqlite:///" + relative_path(storage_url[len("sqlite:///"):], workdir)
    tags = {KIND_TAG: "sweep", STATE_TAG: "running", **source_tags("sweep"), "kdray.study_name": study_name,
            "kdray.optuna_storage": storage_url,
            "kdray.metric": ",".join(m for m, _ in space.metrics),
            "kdray.mode": ",".join(d for _, d in space.metrics), **versions(), **run_tags(space.base, teacher_archs)}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run_id = c.create_run(exp_id, run_name=f"sweep-{name}", tags=tags).info.run_id
    log_batch(c, run_id, params={"samples": space.samples, "study_name": study_name, "space": Path(space.path).name})
    c.log_inputs(run_id, datasets=[dataset_input(space.base.to_dict())])
    c.log_artifact(run_id, str(space.path), "space")
    c.log_text(run_id, yaml.safe_dump(space.base.to_dict(), sort_keys=True), "config/base.yaml")
    if teachers and (Path(teachers) / "manifest.json").is_file():
        c.log_artifact(run_id, str(Path(teachers) / "manifest.json"), "teachers")
    return run_id


def searched_params(space) -> list[str]:
    """The params a sweep varies, as its trials log them (one per branch for per-branch ones)."""
    names = [k for k, spec in space.params.items() if isinstance(spec, dict)]
    if space.per_branch:
        branches = space.params.get("branches", space.base.branches)
        most = int(branches["high"] if isinstance(branches, dict) and "high" in branches else
                   max(branches["choices"]) if isinstance(branches, dict) else branches)
        names += [f"{k}_{b}" for k in space.per_branch for b in range(most)]
    return names


def trial_counts(study_counts: dict) -> str:
    """'3 completed, 1 pruned, 0 failed' from Optuna's counts by state."""
    names = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
    return ", ".join(f"{n} {names.get(s, s.lower())}" for s, n in study_counts.items() if n or s in ("COMPLETE", "PRUNED"))


def summarize_sweep(uri: str, parent_run_id: str, *, best_run_id: Optional[str], metric: str, counts: str) -> None:
    """The parent run at the end of a sweep: the best trial's metrics (latest values) and params,
    ``kdray.best_run_id``, and a description with the counts and a link to the best trial."""
    c = client(uri)
    parent = c.get_run(parent_run_id)
    exp_id = parent.info.experiment_id
    lines = [f"Sweep of `{parent.data.params.get('space', '?')}`: {counts}. "
             f"[All trials, ranked by {metric}]({ui_path(exp_id)})."]
    params, metrics, tags = {}, {}, {}
    if best_run_id:
        best = c.get_run(best_run_id)
        metrics = dict(best.data.metrics)
        params = {k: v for k, v in best.data.params.items() if k not in parent.data.params}
        tags[BEST_TAG] = best_run_id
        score = f"{metric} {metrics[metric]:.4f}" if metric in metrics else "no score"
        lines.append(f"Best trial: [{best.info.run_name}](#/experiments/{exp_id}/runs/{best_run_id}) ({score}); "
                     "its metrics and params are this run's.")
    tags[NOTE_TAG] = "\n\n".join(lines)
    tags["kdray.trials"] = counts
    log_batch(c, parent_run_id, params=params, tags=tags, metrics=metrics)


#: fewer completed trials than this give parameter importances that are noise: no plot
MIN_TRIALS_FOR_IMPORTANCES = 8


def log_sweep_plots(uri: str, parent_run_id: str, study, space, log=print) -> list[str]:
    """What MLflow's chart view does not draw, from the Optuna study, as PNGs on the parent run:
    the optimisation history, parallel coordinates of the parameters that varied, parameter
    importances (from :data:`MIN_TRIALS_FOR_IMPORTANCES` completed trials, their count in the
    title), the Pareto front when multi-objective. Learning curves are MLflow's own (chart view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ov

    c = client(uri)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    names = [m for m, _ in space.metrics]
    varied = sorted(p for p in {k for t in done for k in t.params} if len({str(t.params.get(p)) for t in done}) > 1)
    logged = []

    def save(name, make, note: str = ""):
        try:
            ax = make()
        except Exception as exc:  # noqa: BLE001 - a plot that needs more trials is skipped, not fatal
            log(f"plot {name}: skipped ({str(exc).splitlines()[0][:120]})")
            return
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        if note:
            fig.suptitle(note, fontsize=9)
        fig.set_size_inches(10, 6)
        fig.tight_layout()
        c.log_figure(parent_run_id, fig, f"plots/{name}.png")
        plt.close(fig)
        logged.append(name)

    if not done:
        return logged
    with _quiet_optuna():
        if space.multi_objective:
            save("pareto_front", lambda: ov.plot_pareto_front(study, target_names=names))
            target = dict(target=lambda t: t.values[0], target_name=names[0])
        else:
            target = dict(target_name=names[0])
        save("optimization_history", lambda: ov.plot_optimization_history(study, **target))
        if varied:
            save("parallel_coordinate", lambda: ov.plot_parallel_coordinate(study, params=varied, **target))
        if len(done) >= MIN_TRIALS_FOR_IMPORTANCES and varied:
            save("param_importances", lambda: ov.plot_param_importances(study, params=varied, **target),
                 note=f"from {len(done)} completed trials: a rough guide, not a measurement")
        else:
            log(f"plot param_importances: skipped ({len(done)} completed trial(s); "
                f"it needs {MIN_TRIALS_FOR_IMPORTANCES} to say more than noise)")
    return logged


class _quiet_optuna:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# picking and fetching students
# ---------------------------------------------------------------------------------------------
def get_run(uri: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client(uri).get_run(run_id)
    except MlflowException as exc:
        raise KdrayError(f"MLflow run {run_id!r} does not exist at {mask_credentials(uri)} ({str(exc).splitlines()[0][:120]})") from None


def download_student(uri: str, run_id: str, dst: Optional[Path] = None) -> Path:
    """The run's ``student/student.pt`` as a local file."""
    get_run(uri, run_id)
    dst = Path(dst or tempfile.mkdtemp(prefix="kdray-student-"))
    try:
        local = client(uri).download_artifacts(run_id, STUDENT_ARTIFACT, str(dst))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
        raise KdrayError(f"run {run_id} has no {STUDENT_ARTIFACT} artifact ({str(exc).splitlines()[0][:120]})") from None
    return Path(local)


def best_runs(uri: str, experiment: str, *, metric: Optional[str] = None, mode: Optional[str] = None,
              max_params: Optional[int] = None, max_latency_ms: Optional[float] = None, top: int = 5,
              states: tuple = ("completed",)) -> tuple[list, str, str]:
    """Top runs of ``experiment`` (trials and train runs, not sweep parents) by ``metric``."""
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
    candidates = [r for r in candidates if r.data.tags.get(STATE_TAG) in states]
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
            raise KdrayError(f"no run in {experiment!r} has latency_ms <= {max_latency_ms:g}; the fastest has {fastest:.3f} ms")
        pool = fit
    return pool[:top], metric, mode
