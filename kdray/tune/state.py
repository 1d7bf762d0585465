"""A sweep session's state as its stages hand it on (frozen: each stage returns a new one), and
what a finished sweep hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from kdray.tracking.state import SweepTracking
from kdray.tune.options import SweepOptions
from kdray.tune.seeds import SweepSeed
from kdray.tune.space import Space


@dataclass(frozen=True)
class SweepState:
    """One session of sweep ``name``: its space (``space_file`` as given), options, Optuna
    ``storage``, working directory and ``log``; the sampler's ``seed`` and the ``left`` trials to
    run. Set up before the Tuner starts: the ``concurrency`` the cluster hosts, the ``teachers``,
    the teacher store (``store_ref`` in Ray's object store, ``store_line`` for the sweep's run)
    and ``track``, the sweep's tracking state (None: not tracked); ``warm``: what its new study
    starts from (:mod:`kdray.tune.warm_start`)."""

    space: Space
    space_file: str
    name: str
    options: SweepOptions
    storage: Any = field(repr=False)
    workdir: Path
    log: Callable[[str], None] = field(repr=False)
    seed: Optional[SweepSeed] = None
    left: int = 0
    concurrency: int = 1
    teachers: Optional[str] = None
    store_ref: Any = field(default=None, repr=False)
    store_line: Optional[str] = None
    track: Optional[SweepTracking] = None
    warm: Any = field(default=None, repr=False)  # a kdray.tune.warm_start.WarmStart, None: a cold start

    @property
    def storage_path(self) -> str:
        """Where Tune keeps the sweep's trials."""
        return str(self.workdir / "ray_results")


@dataclass(frozen=True)
class SweepOutcome:
    """A finished sweep: its ``summary`` (what ``kdray tune --json`` prints), Tune's ResultGrid (None
    when nothing was left to run) and the Optuna storage holding its study."""

    summary: dict
    result_grid: Any = None
    storage: Any = None
