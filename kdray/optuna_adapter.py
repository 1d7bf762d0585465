"""Where kdray meets Optuna through Ray Tune: the one place that touches what the libraries keep
private, each with the upstream behaviour it works around.

- Ray's ``OptunaSearch`` tells Optuna every finished trial as COMPLETE with its last reported
  score, including trials ASHA stopped early and trials that failed after some epochs; TPE would
  then trust partial scores as finished results. ``PrunedAwareOptunaSearch`` tells those as
  PRUNED / FAIL instead. It reads ``OptunaSearch``'s private ``_ot_trials`` (Tune trial id ->
  Optuna trial), ``_ot_study`` and ``_completed_trials``: Ray offers no hook to choose the state.
- On ``--resume`` the trials an interrupted sweep left RUNNING are closed as FAIL through the
  storage's public API and their parameters enqueued to run again.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

from .errors import KdrayError
from .guards import stop_requested
from .outcome import COMPLETED, FAILED, PRUNED, trial_state

#: what a later ``--resume`` needs to name the best student, kept as Optuna user attributes
KEPT_RESULT_KEYS = ("checkpoint_path", "node_ip", "epoch", "total_epochs")


def make_searcher_class():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna_state = {PRUNED: optuna.trial.TrialState.PRUNED, FAILED: optuna.trial.TrialState.FAIL}

    class PrunedAwareOptunaSearch(OptunaSearch):
        """OptunaSearch that records early-stopped trials as PRUNED and failed ones as FAIL."""

        def on_trial_complete(self, trial_id, result=None, error=False):
            if stop_requested() is not None:
                return  # stopped by a signal: left RUNNING here, recorded as interrupted by the sweep
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None or not result:
                return super().on_trial_complete(trial_id, result=result, error=error)
            for key in KEPT_RESULT_KEYS:
                if result.get(key) is not None:
                    with contextlib.suppress(Exception):
                        ot_trial.set_user_attr(key, result[key])
            state = FAILED if error else trial_state(result)
            if state == COMPLETED or trial_id in self._completed_trials:
                return super().on_trial_complete(trial_id, result=result, error=error)
            try:
                self._ot_study.tell(ot_trial, None, state=optuna_state[state])
            finally:
                self._completed_trials.add(trial_id)

        def suggest(self, trial_id):
            config = super().suggest(trial_id)
            if trial_id in self._ot_trials:  # ties each study trial to its Tune trial (and run dir)
                self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
            return config

    return PrunedAwareOptunaSearch


def _mark_interrupted(storage, study, trials) -> int:
    """``trials`` become FAIL marked ``interrupted``; their parameters are enqueued so each runs once
    more (one stopped before its parameters were stored gets a fresh sample)."""
    import optuna

    study_id = storage.get_study_id_from_name(study.study_name)
    for t in trials:
        if t.state == optuna.trial.TrialState.RUNNING:  # a finished trial's attributes are frozen
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(trial_id, "interrupted", True)
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number}, skip_if_exists=False)
    return len(trials)


def _close_interrupted(storage, study) -> int:
    """Trials an interrupted sweep left RUNNING: FAIL, marked interrupted, queued again."""
    import optuna

    return _mark_interrupted(storage, study, study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))


def close_interrupted_trials(storage, name: str) -> int:
    """After a stop signal: the study's RUNNING trials recorded as interrupted; how many."""
    import optuna

    return _close_interrupted(storage, optuna.load_study(study_name=name, storage=storage))


def requeue_trials(storage, name: str, ray_trial_ids) -> int:
    """Failed trials (by Tune trial id) that did not fail on their own: marked interrupted, queued again."""
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    wanted = set(ray_trial_ids)
    return _mark_interrupted(storage, study, [t for t in study.get_trials(deepcopy=False)
                                              if t.user_attrs.get("ray_trial_id") in wanted])


def prepare_study(storage, name: str, samples: int, resume: bool, log: Callable[[str], None]) -> int:
    """How many trials are still to run; on resume, closes what an interrupted sweep left open."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        if resume:
            log(f"resume: no study {name!r} yet; starting it")
        return samples
    if not resume:
        raise KdrayError(
            f"a sweep named {name!r} exists already in the Optuna storage; pass --resume to continue it "
            "or --experiment NEW_NAME to start another"
        )
    _close_interrupted(storage, study)
    finished = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                            optuna.trial.TrialState.PRUNED)))
    left = max(samples - finished, 0)
    log(f"resume: {finished} trial(s) finished before, {left} to run")
    return left


def study_counts(study) -> dict:
    counts: dict = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def earlier_best(study, rows: list, metric: str) -> Optional[dict]:
    """The study's best COMPLETE trial when it ran in an earlier session (not among ``rows``), as a row."""
    try:
        t = study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None
    rid = t.user_attrs.get("ray_trial_id")
    if rid is None or any(r["trial"] == rid for r in rows):
        return None
    metrics = {metric: t.value, "trial_id": rid, **{k: t.user_attrs[k] for k in KEPT_RESULT_KEYS if k in t.user_attrs}}
    return {"trial": rid, "config": dict(t.params), "metrics": metrics, "error": None, "earlier_session": True}
