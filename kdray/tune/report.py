"""What a sweep tells while it runs and when it ends: one console line per trial event, each
trial's state in MLflow, and the summary (trials, best, Pareto front, where the time went).
Every state comes from :mod:`kdray.core.outcome`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from kdray.core.guards import stop_requested
from kdray.core.outcome import COMPLETED, FAILED, failure_reason, is_done, trial_state
from kdray.tracking.state import SweepTracking
from kdray.tracking.store import is_tracking_lost
from kdray.tune.search import earlier_best, study_counts
from kdray.tune.warm_start import STUDY_ATTR, own_pareto_front


def trial_error(trial) -> Optional[BaseException]:
    """The exception a Tune trial failed with. Tune pickles it into the trial's local folder when the
    trial fails (``Trial.handle_error``), before the callbacks run; ``get_pickled_error`` reads the
    storage copy, which is synced later, so the local file is read first."""
    from ray import cloudpickle

    try:
        path = trial.pickled_error_file
        if path and Path(path).is_file():
            with open(path, "rb") as fh:
                return cloudpickle.load(fh)
        return trial.get_pickled_error()
    except Exception as exc:  # noqa: BLE001 - an unreadable error file still means the trial failed
        return RuntimeError(f"the trial's error could not be read ({type(exc).__name__})")


class _NoTrialTracebacks:
    """A logging filter: Tune's controller logs every failed trial with its whole traceback
    (``"Trial task failed for trial ..."``, exc_info); kdray prints one line per failure with its
    reason instead, and the traceback stays in the trial's error.txt."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Trial task failed for trial")


def quiet_trial_tracebacks() -> None:
    import logging

    logger = logging.getLogger("ray.tune.execution.tune_controller")
    if not any(isinstance(f, _NoTrialTracebacks) for f in logger.filters):
        logger.addFilter(_NoTrialTracebacks())


def describe(state: str, last: Optional[dict], error: Optional[BaseException] = None) -> str:
    if state == FAILED:
        return "failed: " + (failure_reason(error) if error is not None else "unknown error")
    if state == COMPLETED:
        return "completed"
    return f"pruned by ASHA after epoch {(last or {}).get('epoch', 0)}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class SweepEta:
    """Remaining time of a sweep from its epoch rate so far: an upper bound, since ASHA may stop
    trials before their last epoch. ``total`` trials of (up to) their ``total_epochs`` each.
    ``budget``: the sweep's time budget (:class:`~kdray.tune.budget.SweepBudget`, None: none),
    which the ETA never promises beyond (:meth:`seconds`)."""

    def __init__(self, total: int, budget=None):
        self.total, self.t0, self.budget = total, None, budget
        self.started, self.ended, self.epochs_done, self.epochs_left = 0, 0, 0, {}
        self.epochs_per_trial = None

    def start(self) -> None:
        self.t0 = self.t0 or time.time()
        self.started += 1

    def report(self, trial_id: str, epoch: int, total_epochs: Optional[int]) -> None:
        self.epochs_done += 1
        if total_epochs:
            self.epochs_per_trial = max(self.epochs_per_trial or 0, int(total_epochs))
            self.epochs_left[trial_id] = max(0, int(total_epochs) - int(epoch))

    def end(self, trial_id: str) -> None:
        self.epochs_left.pop(trial_id, None)
        self.ended += 1

    def seconds(self, now: Optional[float] = None) -> Optional[float]:
        """The bound in seconds (None before the first report), never beyond the budget: once it
        is spent no trial starts, so only the running trials' epochs are left (none when they
        stop there); before, the sweep ends by the budget's end (with ``finish``, plus a whole
        trial at the rate each running trial gets now)."""
        if not self.t0 or not self.epochs_done or not self.epochs_per_trial:
            return None
        now = now if now is not None else time.time()
        rate = self.epochs_done / max(now - self.t0, 1e-6)
        budget_s = self.budget.left(now) if self.budget is not None else None
        if budget_s == 0.0 and self.budget.at == "stop":
            return 0.0
        starting = self.total - self.started if budget_s != 0.0 else 0  # no trial starts after the budget
        bound = (sum(self.epochs_left.values()) + starting * self.epochs_per_trial) / rate
        if budget_s:
            running = max(self.started - self.ended, 1)
            bound = min(bound, budget_s + (0 if self.budget.at == "stop" else self.epochs_per_trial * running / rate))
        return bound

    def text(self) -> str:
        bound = self.seconds()
        if bound is None:
            return ""
        return "done" if bound == 0 else f"ETA <= {_duration(bound)}"


class ProgressLines:
    """What the sweep's progress callback does (a plain class, so that Ray is imported only when a
    sweep runs; :func:`make_progress_callback` mixes it into a Tune ``Callback``): one line per
    trial start, epoch report and end, each with the trial's number n/N, the sweep's best so far
    and an ETA; and the timings behind the per-trial overhead figures (start-up = trial start to
    first report, less that epoch's training time).

    The best so far is the trial the sweep would name its winner if it ended now, by the same rule
    (:func:`best_trial`) over the trials that ended (and, on --resume, an earlier session's best,
    ``earlier``); none while no trial has ended. A running trial's value may still go down, an
    ended trial's is final, so the best of a growing pool of final values never gets worse, with
    one exception the rule makes: pruned trials stand in only until the first trial trains to its
    last epoch, which then wins even when its value is lower. It is named as its MLflow run is
    (``ekd-2``: the method and the Optuna trial's number, which the searcher writes into
    ``trial_numbers``) beside Tune's trial id."""

    def __init__(self, log: Callable[[str], None], metric: str, mode: str = "max", total: int = 0,
                 method: Optional[str] = None):
        self.log, self.metric, self.mode, self.total, self.method = log, metric, mode, total, method
        self.t0 = time.time()
        self.timing: dict = {}
        self.number: dict = {}
        self.trial_numbers: dict = {}  # Tune trial id -> its Optuna trial's number (filled by the searcher)
        self.ended: dict = {}  # Tune trial id -> the row of a trial that completed or was pruned
        self.earlier: Optional[dict] = None
        self.eta = SweepEta(total)

    def _say(self, trial, msg: str) -> None:
        n = self.number.get(trial.trial_id, "?")
        self.log(f"[{_duration(time.time() - self.t0):>6}] trial {n}/{self.total or '?'} ({trial.trial_id}) {msg}"
                 + self._status())

    def best(self) -> Optional[dict]:
        """The sweep's winner so far (:func:`best_trial` over the ended trials), or None."""
        return best_trial(list(self.ended.values()), self.metric, self.mode, self.earlier)

    def _status(self) -> str:
        parts = []
        best = self.best()
        if best is not None and isinstance(best["metrics"].get(self.metric), (int, float)):
            parts.append(f"best {self.metric}={best['metrics'][self.metric]:.4f} ({best_label(best)})")
        if self.eta.text():
            parts.append(self.eta.text())
        return ("  | " + ", ".join(parts)) if parts else ""

    def _row(self, trial) -> dict:
        """A trial that ended, as :func:`best_trial` reads it, with its MLflow-style name."""
        method = (trial.config or {}).get("method") or self.method
        return {"trial": trial.trial_id, "metrics": dict(trial.last_result or {}), "error": None,
                "name": trial_name(method, self.trial_numbers.get(trial.trial_id))}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.timing[trial.trial_id] = {"start": time.time()}
        self.number.setdefault(trial.trial_id, len(self.number) + 1)
        self.eta.start()
        cfg = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in sorted((trial.config or {}).items()))
        self._say(trial, f"started: {cfg}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._time_report(self.timing.setdefault(trial.trial_id, {"start": time.time()}), result)
        self.eta.report(trial.trial_id, result.get("epoch", 0), result.get("total_epochs"))
        val = result.get(self.metric)
        shown = f"{val:.4f}" if isinstance(val, (int, float)) else "?"
        self._say(trial, f"epoch {result.get('epoch', '?')}/{result.get('total_epochs', '?')}: "
                         f"{self.metric}={shown} ({result.get('epoch_time_s', 0):.1f}s, "
                         f"node {result.get('node_ip', '?')})")

    @staticmethod
    def _time_report(rec: dict, result: dict) -> None:
        now = time.time()
        epoch_s = float(result.get("epoch_wall_s") or result.get("epoch_time_s") or 0)
        if "first_report" not in rec:
            rec["first_report"] = now
            rec["startup_s"] = round(now - rec["start"] - epoch_s, 2)
        rec["last_report"] = now
        rec["train_s"] = rec.get("train_s", 0.0) + epoch_s

    def _end(self, trial, text: str) -> None:
        self.timing.setdefault(trial.trial_id, {"start": time.time()})["end"] = time.time()
        self.eta.end(trial.trial_id)
        self._say(trial, text)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if stop_requested() is not None:  # stopped by Tune because a stop signal came
            return self._end(trial, "interrupted")
        if trial.last_result:  # its last result is final: a candidate for the sweep's best from now on
            self.ended[trial.trial_id] = self._row(trial)
        self._end(trial, describe(trial_state(trial.last_result), trial.last_result))

    def on_trial_error(self, iteration, trials, trial, **info):  # a failed trial's values are no result
        self._end(trial, describe(FAILED, trial.last_result, trial_error(trial)))


def trial_name(method: Optional[str], number: Optional[int]) -> Optional[str]:
    """A trial's name as its MLflow run carries it (``ekd-2``), or None before its Optuna trial is known."""
    from kdray.tracking.trials import optuna_run_name

    return optuna_run_name(method, number) if number is not None else None


def best_label(row: dict) -> str:
    """How the console names a best trial: its MLflow run's name beside Tune's trial id."""
    parts = [p for p in (row.get("name"), row.get("trial")) if p]
    if row.get("earlier_session"):
        parts.append("earlier session")
    return ", ".join(parts) or "?"


def make_progress_callback(log: Callable[[str], None], metric: str, mode: str = "max", total: int = 0,
                           method: Optional[str] = None):
    """A driver-side Tune callback printing the sweep's progress (:class:`ProgressLines`)."""
    from ray.tune import Callback

    class SweepProgress(ProgressLines, Callback):
        pass

    return SweepProgress(log, metric, mode, total, method)


def make_tracking_callback(track: SweepTracking, log: Callable[[str], None], watch=None):
    """A driver-side Tune callback: closes each trial's MLflow child run with its state (pruned,
    completed, failed with the reason; :func:`kdray.tracking.trials.record_trial_state`), creating
    the run when a trial died before it could. A store that fails here costs one line, not the
    sweep (--resume closes what stayed open). Once ``watch`` (a
    :class:`~kdray.tune.halt.TrackingWatch`) knows the server lost, nothing is sent to it: each
    call would wait out MLflow's retries to fail; --resume closes those runs."""
    from ray.tune import Callback

    from kdray.tracking.trials import record_trial_state

    def method(trial) -> Optional[str]:
        return (trial.config or {}).get("method")

    def server_lost() -> bool:
        return watch is not None and watch.lost

    class TrialStateCallback(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if stop_requested() is None and not server_lost():  # an interrupted trial is closed after Tune stops
                record_trial_state(track, trial.trial_id, method(trial), trial_state(trial.last_result), log)

        def on_trial_error(self, iteration, trials, trial, **info):
            reason = failure_reason(trial_error(trial))
            if not server_lost() and not is_tracking_lost(reason):
                record_trial_state(track, trial.trial_id, method(trial), FAILED, log, reason=reason, create=True)

    return TrialStateCallback()


def result_rows(grid, progress) -> list:
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial": m.get("trial_id"), "config": r.config,
                     "metrics": {k: v for k, v in m.items()
                                 if isinstance(v, (int, float, str)) and not k.startswith("config/")},
                     "error": failure_reason(r.error) if r.error else None,
                     "state": trial_state(m, r.error),
                     "timing": row_timing(progress, m.get("trial_id"))})
    return rows


def best_trial(rows: list, metric: str, mode: str, earlier: Optional[dict] = None) -> Optional[dict]:
    """The sweep's winner among ``rows`` (trials as :func:`result_rows` gives them; one with an
    ``error`` failed): the best fully trained trial by its final ``metric``, ``earlier`` (the best
    of an earlier session of the sweep, or None) among them; a pruned one only when no trial
    finished; never one stopped at the time budget (``interrupted``). The one rule behind the
    summary's best and the console's best so far."""
    done = [r for r in rows if not r.get("error") and r.get("metrics") and r.get("state") != "interrupted"]
    full = [r for r in done if is_done(r["metrics"])]
    pool = full + [earlier] if earlier is not None else (full or done)
    if not pool:
        return None
    worst = float("-inf") if mode == "max" else float("inf")
    return (max if mode == "max" else min)(pool, key=lambda r: r["metrics"].get(metric, worst))


def _best_row(study, rows: list, metric: str, mode: str) -> Optional[dict]:
    """The winner (:func:`best_trial`) with this session's rows and, on --resume, an earlier one's best."""
    best = best_trial(rows, metric, mode, earlier_best(study, rows, metric))
    if best is None:
        return None
    ckpt = best["metrics"].get("checkpoint_path")
    if ckpt:
        best["student_path"] = str(Path(ckpt) / "student.pt")
    return best


def summarize(name: str, storage, space, rows: list) -> dict:
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    out = {"experiment": name, "space": space.path, "trials": rows, "study_counts": study_counts(study),
           "metrics": space.metrics}
    if STUDY_ATTR in study.user_attrs:  # where the study started from (kdray.tune.warm_start)
        out["warm_start"] = study.user_attrs[STUDY_ATTR]
    if space.multi_objective:
        out["pareto_front"] = [{"number": t.number, "values": t.values, "params": t.params}
                               for t in own_pareto_front(study)]
        return out
    best = _best_row(study, rows, *space.metrics[0])
    if best is not None:
        out["best"] = best
    return out


def row_timing(progress, trial_id) -> dict:
    """A trial's start-up and training seconds, and when it started and ended (seconds into the sweep)."""
    rec = progress.timing.get(trial_id or "", {})
    out = {k: round(rec[k], 2) for k in ("startup_s", "train_s") if k in rec}
    for key, name in (("start", "started_at_s"), ("end", "ended_at_s")):
        if key in rec:
            out[name] = round(rec[key] - progress.t0, 1)
    return out


def sweep_timing(rows: list, wall_s: float, concurrency: int) -> dict:
    """Where a sweep's time went. Training = the trials' epochs (steps, evaluation, checkpoint);
    a trial's fixed cost = its time in a slot outside its epochs (start-up, loading, the end);
    start-up = trial start to first report, less that epoch; slots busy = trial time over
    wall x concurrency (a sweep's tail leaves slots idle when no trial is left to start)."""
    timings = [r.get("timing", {}) for r in rows]
    starts = [t["startup_s"] for t in timings if "startup_s" in t]
    train = sum(t.get("train_s", 0.0) for t in timings)
    in_slot = sum(t["ended_at_s"] - t["started_at_s"] for t in timings if "ended_at_s" in t and "started_at_s" in t)
    n = max(len(rows), 1)
    return {"wall_s": round(wall_s, 1), "trials": len(rows), "train_s": round(train, 1),
            "trial_s": round(in_slot, 1), "train_share": round(train / in_slot, 3) if in_slot else None,
            "slots_busy": round(in_slot / (wall_s * concurrency), 3) if wall_s else None,
            "startup_s_mean": round(sum(starts) / len(starts), 1) if starts else None,
            "overhead_s_per_trial": round(max(in_slot - train, 0.0) / n, 1)}
