"""What a sweep tells its tracking: the plain values its space, study and summary give the
sweep's MLflow runs (:mod:`kdray.tracking.sweeps`) at its start and at its end."""

from __future__ import annotations

from typing import Optional

from kdray.core.values import mask_credentials
from kdray.tracking.state import SweepTracking, TrackingSettings
from kdray.tune.state import SweepState


def storage_url(storage) -> str:
    """The Optuna storage's URL, its password masked."""
    return mask_credentials(getattr(storage, "url", str(storage)))


def start_tracking(sweep: SweepState, settings: TrackingSettings) -> SweepTracking:
    """The sweep's parent run (with its seed) in experiment ``sweep.name``; the tracking state
    every trial gets."""
    import ray

    from kdray.teachers.manifest import teacher_archs
    from kdray.tracking.sweeps import record_sweep_seed, record_warm_start, start_sweep_tracking

    space = sweep.space
    track = start_sweep_tracking(
        settings, name=sweep.name, workdir=sweep.workdir,
        hosts=[n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")],
        space_path=space.path, base=space.base.to_dict(), metrics=space.metrics, samples=space.samples,
        searched=space.searched_params(), storage_url=storage_url(sweep.storage), teachers=sweep.teachers,
        teacher_archs=teacher_archs(sweep.teachers), teacher_store=sweep.store_line,
        resume=sweep.options.resume, log=sweep.log)
    if sweep.seed is not None:
        record_sweep_seed(track, sweep.seed.value, sweep.seed.source, sweep.seed.sampler)
    if sweep.warm is not None:
        record_warm_start(track, sweep.warm.record())
    return track


def finish_tracking(sweep: SweepState, state: str, *, reason: Optional[str] = None,
                    summary: Optional[dict] = None) -> dict:
    """Close the sweep's parent run as ``state`` with the ``summary``'s best trial and counts; the
    summary's best row gets its MLflow run id, and the parent run the trial-hours by state
    (:func:`trial_hours`, also the summary's ``timing.trial_hours``). Returns the summary's
    ``mlflow`` entry."""
    from kdray.tracking.sweeps import finish_sweep_tracking
    from kdray.tune.warm_start import own_study

    summary = summary or {}
    best = summary.get("best")
    hours = trial_hours(summary["trials"]) if "trials" in summary else None
    if hours and isinstance(summary.get("timing"), dict):
        summary["timing"]["trial_hours"] = hours
    record = finish_sweep_tracking(
        sweep.track, study_name=sweep.name, storage=sweep.storage, metrics=sweep.space.metrics, state=state,
        log=sweep.log, reason=reason, best_trial_id=str(best["metrics"].get("trial_id")) if best else None,
        best_run_id=best.get("mlflow_run_id") if best else None, study_counts=summary.get("study_counts"),
        trial_hours=hours, study_view=own_study)
    if best and record.best_run_id:
        best["mlflow_run_id"] = record.best_run_id
    return record.summary()


def trial_hours(rows: list) -> dict:
    """Hours the trials of this session spent in their slots (start to end, as the progress
    callback timed them: :func:`kdray.tune.report.row_timing`), summed by the state they ended in:
    ``trial_hours_completed``, ``trial_hours_pruned``, ``trial_hours_failed`` (what pruning
    saved shows beside what the completed trials took)."""
    out = {f"trial_hours_{s}": 0.0 for s in ("completed", "pruned", "failed")}
    for r in rows:
        t = r.get("timing") or {}
        key = f"trial_hours_{r.get('state')}"
        if key in out and "started_at_s" in t and "ended_at_s" in t:
            out[key] += max(t["ended_at_s"] - t["started_at_s"], 0.0) / 3600
    return out
