"""What a killed driver could not tell Optuna. A trial records its own end in its MLflow run (its
metrics per epoch and ``kdray.state``), while Optuna hears of it from the driver (Tune's searcher
callback); a driver killed between the two leaves the study's trial RUNNING although its run
finished. ``--resume`` would then mark it interrupted and train it again, and MLflow would hold
one finished run more than the study (``benchmarks/sweep_load.py`` found it: a driver killed at
trial 120 of 200 left 201 finished runs). Before the interrupted trials are closed, each RUNNING
trial whose run says it ended (completed or pruned) is told to the study with the run's values,
linked to it both ways (a trial killed before the driver linked it is found by its Tune trial id),
and its run, if still open (the process killed between its state and its end), closed."""

from __future__ import annotations

from typing import Callable, Optional

from kdray.core.outcome import COMPLETED, PRUNED
from kdray.tracking.tags import STATE_TAG
from kdray.tune.search import MLFLOW_RUN_ATTR

RECOVERED_ATTR = "recovered_from_mlflow"


def recover_finished_trials(storage, name: str, tracking_uri: Optional[str], metrics: list,
                            log: Callable[[str], None]) -> int:
    """RUNNING trials of study ``name`` whose MLflow run ended, told to Optuna with the run's final
    values (and, for one objective, its per-epoch values as intermediate values); how many."""
    import optuna

    if not tracking_uri:
        return 0
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return 0
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not running:
        return 0
    from kdray.tracking.store import client

    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return 0
    study_id = storage.get_study_id_from_name(name)
    told = 0
    for t in running:
        run = _run_of(c, exp.experiment_id, t)
        ended = _ended(c, run, [m for m, _ in metrics]) if run is not None else None
        if ended is None:
            continue
        _tell(storage, storage.get_trial_id_from_study_id_trial_number(study_id, t.number), *ended,
              len(metrics) == 1, run.info.run_id)
        _close_run(tracking_uri, run, ended[0], t.number)
        told += 1
    if told:
        log(f"resume: {told} trial(s) had finished in MLflow after the last driver stopped listening; "
            "told to the study with their runs' values (not run again)")
    return told


def _run_of(c, exp_id: str, trial):
    """The trial's MLflow run: the one it names, else the one tagged with its Tune trial id."""
    from kdray.tracking.tags import TRIAL_TAG

    try:
        if trial.user_attrs.get(MLFLOW_RUN_ATTR):
            return c.get_run(trial.user_attrs[MLFLOW_RUN_ATTR])
        tid = trial.user_attrs.get("ray_trial_id")
        runs = c.search_runs([exp_id], f"tags.`{TRIAL_TAG}` = '{tid}'", max_results=2) if tid else []
    except Exception:  # noqa: BLE001 - a run that cannot be read is treated as not ended: it runs again
        return None
    return runs[0] if len(runs) == 1 else None


def _ended(c, run, names: list) -> Optional[tuple]:
    """(state, per-metric {epoch: value}) of a run that ended completed or pruned with every
    metric logged; None otherwise (or when the run cannot be read)."""
    state = run.data.tags.get(STATE_TAG)
    if state not in (COMPLETED, PRUNED):
        return None
    try:
        histories = [{int(m.step): float(m.value) for m in c.get_metric_history(run.info.run_id, n)} for n in names]
    except Exception:  # noqa: BLE001 - as above
        return None
    return (state, histories) if all(histories) else None


def _tell(storage, trial_id: int, state: str, histories: list, single: bool, run_id: str) -> None:
    import optuna

    if single:  # Optuna keeps intermediate values for one objective only
        for step, value in sorted(histories[0].items()):
            storage.set_trial_intermediate_value(trial_id, step, value)
    storage.set_trial_user_attr(trial_id, MLFLOW_RUN_ATTR, run_id)
    storage.set_trial_user_attr(trial_id, RECOVERED_ATTR, True)
    done = optuna.trial.TrialState.COMPLETE if state == COMPLETED else optuna.trial.TrialState.PRUNED
    storage.set_trial_state_values(trial_id, done, values=[h[max(h)] for h in histories])


def _close_run(uri: str, run, state: str, number: int) -> None:
    """The run named after its Optuna trial, tagged with it, and ended if it was left open."""
    from kdray.tracking.runs import finish_run
    from kdray.tracking.store import client
    from kdray.tracking.tags import OPTUNA_TRIAL_TAG
    from kdray.tracking.trials import name_trial_run

    client(uri).set_tag(run.info.run_id, OPTUNA_TRIAL_TAG, str(number))
    name_trial_run(uri, run.info.run_id, number)
    if run.info.status == "RUNNING":
        finish_run(uri, run.info.run_id, state)
