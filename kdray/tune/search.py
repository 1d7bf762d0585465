"""Where kdray meets Optuna through Ray Tune: the one place that touches what the libraries keep
private, each with the upstream behaviour it works around.

- Ray's ``OptunaSearch`` tells Optuna every finished trial as COMPLETE with its last reported
  score, including trials ASHA stopped early and trials that failed after some epochs; TPE would
  then trust partial scores as finished results. ``PrunedAwareOptunaSearch`` tells those as
  PRUNED / FAIL instead. It reads ``OptunaSearch``'s private ``_ot_trials`` (Tune trial id ->
  Optuna trial), ``_ot_study`` and ``_completed_trials``: Ray offers no hook to choose the state.
- Tune never hands a searcher the result it stops a trial on (ASHA's early stop, and ``max_t``):
  ``TuneController._process_trial_result`` (ray/tune/execution/tune_controller.py) calls
  ``search_alg.on_trial_result`` only when the scheduler's decision is not STOP, then passes that
  last result to ``on_trial_complete`` alone. Ray's ``OptunaSearch.on_trial_complete`` does not
  report it, so the last epoch was missing from the intermediate values and a pruned trial (whose
  value Optuna's ``tell`` takes from the last intermediate value, optuna/study/_tell.py) held the
  epoch before. ``PrunedAwareOptunaSearch`` reports it before telling. Its steps are kdray's
  ``epoch`` (MLflow's step too), not Tune's ``training_iteration``, which goes on counting when a
  Train worker group restarts.
- On ``--resume`` the trials an interrupted sweep left RUNNING are closed as FAIL through the
  storage's public API and their parameters enqueued to run again.
- The sweep's sampler seed is kept as a study user attribute; a resumed sweep reads it back.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Optional

from kdray.core.errors import KdrayError
from kdray.core.guards import stop_requested
from kdray.core.outcome import COMPLETED, FAILED, PRUNED, trial_state
from kdray.tune.warm_start import apply_warm_start, own_trials

#: what a later ``--resume`` needs to name the best student, kept as Optuna user attributes
KEPT_RESULT_KEYS = ("checkpoint_path", "node_ip", "epoch", "total_epochs")
#: the trial user attribute that holds its MLflow run's id (the run's tags name the trial: ``link_run``)
MLFLOW_RUN_ATTR = "mlflow_run_id"
#: the study user attributes that hold the sweep's seed and where it came from
SEED_ATTR, SEED_SOURCE_ATTR = "seed", "seed_source"


class PrunedAwareSearch:
    """What kdray adds to Ray's OptunaSearch (:func:`make_searcher_class` puts it in front of it,
    so that Ray is imported only when a sweep runs): records every epoch Tune saw (the one it
    stopped on included), records early-stopped trials as PRUNED and failed ones as FAIL, names
    the objectives, and links each Optuna trial to its MLflow run.

    ``link_run(ray_trial_id, optuna_trial_number)``: the trial's MLflow run id (None while it has
    none); called until it answers. ``study_attrs``: user attributes set on the study (the seed).
    ``trial_numbers``: a dict the searcher fills with Tune trial id -> Optuna trial number as it
    proposes (the console names trials by it). ``warm_start``: a
    :class:`~kdray.tune.warm_start.WarmStart` given to a new study before its first trial. ``budget``: the sweep's
    :class:`~kdray.tune.budget.SweepBudget` (None: none); once it is spent :meth:`suggest` answers
    ``Searcher.FINISHED``, so Tune starts no other trial and ends the sweep when the running ones end."""

    def __init__(self, *args, link_run: Optional[Callable[[str, int], Optional[str]]] = None,
                 study_attrs: Optional[dict] = None, trial_numbers: Optional[dict] = None, budget=None,
                 warm_start=None, **kwargs):
        self._link_run, self._study_attrs, self._budget = link_run, dict(study_attrs or {}), budget
        self._warm_start = warm_start
        self._trial_numbers = trial_numbers if trial_numbers is not None else {}
        self._last_step: dict = {}  # Tune trial id -> the last step reported to Optuna
        self._linked: set = set()
        super().__init__(*args, **kwargs)  # creates or loads the study (_setup_study)

    def _setup_study(self, mode):
        import optuna

        super()._setup_study(mode)
        names = self.metric if isinstance(self.metric, list) else [self.metric]
        with warnings.catch_warnings():  # experimental since Optuna 3.2, still in 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names(list(names))  # optuna-dashboard shows them, not "Objective 0"
        for key, value in self._study_attrs.items():
            self._ot_study.set_user_attr(key, value)
        apply_warm_start(self._ot_study, self._warm_start)  # before the first ask: TPE starts informed
        self._warm_start = None  # given once; not pickled with the searcher's snapshots

    def on_trial_result(self, trial_id, result):
        if trial_id in self._completed_trials:
            return super().on_trial_result(trial_id, result)  # Ray's warning
        self._link(trial_id)
        self._report(trial_id, result)

    def _report(self, trial_id, result: dict) -> None:
        """One intermediate value per epoch, at step ``epoch``; single objective only (Optuna
        keeps no intermediate values for several)."""
        if isinstance(self.metric, list) or trial_id not in self._ot_trials:
            return
        value, step = result.get(self.metric), result.get("epoch", result.get("training_iteration"))
        if not isinstance(value, (int, float)) or not math.isfinite(value) or step is None:
            return
        if int(step) > self._last_step.get(trial_id, -1):  # a retried trial re-reports no epoch
            self._ot_trials[trial_id].report(float(value), int(step))
            self._last_step[trial_id] = int(step)

    def _link(self, trial_id) -> None:
        if self._link_run is None or trial_id in self._linked or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        run_id = self._link_run(trial_id, ot_trial.number)
        if run_id:
            ot_trial.set_user_attr(MLFLOW_RUN_ATTR, run_id)
            self._linked.add(trial_id)

    def on_trial_complete(self, trial_id, result=None, error=False):
        if stop_requested() is not None:
            return  # stopped by a signal: left RUNNING here, recorded as interrupted by the sweep
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result=result, error=error)
        self._link(trial_id)  # before tell: a finished trial's attributes are frozen
        if not result:
            return super().on_trial_complete(trial_id, result=result, error=error)
        if not error:
            self._report(trial_id, result)  # the result Tune stopped the trial on (see the module doc)
        _keep_result(ot_trial, result)
        state = FAILED if error else trial_state(result)
        if state == COMPLETED:
            return super().on_trial_complete(trial_id, result=result, error=error)
        try:
            self._ot_study.tell(ot_trial, None, state=_optuna_state(state))  # PRUNED: the last epoch's value
        finally:
            self._completed_trials.add(trial_id)

    def save(self, checkpoint_path: str):
        # Tune snapshots the searcher with OptunaSearch.save, which pickles its whole __dict__
        # (ray/tune/search/optuna/optuna_search.py); ``link_run`` (a closure over the sweep's
        # log) stays out. kdray resumes from the Optuna study, never from this snapshot.
        link_run, self._link_run = self._link_run, None
        try:
            super().save(checkpoint_path)
        finally:
            self._link_run = link_run

    def suggest(self, trial_id):
        if self._budget is not None and self._budget.spent():  # before Optuna's ask: no trial is made
            from ray.tune.search import Searcher

            return Searcher.FINISHED
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:  # ties each study trial to its Tune trial (and run dir)
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
            self._trial_numbers[trial_id] = self._ot_trials[trial_id].number
        return config


def _keep_result(ot_trial, result: dict) -> None:
    """What a later ``--resume`` needs (:data:`KEPT_RESULT_KEYS`), as the trial's user attributes."""
    for key in KEPT_RESULT_KEYS:
        if result.get(key) is not None:
            with contextlib.suppress(Exception):
                ot_trial.set_user_attr(key, result[key])


def _optuna_state(state: str):
    """Optuna's state of a trial that kdray records as pruned or failed."""
    import optuna

    return {PRUNED: optuna.trial.TrialState.PRUNED, FAILED: optuna.trial.TrialState.FAIL}[state]


def make_searcher_class():
    """Ray's OptunaSearch with kdray's :class:`PrunedAwareSearch` in front of it."""
    from ray.tune.search.optuna import OptunaSearch

    class PrunedAwareOptunaSearch(PrunedAwareSearch, OptunaSearch):
        __doc__ = PrunedAwareSearch.__doc__

    return PrunedAwareOptunaSearch


def recorded_seed(storage, name: str) -> Optional[int]:
    """The seed an earlier session of sweep ``name`` recorded on its study (None: no study, or
    one from before seeds were recorded)."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
    seed = study.user_attrs.get(SEED_ATTR)
    return int(seed) if seed is not None else None


def trial_count(storage, name: str) -> int:
    """How many trials the study holds (0 when it does not exist yet)."""
    import optuna

    try:
        return len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
    except KeyError:
        return 0


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

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return _mark_interrupted(storage, study, running)


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
    finished = len(own_trials(study, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))
    left = max(samples - finished, 0)
    log(f"resume: {finished} trial(s) finished before, {left} to run")
    return left


def study_counts(study) -> dict:
    """This sweep's trials by state (its warm-start history is not among them)."""
    counts: dict = {}
    for t in own_trials(study):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def earlier_best(study, rows: list, metric: str) -> Optional[dict]:
    """The study's best COMPLETE trial when it ran in an earlier session (not among ``rows``), as a row."""
    import optuna

    done = own_trials(study, states=(optuna.trial.TrialState.COMPLETE,))  # study.best_trial counts the history
    if not done:
        return None
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    t = (max if maximize else min)(done, key=lambda trial: trial.value)
    rid = t.user_attrs.get("ray_trial_id")
    if rid is None or any(r["trial"] == rid for r in rows):
        return None
    metrics = {metric: t.value, "trial_id": rid, **{k: t.user_attrs[k] for k in KEPT_RESULT_KEYS if k in t.user_attrs}}
    return {"trial": rid, "config": dict(t.params), "metrics": metrics, "error": None, "earlier_session": True,
            "number": t.number}
