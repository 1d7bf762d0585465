"""The MLflow store: its URI, checked before anything starts, a client for it, experiments, and the
one error a store lost mid-run becomes."""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

from kdray.core.errors import KdrayError
from kdray.core.values import mask_credentials
from kdray.tracking.tags import EXPERIMENT_KIND_TAG, MODEL_TRAINING

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
        raise KdrayError(f"MLflow experiment {name!r} does not exist at {mask_credentials(uri)}; "
                         f"known: {', '.join(known) or 'none'}")
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


def is_tracking_lost(reason: Optional[str]) -> bool:
    """Whether a failure's one-line reason (:func:`kdray.core.outcome.failure_reason`) says the
    tracking server was lost: the run did not fail on its own."""
    return (reason or "").startswith(TrackingLost.__name__)


def check_readable_store(uri: str) -> None:
    """For commands that only read (best, export --run, load_student): a sqlite store that does
    not exist is an error, not an empty store created on the spot (MLflow would create one)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise KdrayError(f"no MLflow store at {path}: nothing was tracked there; run from the folder that holds "
                             "kdray-work, or pass --workdir DIR or --tracking-uri URI")
    check_store(uri)


@contextlib.contextmanager
def global_tracking_uri(uri: str):
    """MLflow's global tracking URI set to ``uri`` for a call that has no client argument
    (``mlflow.pytorch.log_model``, ``mlflow.search_runs``), then put back: kdray otherwise
    never touches MLflow's global state."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
