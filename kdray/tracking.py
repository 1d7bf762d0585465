"""MLflow tracking: one parent run per sweep, one child run per trial, one run per `kdray train`.

The store is a local sqlite file in the kdray working directory unless ``--tracking-uri`` or
``MLFLOW_TRACKING_URI`` names another (an ``mlflow server`` over HTTP on clusters). Every call
goes through an explicit :class:`mlflow.MlflowClient` for that URI, never MLflow's global state,
so trial drivers and Ray Train workers on any node log to the same place.

Run layout (what ``kdray best`` and ``kdray export`` rely on):

- tags ``kdray.kind`` (sweep | trial | train), ``kdray.state`` (running | completed | pruned |
  failed), ``kdray.failure_reason``, ``kdray.method``, ``kdray.dataset``, ``kdray.student``,
  ``kdray.teachers``, ``kdray.trial_id``, ``node_ip``; children carry ``mlflow.parentRunId``;
- params: every key of the resolved run config;
- metrics: everything the engine reports, per epoch (step = epoch), plus ``latency_ms``;
- artifacts: ``student/student.pt`` (the latest epoch's student; the final one when completed),
  ``teachers/manifest.json``; on a sweep's parent: ``space/<file>``, ``config/base.yaml``,
  ``plots/*.png``.
"""

from __future__ import annotations

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
from typing import Optional

from .errors import KdrayError
from .values import mask_credentials

STATE_TAG = "kdray.state"
KIND_TAG = "kdray.kind"
REASON_TAG = "kdray.failure_reason"
TRIAL_TAG = "kdray.trial_id"
STORE_TAG = "kdray.teacher_store"  # where a run's teacher outputs came from
STUDENT_ARTIFACT = "student/student.pt"
LOCAL_SCHEMES = ("sqlite", "file", "")


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
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str, workdir: Optional[Path] = None, create: bool = True) -> str:
    """The id of experiment ``name``; created when missing (artifacts beside a local store)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise KdrayError(f"MLflow experiment {name!r} is deleted; restore it or use another --experiment")
        return exp.experiment_id
    if not create:
        known = sorted(e.name for e in c.search_experiments(max_results=50))
        raise KdrayError(f"MLflow experiment {name!r} does not exist at {mask_credentials(uri)}; known: {', '.join(known) or 'none'}")
    location = None
    if is_local_store(uri) and workdir is not None:
        location = (Path(workdir).resolve() / "mlartifacts").as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # created by a concurrent process in the meantime
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


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


def config_params(cfg_dict: dict) -> dict:
    """Every run-config key as an MLflow param (strings, None kept as 'None')."""
    out = {}
    for k, v in sorted(cfg_dict.items()):
        out[k] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


def run_tags(cfg, teacher_archs: Optional[list] = None) -> dict:
    tags = {"kdray.method": cfg.method, "kdray.dataset": cfg.dataset, "kdray.student": cfg.student}
    if cfg.teachers:
        tags["kdray.teachers"] = str(cfg.teachers)
    if teacher_archs:
        tags["kdray.teacher_archs"] = ",".join(teacher_archs)
    return tags


def log_batch(c, run_id: str, params: Optional[dict] = None, tags: Optional[dict] = None,
               metrics: Optional[dict] = None, step: int = 0) -> None:
    from mlflow.entities import Metric, Param, RunTag

    ts = int(time.time() * 1000)
    ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    ts_ = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
    ms = [Metric(k, float(v), ts, step) for k, v in (metrics or {}).items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    for i in range(0, max(len(ps), 1), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run_id, params=ps[i:i + 100], tags=ts_ if i == 0 else [], metrics=ms if i == 0 else [])


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
def start_run(uri: str, exp_id: str, *, run_name: str, cfg, kind: str, parent_run_id: Optional[str] = None,
              extra_tags: Optional[dict] = None, teacher_archs: Optional[list] = None) -> str:
    """Create a run with every config key as a param and kdray's tags; returns its id."""
    c = client(uri)
    tags = {KIND_TAG: kind, STATE_TAG: "running", **run_tags(cfg, teacher_archs), **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    log_batch(c, run.info.run_id, params=config_params(cfg.to_dict()))
    return run.info.run_id


#: kdray.state -> MLflow's run status
MLFLOW_STATUS = {"failed": "FAILED", "interrupted": "KILLED"}


def finish_run(uri: str, run_id: str, state: str, reason: Optional[str] = None) -> None:
    """Set kdray.state (completed / pruned / failed / interrupted) and end the MLflow run accordingly."""
    c = client(uri)
    tags = {STATE_TAG: state}
    if reason:
        tags[REASON_TAG] = reason[:4000]
    log_batch(c, run_id, tags=tags)
    c.set_terminated(run_id, MLFLOW_STATUS.get(state, "FINISHED"))


def close_running_runs(uri: str, exp_id: str, state: str, reason: str) -> int:
    """End every run of the experiment that kdray left running (a driver killed, interrupted or cut
    off from the server) with ``state``; how many were closed."""
    runs = client(uri).search_runs([exp_id], filter_string=f"tags.`{STATE_TAG}` = 'running'", max_results=5000)
    for run in runs:
        finish_run(uri, run.info.run_id, state, reason)
    return len(runs)


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
    log: the metrics with step = epoch (the caller adds ``latency_ms`` to the last epoch's) and the
    latest student as ``student/student.pt``. When the metrics say ``done``, it also logs the
    teachers' manifest and ``kdray.state = completed`` *before* the report that may end the trial
    (ASHA stops a trial at ``max_t`` without letting its driver run anything after ``fit``)."""

    def __init__(self, uri: str, run_id: str, teachers: Optional[str] = None, node_ip: Optional[str] = None):
        self.uri, self.run_id = uri, run_id
        self.teachers, self.node_ip = teachers, node_ip
        self._started = False

    def epoch(self, metrics: dict, ckpt_dir: Optional[str]) -> None:
        try:
            self._log_epoch(metrics, ckpt_dir)
        except KdrayError:
            raise
        except Exception as exc:  # MLflow's errors after its (bounded) retries: the server is gone
            if scheme(self.uri) not in ("http", "https"):
                raise
            raise lost(self.uri, exc) from None

    def _log_epoch(self, metrics: dict, ckpt_dir: Optional[str]) -> None:
        c = client(self.uri)
        tags = {}
        if not self._started:
            self._started = True
            if self.node_ip:
                tags["node_ip"] = self.node_ip
        step = int(metrics.get("epoch", 0))
        last = bool(metrics.get("done"))
        student = Path(ckpt_dir) / "student.pt" if ckpt_dir else None
        log_batch(c, self.run_id, tags=tags, metrics=metrics, step=step)
        if student is not None and student.is_file():
            c.log_artifact(self.run_id, str(student), "student")
        if last:
            if self.teachers and (Path(self.teachers) / "manifest.json").is_file():
                c.log_artifact(self.run_id, str(Path(self.teachers) / "manifest.json"), "teachers")
            finish_run(self.uri, self.run_id, "completed")

    def failed(self, reason: str) -> None:
        finish_run(self.uri, self.run_id, "failed", reason)


def find_trial_run(uri: str, exp_id: str, parent_run_id: str, trial_id: str):
    runs = client(uri).search_runs(
        [exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=5,
    )
    return runs[0] if runs else None


# ---------------------------------------------------------------------------------------------
# sweeps
# ---------------------------------------------------------------------------------------------
def start_sweep_run(uri: str, exp_id: str, *, name: str, space, study_name: str, storage_url: str,
                    teachers: Optional[str], teacher_archs: Optional[list] = None) -> str:
    """The parent run: space file and resolved base config as artifacts, study, versions, commit."""
    import yaml

    c = client(uri)
    storage_url = mask_credentials(storage_url)  # masked here too: a tag is readable by every user of the store
    tags = {KIND_TAG: "sweep", STATE_TAG: "running", "kdray.study_name": study_name,
            "kdray.optuna_storage": storage_url, "kdray.space": str(space.path),
            "kdray.metric": ",".join(m for m, _ in space.metrics),
            "kdray.mode": ",".join(d for _, d in space.metrics), **versions(), **run_tags(space.base, teacher_archs)}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run_id = c.create_run(exp_id, run_name=f"sweep-{name}", tags=tags).info.run_id
    log_batch(c, run_id, params={"samples": space.samples, "study_name": study_name, "optuna_storage": storage_url,
                                  "space": Path(space.path).name,
                                  **{f"base.{k}": v for k, v in config_params(space.base.to_dict()).items()}})
    c.log_artifact(run_id, str(space.path), "space")
    c.log_text(run_id, yaml.safe_dump(space.base.to_dict(), sort_keys=True), "config/base.yaml")
    if teachers and (Path(teachers) / "manifest.json").is_file():
        c.log_artifact(run_id, str(Path(teachers) / "manifest.json"), "teachers")
    return run_id


def log_sweep_plots(uri: str, parent_run_id: str, study, space, top: int = 5, log=print) -> list[str]:
    """Optuna's history, importances, parallel coordinates (Pareto front when multi-objective)
    and the best trials' learning curves, as PNGs on the parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ov

    c = client(uri)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    names = [m for m, _ in space.metrics]
    logged = []

    def save(name, make):
        try:
            ax = make()
        except Exception as exc:  # noqa: BLE001 - a plot that needs more trials is skipped, not fatal
            log(f"plot {name}: skipped ({str(exc).splitlines()[0][:120]})")
            return
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(10, 6)
        fig.tight_layout()
        c.log_figure(parent_run_id, fig, f"plots/{name}.png")
        plt.close(fig)
        logged.append(name)

    if len(done) >= 1:
        with _quiet_optuna():
            if space.multi_objective:
                save("pareto_front", lambda: ov.plot_pareto_front(study, target_names=names))
                target = dict(target=lambda t: t.values[0], target_name=names[0])
            else:
                target = dict(target_name=names[0])
            save("optimization_history", lambda: ov.plot_optimization_history(study, **target))
            save("parallel_coordinate", lambda: ov.plot_parallel_coordinate(study, **target))
            if len(done) >= 2:
                save("param_importances", lambda: ov.plot_param_importances(study, **target))
    save("learning_curves", lambda: _learning_curves(c, parent_run_id, names[0],
                                                     dict(space.metrics)[names[0]], top))
    return logged


class _quiet_optuna:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def _learning_curves(c, parent_run_id: str, metric: str, mode: str, top: int):
    import matplotlib.pyplot as plt

    parent = c.get_run(parent_run_id)
    runs = c.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                         order_by=[f"metrics.{metric} {'DESC' if mode == 'max' else 'ASC'}"], max_results=top)
    runs = [r for r in runs if metric in r.data.metrics]
    if not runs:
        raise ValueError(f"no trial logged {metric}")
    fig, ax = plt.subplots()
    for r in runs:
        hist = sorted(c.get_metric_history(r.info.run_id, metric), key=lambda m: m.step)
        label = f"{r.info.run_name} ({r.data.tags.get(STATE_TAG, '?')}, {metric}={r.data.metrics[metric]:.4f})"
        ax.plot([m.step for m in hist], [m.value for m in hist], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"best {len(runs)} trials: {metric} per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


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
