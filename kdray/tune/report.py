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
from kdray.tune.search import earlier_best, study_counts


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
    trials before their last epoch. ``total`` trials of (up to) their ``total_epochs`` each."""

    def __init__(self, total: int):
        self.total, self.t0 = total, None
        self.started, self.epochs_done, self.epochs_left = 0, 0, {}
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

    def text(self) -> str:
        if not self.t0 or not self.epochs_done or not self.epochs_per_trial:
            return ""
        rate = self.epochs_done / max(time.time() - self.t0, 1e-6)
        left = sum(self.epochs_left.values()) + (self.total - self.started) * self.epochs_per_trial
        return "done" if left == 0 else f"ETA <= {_duration(left / rate)}"


class ProgressLines:
    """What the sweep's progress callback does (a plain class, so that Ray is imported only when a
    sweep runs; :func:`make_progress_callback` mixes it into a Tune ``Callback``): one line per
    trial start, epoch report and end, each with the trial's number n/N, the best ``metric`` so far
    and an ETA; and the timings behind the per-trial overhead figures (start-up = trial start to
    first report, less that epoch's training time)."""

    def __init__(self, log: Callable[[str], None], metric: str, mode: str = "max", total: int = 0):
        self.log, self.metric, self.total = log, metric, total
        self.better = max if mode == "max" else min
        self.t0 = time.time()
        self.timing: dict = {}
        self.number: dict = {}
        self.latest: dict = {}  # trial id -> its last reported objective value
        self.eta = SweepEta(total)

    def _say(self, trial, msg: str) -> None:
        n = self.number.get(trial.trial_id, "?")
        self.log(f"[{_duration(time.time() - self.t0):>6}] trial {n}/{self.total or '?'} ({trial.trial_id}) {msg}"
                 + self._status())

    def _status(self) -> str:
        parts = []
        if self.latest:
            best_id = self.better(self.latest, key=self.latest.get)
            parts.append(f"best {self.metric}={self.latest[best_id]:.4f} (trial {self.number.get(best_id, '?')})")
        if self.eta.text():
            parts.append(self.eta.text())
        return ("  | " + ", ".join(parts)) if parts else ""

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
        if isinstance(val, (int, float)):
            self.latest[trial.trial_id] = float(val)
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
        self._end(trial, describe(trial_state(trial.last_result), trial.last_result))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.latest.pop(trial.trial_id, None)  # a failed trial's values are no result
        self._end(trial, describe(FAILED, trial.last_result, trial_error(trial)))


def make_progress_callback(log: Callable[[str], None], metric: str, mode: str = "max", total: int = 0):
    """A driver-side Tune callback printing the sweep's progress (:class:`ProgressLines`)."""
    from ray.tune import Callback

    class SweepProgress(ProgressLines, Callback):
        pass

    return SweepProgress(log, metric, mode, total)


def make_tracking_callback(track: SweepTracking, log: Callable[[str], None]):
    """A driver-side Tune callback: closes each trial's MLflow child run with its state (pruned,
    completed, failed with the reason; :func:`kdray.tracking.trials.record_trial_state`), creating
    the run when a trial died before it could. A store that fails here costs one line, not the
    sweep (--resume closes what stayed open)."""
    from ray.tune import Callback

    from kdray.tracking.trials import record_trial_state

    def method(trial) -> Optional[str]:
        return (trial.config or {}).get("method")

    class TrialStateCallback(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if stop_requested() is None:  # an interrupted trial is closed as such after Tune stops
                record_trial_state(track, trial.trial_id, method(trial), trial_state(trial.last_result), log)

        def on_trial_error(self, iteration, trials, trial, **info):
            record_trial_state(track, trial.trial_id, method(trial), FAILED, log,
                               reason=failure_reason(trial_error(trial)), create=True)

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


def _best_row(study, rows: list, metric: str, mode: str) -> Optional[dict]:
    """The best fully trained trial (this session's or, on --resume, an earlier one's); a pruned
    one only when no trial finished."""
    done = [r for r in rows if not r["error"] and r["metrics"]]
    full = [r for r in done if is_done(r["metrics"])]
    earlier = earlier_best(study, rows, metric)
    pool = (full + [earlier] if full else [earlier]) if earlier is not None else (full or done)
    if not pool:
        return None
    worst = float("-inf") if mode == "max" else float("inf")
    best = (max if mode == "max" else min)(pool, key=lambda r: r["metrics"].get(metric, worst))
    ckpt = best["metrics"].get("checkpoint_path")
    if ckpt:
        best["student_path"] = str(Path(ckpt) / "student.pt")
    return best


def summarize(name: str, storage, space, rows: list) -> dict:
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    out = {"experiment": name, "space": space.path, "trials": rows, "study_counts": study_counts(study),
           "metrics": space.metrics}
    if space.multi_objective:
        out["pareto_front"] = [{"number": t.number, "values": t.values, "params": t.params}
                               for t in study.best_trials]
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
