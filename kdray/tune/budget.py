"""A sweep's wall-clock budget: ``kdray tune --time-budget 2h [--at-budget finish|stop]`` (or
``time_budget:`` / ``at_budget:`` in the space file, or the API's keywords).

The budget counts from the moment the Tuner starts (after the teachers and their store, as Ray
Tune's own ``time_budget_s`` does). Once it is spent no trial is proposed: the searcher answers
``Searcher.FINISHED`` (:class:`~kdray.tune.search.PrunedAwareSearch`), so Tune ends the sweep when
the trials running then end. With ``--at-budget finish`` (the default) those run to their end and
are recorded as usual; with ``stop`` the sweep's Tune ``Stopper`` (:func:`kdray.tune.halt.make_stopper`)
answers ``stop_all`` and Tune stops them in the same step.

kdray does not hand the budget to ``TuneConfig(time_budget_s=...)``: Ray's ``TimeoutStopper`` is
only the ``stop`` behaviour (it stops the running trials too), it never says afterwards that it
fired, and a trial it stops reaches neither the searcher nor the callbacks (Optuna keeps it
RUNNING, MLflow too). Trials stopped at the budget are recorded the way a Ctrl-C records them
(Optuna: FAIL with the user attribute ``interrupted``, their parameters queued to run again;
MLflow: ``kdray.state = interrupted``), so ``--resume`` runs them and the unstarted ones.
"""

from __future__ import annotations

import math
import re
import time
from typing import Callable, Optional

from kdray.core.errors import KdrayError

AT_BUDGET = ("finish", "stop")
DURATIONS = "90s, 30m, 2h, 1h30m or plain seconds (> 0)"
_DURATION = re.compile(r"(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?")
#: the MLflow sweep run's tags when the budget ended the sweep
ENDED_BY_TAG, UNSTARTED_TAG, STOPPED_TAG = "kdray.ended_by", "kdray.budget_unstarted", "kdray.budget_stopped"


def parse_duration(value, what: str = "--time-budget") -> Optional[float]:
    """Seconds from ``90s``, ``30m``, ``2h``, ``1h30m`` or plain seconds (``5400``, a number or a
    string); None stays None. Anything else, or a duration that is not > 0, is
    one :class:`KdrayError` line naming ``what`` and what is allowed."""
    if value is None:
        return None
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            match = _DURATION.fullmatch(text)
            if text and match and any(match.groups()):
                h, m, s = (float(match.group(k) or 0) for k in "hms")
                seconds = h * 3600 + m * 60 + s
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise KdrayError(f"{what} {value!r} is not a duration; allowed: {DURATIONS}")
    return seconds


def check_at_budget(value, what: str = "--at-budget") -> None:
    if value is not None and value not in AT_BUDGET:
        raise KdrayError(f"{what} {value!r} is not allowed; allowed: {', '.join(AT_BUDGET)}")


def duration_text(seconds: float) -> str:
    """``2h``, ``1h30m``, ``90s`` (as a user would write it)."""
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v) or "0s"


class SweepBudget:
    """``seconds`` of wall clock from :meth:`start` (the Tuner's start); ``at``: what happens to the
    running trials when it is spent (``finish`` or ``stop``). Plain values: the searcher, the
    stopper, the ETA and the driver share this one object (Tune pickles the searcher and the
    stopper with its experiment state; a pickled copy is never read back: kdray resumes from
    the Optuna study)."""

    def __init__(self, seconds: float, at: str = "finish"):
        self.seconds, self.at = float(seconds), at
        self.started_at: Optional[float] = None
        self.stopped_running = False  # the stopper stopped the running trials (at == "stop")
        self.announced = False

    @classmethod
    def of(cls, options, space) -> Optional["SweepBudget"]:
        """The sweep's budget: the options' (--time-budget, --at-budget), else the space file's; None: none."""
        seconds = parse_duration(options.time_budget) if options.time_budget is not None else space.time_budget
        if seconds is None:
            return None
        return cls(seconds, options.at_budget or space.at_budget or "finish")

    @property
    def text(self) -> str:
        return duration_text(self.seconds)

    def begin(self, sweep, now: float) -> None:
        """The sweep's trials start: said on the console and the MLflow sweep run, counted from ``now``."""
        what = "stop (--resume runs them again)" if self.at == "stop" else "finish"
        sweep.log(f"time budget {self.text}: no trial starts after it; the running ones then {what}")
        if sweep.track:
            record_budget(sweep.track, self)
        self.start(now)

    def start(self, now: Optional[float] = None) -> None:
        if self.started_at is None:
            self.started_at = now if now is not None else time.time()

    @property
    def deadline(self) -> Optional[float]:
        return None if self.started_at is None else self.started_at + self.seconds

    def left(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds until the budget is spent (0 once it is; None before it started)."""
        if self.deadline is None:
            return None
        return max(self.deadline - (now if now is not None else time.time()), 0.0)

    def spent(self, now: Optional[float] = None) -> bool:
        return self.left(now) == 0.0

    def stop_all(self) -> bool:
        """The stopper's answer: stop the running trials (only with ``at == "stop"``)."""
        if self.at == "stop" and self.spent():
            self.stopped_running = True
            return True
        return False


def make_budget_callback(budget: SweepBudget, total: int, log: Callable[[str], None]):
    """A driver-side Tune callback that says once, at the end of the first Tune step after the
    budget was spent in which no trial waits to start (one proposed before the budget starts a few
    milliseconds later: from this line on none starts), what happens now; only when it changes
    anything (trials were left to start, or the running ones were stopped)."""
    from ray.tune import Callback

    class BudgetCallback(Callback):
        def on_step_end(self, iteration, trials, **info):
            if budget.announced or not budget.spent() or not (len(trials) < total or budget.stopped_running):
                return
            if any(t.status == "PENDING" for t in trials):
                return
            budget.announced = True
            what = ("the running trials are stopped (recorded as interrupted; --resume runs them again)"
                    if budget.at == "stop" else "the running trials finish")
            log(f"time budget {budget.text} spent: no new trial starts; {what}")

    return BudgetCallback()


def end_of_budget(sweep, budget: Optional[SweepBudget], rows: list, progress, resume: str):
    """After ``Tuner.fit``: whether the budget ended the sweep, and the trials it stopped recorded as
    interrupted (Optuna: FAIL, ``interrupted``, queued again; MLflow: ``interrupted``) and named so
    in ``rows``; returns the summary's ``time_budget`` entry (None without a budget) and ``rows``
    (less those of trials the stop caught before they reported anything). ``resume``: the command
    that continues the sweep."""
    if budget is None:
        return None, rows
    from kdray.tune.search import close_interrupted_trials

    started = set(progress.number)
    stopped, queued = [], 0
    if budget.stopped_running:  # Tune stopped the running trials without a word to the searcher or callbacks
        stopped = sorted(tid for tid in started if "end" not in progress.timing.get(tid, {}))
        queued = close_interrupted_trials(sweep.storage, sweep.name)  # also those suggested, never started
        rows = [r for r in rows if r.get("trial") or r.get("error")]  # never reported: no row to show
        for r in rows:
            if r.get("trial") in stopped:
                r["state"] = "interrupted"
        if sweep.track:
            _close_stopped_runs(sweep, budget, stopped, rows)
    unstarted = max(sweep.left - len(started), 0)
    ended = budget.spent() and bool(unstarted or stopped)
    out = {"seconds": budget.seconds, "at_budget": budget.at, "spent": budget.spent(), "ended_sweep": ended,
           "left_unstarted": unstarted, "stopped": len(stopped), "queued_again": queued}
    if ended:
        out["resume_command"] = resume
    return out, rows


def budget_line(entry: dict) -> str:
    """The summary's line about a budget that ended the sweep."""
    stopped = (f"; {entry['stopped']} running trial(s) stopped and queued again" if entry["stopped"]
               else "; the running trials finished")
    return (f"the time budget {duration_text(entry['seconds'])} ended the sweep: {entry['left_unstarted']} trial(s) "
            f"left unstarted{stopped}; `{entry['resume_command']}` runs them")


def _close_stopped_runs(sweep, budget: SweepBudget, stopped: list, rows: list) -> None:
    from kdray.tracking.trials import record_trial_state

    methods = {r.get("trial"): (r.get("config") or {}).get("method") for r in rows}
    for tid in stopped:
        record_trial_state(sweep.track, tid, methods.get(tid) or sweep.space.base.method, "interrupted", sweep.log,
                           reason=f"stopped at the sweep's time budget ({budget.text})")


def record_budget(track, budget: SweepBudget, entry: Optional[dict] = None) -> None:
    """On the MLflow sweep run: the budget (params ``time_budget_s``, ``at_budget``) at the start;
    at the end, when it ended the sweep, the tags ``kdray.ended_by = time_budget`` and the counts
    of trials left unstarted and stopped."""
    from kdray.tracking.runs import log_batch
    from kdray.tracking.store import client

    if entry is None:
        log_batch(client(track.uri), track.parent_run_id,
                  params={"time_budget_s": round(budget.seconds, 3), "at_budget": budget.at})
    elif entry.get("ended_sweep"):
        log_batch(client(track.uri), track.parent_run_id,
                  tags={ENDED_BY_TAG: "time_budget", UNSTARTED_TAG: entry["left_unstarted"],
                        STOPPED_TAG: entry["stopped"]})
