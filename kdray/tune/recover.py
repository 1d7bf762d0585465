"""What a killed driver could not tell Optuna. A trial records its own end in its MLflow run (its
metrics per epoch and ``kdray.state``), while Optuna hears of it from the driver (Tune's searcher
callback); a driver killed between the two leaves the study's trial RUNNING although its run
finished. ``--resume`` would then mark it interrupted and train it again, and MLflow would hold
one finished run more than the study (``benchmarks/sweep_load.py`` found it: a driver killed at
trial 120 of 200 left 201 finished runs). Before the interrupted trials are closed, each RUNNING
trial whose run says it ended (completed or pruned) is told to the study with the run's values."""

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
    running = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
               if t.user_attrs.get(MLFLOW_RUN_ATTR)]
    if not running:
        return 0
    from kdray.tracking.store import client

    c = client(tracking_uri)
    study_id = storage.get_study_id_from_name(name)
    told = 0
    for t in running:
        ended = _ended_run(c, t.user_attrs[MLFLOW_RUN_ATTR], [m for m, _ in metrics])
        if ended is None:
            continue
        state, histories = ended
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        if len(metrics) == 1:
            for step, value in sorted(histories[0].items()):
                storage.set_trial_intermediate_value(trial_id, step, value)
        storage.set_trial_user_attr(trial_id, RECOVERED_ATTR, True)
        final = [h[max(h)] for h in histories]
        storage.set_trial_state_values(
            trial_id, optuna.trial.TrialState.COMPLETE if state == COMPLETED else optuna.trial.TrialState.PRUNED,
            values=final)
        told += 1
    if told:
        log(f"resume: {told} trial(s) had finished in MLflow after the last driver stopped listening; "
            "told to the study with their runs' values (not run again)")
    return told


def _ended_run(c, run_id: str, names: list) -> Optional[tuple]:
    """(state, per-metric {epoch: value}) of a run that ended completed or pruned with every
    metric logged; None otherwise (or when the run cannot be read)."""
    try:
        run = c.get_run(run_id)
        state = run.data.tags.get(STATE_TAG)
        if state not in (COMPLETED, PRUNED):
            return None
        histories = [{int(m.step): float(m.value) for m in c.get_metric_history(run_id, n)} for n in names]
    except Exception:  # noqa: BLE001 - a run that cannot be read is treated as not ended: it runs again
        return None
    return (state, histories) if all(histories) else None
