"""TODO"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from kdray.core.errors import KdrayError
from kdray.core.values import mask_credentials
from kdray.tracking.tags import OPTUNA_STUDY_TAG, OPTUNA_TRIAL_TAG
from kdray.tune.seeds import SweepSeed
from kdray.tune.space import Space


def make_run_linker(track: Optional[dict], study_name: str, log: Callable[[str], None]):
    """For the searcher (on the driver): the MLflow run of a Tune trial, found by its
    ``kdray.trial_id`` tag and tagged with the Optuna trial's number and study; None while the trial
    has no run yet. A store that fails costs one line per trial, not the sweep."""
    if not track:
        return None
    from kdray.tracking import runs as tr

    warned: set = set()

    def link(trial_id: str, number: int) -> Optional[str]:
        try:
            run = tr.find_trial_run(track["uri"], track["experiment_id"], track["parent_run_id"], trial_id)
            if run is None:
                return None
            tr.log_batch(tr.client(track["uri"]), run.info.run_id,
                         tags={OPTUNA_TRIAL_TAG: number, OPTUNA_STUDY_TAG: study_name})
            tr.name_trial_run(track["uri"], run.info.run_id, number)
            return run.info.run_id
        except Exception as exc:  # noqa: BLE001 - the store is down or refuses
            if trial_id not in warned:
                from kdray.core.outcome import failure_reason

                warned.add(trial_id)
                log(f"tracking: trial {trial_id} not linked to Optuna trial {number} ({failure_reason(exc)})")
            return None

    return link


def record_sweep_seed(track: dict, seed: SweepSeed) -> None:
    """The sampler's seed on the sweep's MLflow run (the study holds it as user attribute ``seed``)."""
    from kdray.tracking import runs as tr

    tr.log_batch(tr.client(track["uri"]), track["parent_run_id"],
                 params={"optuna_seed": seed.value, "optuna_seed_source": seed.source,
                         "optuna_sampler_seed": seed.sampler})


def _start_tracking(tracking: dict, space: Space, name: str, storage, workdir: Path, teachers, log,
                    resume: bool = False) -> dict:
    """The sweep's parent run, and the driver-side callback that records each trial's state."""
    import ray

    from kdray.tracking import runs as tr
    from kdray.training.run import teacher_archs
    from kdray.tune.report import make_tracking_callback

    uri = tracking["uri"]
    ips = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if tr.is_local_store(uri) and len(ips) > 1:
        raise KdrayError(
            f"the MLflow store {uri} is a local file, but the Ray cluster spans {len(ips)} hosts ({', '.join(sorted(ips))}); "
            "trials on other hosts cannot write it: pass --tracking-uri http://HEAD:5000 (an `mlflow server`)"
        )
    from kdray.core.guards import stores_initialising

    with stores_initialising(workdir):
        exp_id = tr.experiment_id(uri, name, workdir)
    if resume:  # runs an earlier driver left open (killed, interrupted, cut off from the server)
        closed = tr.close_running_runs(uri, exp_id, "interrupted", "left running by an earlier driver of this sweep")
        if closed:
            log(f"resume: {closed} MLflow run(s) an earlier driver left running closed as interrupted")
    archs = teacher_archs(teachers)
    parent = tr.start_sweep_run(uri, exp_id, name=name, space=space, study_name=name,
                                storage_url=mask_credentials(getattr(storage, "url", str(storage))), teachers=teachers,
                                teacher_archs=archs, workdir=workdir)
    metric, mode = space.metrics[0]
    tr.save_trials_view(uri, exp_id, metric=metric, mode=mode, searched=tr.searched_params(space))
    log(f"tracking: MLflow experiment {name!r} (id {exp_id}), sweep run {parent} at {mask_credentials(uri)}")
    return {"uri": uri, "experiment_id": exp_id, "parent_run_id": parent, "teacher_archs": archs,
            "workdir": str(workdir), "callback": make_tracking_callback(uri, exp_id, parent, log)}


def _finish_tracking(track: dict, space: Space, name: str, storage, state: str, log, reason=None, summary=None) -> dict:
    import optuna

    from kdray.tracking import runs as tr

    uri, parent = track["uri"], track["parent_run_id"]
    plots: list = []
    try:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            plots = tr.log_sweep_plots(uri, parent, study, space, log=log)
            _summarize_parent(track, space, summary or {})
            log(f"tracking: {tr.ui_hint(uri, track['experiment_id'])}")
        finally:
            tr.finish_run(uri, parent, state, reason)
    except KdrayError:
        raise
    except Exception as exc:  # the server went away during the sweep: one line, --resume closes the run
        if not uri.startswith(("http://", "https://")):
            raise
        raise tr.lost(uri, exc) from None
    return {"tracking_uri": mask_credentials(uri), "experiment_id": track["experiment_id"], "parent_run_id": parent, "plots": plots}


def _summarize_parent(track: dict, space: Space, summary: dict) -> None:
    """The parent run carries the best trial's metrics, params and a link to it (and the summary
    its MLflow run id); counts by state go into its description."""
    from kdray.tracking import runs as tr

    best = summary.get("best")
    if best and not best.get("mlflow_run_id"):
        run = tr.find_trial_run(track["uri"], track["experiment_id"], track["parent_run_id"],
                                str(best["metrics"].get("trial_id")))
        if run is not None:
            best["mlflow_run_id"] = run.info.run_id
    tr.summarize_sweep(track["uri"], track["parent_run_id"], best_run_id=(best or {}).get("mlflow_run_id"),
                       metric=space.metrics[0][0], counts=tr.trial_counts(summary.get("study_counts", {})))
