"""A sweep's trial runs: each created on its trial's node as a child of the sweep's run, linked
to its Optuna trial, and closed with the state the trial ended in."""

from __future__ import annotations

from typing import Callable, Optional

from kdray.core.outcome import failure_reason
from kdray.tracking.runs import find_trial_run, finish_run, log_batch, start_run
from kdray.tracking.state import RunHandle, SweepTracking
from kdray.tracking.store import client
from kdray.tracking.tags import (
    KIND_TAG,
    OPTUNA_STUDY_TAG,
    OPTUNA_TRIAL_TAG,
    STATE_TAG,
    STORE_TAG,
    TRIAL_TAG,
)

Log = Callable[[str], None]


def start_trial_run(track: SweepTracking, cfg, *, trial_id: str, params: dict, retried: bool) -> RunHandle:
    """Tune trial ``trial_id``'s child run (``params``: the config values it logs), created on the
    trial's node (over HTTP on a cluster). A ``retried`` trial (Tune started it again from its
    checkpoint) goes on in the run it had."""
    if retried:
        earlier = find_trial_run(track.uri, track.experiment_id, track.parent_run_id, trial_id)
        if earlier is not None:
            return RunHandle(track.uri, earlier.info.run_id, track.experiment_id)
    tags = {TRIAL_TAG: trial_id, **({STORE_TAG: track.teacher_store} if track.teacher_store else {})}
    run_id = start_run(track.uri, track.experiment_id, run_name=trial_run_name(cfg.method, trial_id), cfg=cfg,
                       kind="trial", params=params, parent_run_id=track.parent_run_id,
                       teacher_archs=track.teacher_archs, workdir=track.workdir, extra_tags=tags)
    return RunHandle(track.uri, run_id, track.experiment_id)


def make_run_linker(track: Optional[SweepTracking], study_name: str, log: Log):
    """For the searcher (on the driver): the MLflow run of a Tune trial, found by its
    ``kdray.trial_id`` tag and tagged with the Optuna trial's number and study; None while the trial
    has no run yet. A store that fails costs one line per trial, not the sweep."""
    if not track:
        return None
    warned: set = set()

    def link(trial_id: str, number: int) -> Optional[str]:
        try:
            run = find_trial_run(track.uri, track.experiment_id, track.parent_run_id, trial_id)
            if run is None:
                return None
            log_batch(client(track.uri), run.info.run_id, tags={OPTUNA_TRIAL_TAG: number, OPTUNA_STUDY_TAG: study_name})
            name_trial_run(track.uri, run.info.run_id, number)
            return run.info.run_id
        except Exception as exc:  # noqa: BLE001 - the store is down or refuses
            if trial_id not in warned:
                warned.add(trial_id)
                log(f"tracking: trial {trial_id} not linked to Optuna trial {number} ({failure_reason(exc)})")
            return None

    return link


def _open_trial_run(track: SweepTracking, trial_id: str, method: Optional[str], create: bool) -> Optional[str]:
    """The trial's run while it is still running (created when missing and ``create``)."""
    run = find_trial_run(track.uri, track.experiment_id, track.parent_run_id, trial_id)
    if run is not None and run.data.tags.get(STATE_TAG) != "running":
        return None  # the worker closed it already
    if run is not None or not create:
        return run.info.run_id if run is not None else None
    return client(track.uri).create_run(track.experiment_id, run_name=trial_run_name(method, trial_id), tags={
        "mlflow.parentRunId": track.parent_run_id, KIND_TAG: "trial", TRIAL_TAG: trial_id}).info.run_id


def record_trial_state(track: SweepTracking, trial_id: str, method: Optional[str], state: str, log: Log, *,
                       reason: Optional[str] = None, create: bool = False) -> None:
    """Close the trial's run with ``state`` (:func:`~kdray.tracking.runs.finish_run`), creating it
    when the trial died before it could (``create``). A store that fails costs one line, not the
    sweep (--resume closes what stayed open)."""
    try:
        run_id = _open_trial_run(track, trial_id, method, create)
        if run_id is not None:
            finish_run(track.uri, run_id, state, reason)
    except Exception as exc:  # noqa: BLE001 - the store is down or refuses: say so once per trial
        log(f"tracking: trial {trial_id} could not be recorded as {state} ({failure_reason(exc)})")


def trial_run_name(method: Optional[str], trial_id: str) -> str:
    """A trial run's name until its Optuna trial is known (:func:`name_trial_run`): the method and
    Tune's trial id."""
    return f"{method or 'trial'}-{trial_id}"


def optuna_run_name(method: Optional[str], number: int) -> str:
    """A trial run's name once its Optuna trial is known: ``ekd-12`` (method, trial number), the
    same in every session of a resumed sweep and in the study."""
    return f"{method or 'trial'}-{number}"


def name_trial_run(uri: str, run_id: str, number: int) -> None:
    """Name a trial's run after its Optuna trial (:func:`optuna_run_name`)."""
    c = client(uri)
    c.set_tag(run_id, "mlflow.runName", optuna_run_name(c.get_run(run_id).data.params.get("method"), number))
