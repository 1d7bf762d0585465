"""A sweep that cannot go on: once a trial fails because the MLflow tracking server stopped
answering (:class:`~kdray.tracking.store.TrackingLost`), every later trial would fail the same way
after its own bounded retries. The sweep's :class:`TrackingWatch` notes that first failure; a Tune
``Stopper`` whose ``stop_all`` then answers True makes Tune end the experiment in the same step
(``TuneController._stop_experiment_if_needed``: the searcher is marked finished, so no trial is
proposed or started after it, and the running ones are stopped), and the driver stops talking to
the server (its callbacks and run linker skip it). The sweep then ends with one line and the
``--resume`` command (:func:`kdray.tune.run.lost_tracking`)."""

from __future__ import annotations

from typing import Optional

from kdray.core.outcome import failure_reason
from kdray.tracking.store import is_tracking_lost


class TrackingWatch:
    """Whether the sweep's tracking server is known lost: the Tune trial that found it first
    (``trial_id``) and its one-line reason. Plain values: Tune pickles the Tuner's callbacks and
    stopper with its state, and the driver reads this same object after ``Tuner.fit``."""

    def __init__(self):
        self.trial_id: Optional[str] = None
        self.reason: Optional[str] = None

    @property
    def lost(self) -> bool:
        return self.trial_id is not None

    def see(self, trial) -> bool:
        """Note ``trial``'s failure when the tracking server was lost; whether the server is lost."""
        if not self.lost:
            from kdray.tune.report import trial_error

            reason = failure_reason(trial_error(trial))
            if is_tracking_lost(reason):
                self.trial_id, self.reason = trial.trial_id, reason
        return self.lost


def make_watch_callback(watch: TrackingWatch):
    """A driver-side Tune callback that shows ``watch`` every failed trial, retried ones too
    (Tune's ``on_trial_recover``: a trial retried after losing the server would lose it again).
    First among the sweep's callbacks, so that the others know before they call the server."""
    from ray.tune import Callback

    class TrackingWatchCallback(Callback):
        def on_trial_error(self, iteration, trials, trial, **info):
            watch.see(trial)

        def on_trial_recover(self, iteration, trials, trial, **info):
            watch.see(trial)

    return TrackingWatchCallback()


def make_stopper(watch: TrackingWatch, budget=None):
    """A Tune ``Stopper`` that stops the whole experiment once ``watch`` says the server is lost,
    or once the sweep's time budget (a :class:`~kdray.tune.budget.SweepBudget`, None: none) is
    spent when its running trials are to stop there (it never stops a single trial: ASHA does that)."""
    from ray.tune import Stopper

    class SweepStopper(Stopper):
        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            return watch.lost or (budget is not None and budget.stop_all())

    return SweepStopper()
