"""What tracking hands from stage to stage: frozen, picklable values (the settings a command
tracks with, one run's handle, a sweep's tracking state), and the checked settings themselves."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class TrackingSettings:
    """Where a command tracks: the checked MLflow store ``uri``, the ``experiment`` (None: the
    command's own default) and the working directory (absolute) that local paths are relative to."""

    uri: str
    experiment: Optional[str] = None
    workdir: Optional[str] = None


@dataclass(frozen=True)
class RunHandle:
    """One MLflow run to log to: its store and id (and experiment, when known). Travels to Ray
    Train workers and Tune trials."""

    uri: str
    run_id: str
    experiment_id: Optional[str] = None


@dataclass(frozen=True)
class SweepTracking:
    """A sweep's tracking state, sent to every trial: the store, the sweep's experiment and parent
    run, the teachers' architectures and teacher store (tags of every trial run) and the working
    directory (params relative to it)."""

    uri: str
    experiment_id: str
    parent_run_id: str
    teacher_archs: Optional[tuple] = None
    teacher_store: Optional[str] = None
    workdir: Optional[str] = None


def tracking_settings(track: bool, tracking_uri: Optional[str], experiment: Optional[str],
                      workdir: Path) -> Optional[TrackingSettings]:
    """None when tracking is off; else the checked MLflow store, experiment and workdir. The
    store is checked now, before any training starts."""
    if not track:
        return None
    from kdray.tracking.store import bounded_http_env, check_store, resolve_uri

    for key, value in bounded_http_env().items():  # this process's MLflow calls too
        os.environ.setdefault(key, value)
    uri = resolve_uri(tracking_uri, workdir)
    check_store(uri)
    return TrackingSettings(uri=uri, experiment=experiment, workdir=str(Path(workdir).resolve()))
