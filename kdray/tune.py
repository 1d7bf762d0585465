"""Sweeps: Ray Tune + OptunaSearch (TPE, persistent study) + ASHA on the epoch axis.

Each trial is a Tune function that builds and fits a TorchTrainer with W workers (the supported
Train-inside-Tune pattern); a TuneReportCallback forwards every epoch's report to Tune. Teachers
are trained once, before any trial, by the driver.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from .errors import KdrayError
from .space import Space, load_space


def make_searcher_class():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class PrunedAwareOptunaSearch(OptunaSearch):
        """Records a trial that ASHA stopped before its last epoch as PRUNED, and a trial that failed
        after some epochs as FAIL: Ray's OptunaSearch tells both as COMPLETE with the partial score
        of their last report, which TPE would then trust as a finished result."""

        def on_trial_complete(self, trial_id, result=None, error=False):
            state = None
            if error and result and trial_id in self._ot_trials:
                state = optuna.trial.TrialState.FAIL
            elif (not error and result and trial_id in self._ot_trials
                    and result.get("epoch", 0) < result.get("total_epochs", 0)):
                state = optuna.trial.TrialState.PRUNED
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None and result:  # what a later --resume needs to name the best student
                for key in ("checkpoint_path", "node_ip", "epoch", "total_epochs"):
                    if result.get(key) is not None:
                        with contextlib.suppress(Exception):
                            ot_trial.set_user_attr(key, result[key])
            if state is not None and trial_id not in self._completed_trials:
                try:
                    self._ot_study.tell(self._ot_trials[trial_id], None, state=state)
                finally:
                    self._completed_trials.add(trial_id)
                return
            super().on_trial_complete(trial_id, result=result, error=error)

        def suggest(self, trial_id):
            config = super().suggest(trial_id)
            if trial_id in self._ot_trials:  # ties each study trial to its Tune trial (and run dir)
                self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
            return config

    return PrunedAwareOptunaSearch


def fit_concurrency(concurrency: int, workers: int, gpus_per_worker: float, cpus_per_worker: float,
                    log: Callable[[str], None]) -> int:
    """How many trials the cluster can host at once, at most ``concurrency``.

    Tune only sees each trial's driver (DRIVER_RESOURCES: no CPU); the TorchTrainer a trial starts
    asks for its W workers later, in a placement group of its own that Tune does not count. A
    concurrency the nodes cannot host makes the surplus trials' workers wait for CPUs that are not
    there (WorkerGroupStartupTimeoutError after 60 s, retried for ever by Train's controller), so
    clamp it here, packing drivers and worker bundles onto the alive nodes the way Ray would. Counts
    the cluster as it is now: an autoscaling cluster gets the concurrency its current nodes allow."""
    import ray

    from .scale import DRIVER_RESOURCES

    free = [{"CPU": float(n["Resources"].get("CPU", 0)), "GPU": float(n["Resources"].get("GPU", 0))}
            for n in ray.nodes() if n.get("Alive")]
    bundle = {"CPU": cpus_per_worker, "GPU": gpus_per_worker}
    driver = {"CPU": float(DRIVER_RESOURCES.get("cpu", 0)), "GPU": 0.0}
    eps = 1e-9

    def place(need: dict) -> bool:
        fits = [f for f in free if all(f[k] + eps >= v for k, v in need.items())]
        if not fits:
            return False
        best = max(fits, key=lambda f: (f["CPU"] - need["CPU"], f["GPU"] - need["GPU"]))
        for k, v in need.items():
            best[k] -= v
        return True

    hosted = 0
    while hosted < concurrency and place(driver) and all(place(bundle) for _ in range(workers)):
        hosted += 1
    if hosted == 0:
        raise KdrayError(
            f"no node can host a worker of {cpus_per_worker:g} CPU / {gpus_per_worker:g} GPU next to a trial driver "
            f"({len(free)} node(s): " + ", ".join(f"{n['CPU']:g} CPU {n['GPU']:g} GPU" for n in free) + "); "
            "lower --cpus-per-worker/--gpus-per-worker/--workers"
        )
    if hosted < concurrency:
        log(f"concurrency: {concurrency} trial(s) at once do not fit this cluster ({workers} worker(s) x "
            f"{cpus_per_worker:g} CPU{f' / {gpus_per_worker:g} GPU' if gpus_per_worker else ''} + the trial driver each); "
            f"running {hosted} at a time")
    return hosted


TRIAL_ENV_DEFAULTS = {
    # Train's controller polls its workers (start-up, each report, the end) every 2 s by default:
    # every epoch report and the end of every trial waited up to 2 s for it.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # print() in a worker went both to the console and through Train's logger: every line twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def trial_env(local: bool) -> dict:
    """Environment for the sweep's Ray processes (handed to init_ray, which sets it through the job's
    runtime_env; Train then propagates these variables to its controllers and workers). A value the
    user exported wins."""
    env = dict(TRIAL_ENV_DEFAULTS)
    if local:  # one actor process fewer per trial: nothing pre-empts a node of a local Ray
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return {k: os.environ.get(k, v) for k, v in env.items()}


def make_progress_callback(log: Callable[[str], None], metric: str):
    """A driver-side Tune callback: one line per trial start, epoch report and end, and the
    timings behind the per-trial overhead figures (start-up = trial start to first report, less
    that epoch's training time)."""
    from ray.tune import Callback

    class SweepProgress(Callback):
        def __init__(self):
            self.t0 = time.time()
            self.timing: dict = {}

        def _say(self, msg: str) -> None:
            log(f"[{time.time() - self.t0:6.0f}s] {msg}")

        def on_trial_start(self, iteration, trials, trial, **info):
            self.timing[trial.trial_id] = {"start": time.time()}
            cfg = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in sorted((trial.config or {}).items()))
            self._say(f"trial {trial.trial_id} started: {cfg}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            rec = self.timing.setdefault(trial.trial_id, {"start": time.time()})
            now = time.time()
            if "first_report" not in rec:
                rec["first_report"] = now
                rec["startup_s"] = round(now - rec["start"] - float(result.get("epoch_time_s") or 0), 2)
            rec["last_report"] = now
            rec["train_s"] = rec.get("train_s", 0.0) + float(result.get("epoch_time_s") or 0)
            val = result.get(metric)
            val = f"{val:.4f}" if isinstance(val, (int, float)) else "?"
            self._say(f"trial {trial.trial_id} epoch {result.get('epoch', '?')}/{result.get('total_epochs', '?')}: "
                      f"{metric}={val} ({result.get('epoch_time_s', 0):.1f}s, node {result.get('node_ip', '?')})")

        def _end(self, trial, state: str) -> None:
            rec = self.timing.setdefault(trial.trial_id, {"start": time.time()})
            rec["end"] = time.time()
            self._say(f"trial {trial.trial_id} {state}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            res = trial.last_result or {}
            done = res.get("epoch", 0) >= res.get("total_epochs", 1)
            self._end(trial, "completed" if done else f"pruned by ASHA after epoch {res.get('epoch', 0)}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, "failed: " + failure_reason(_trial_error_text(trial)))

    return SweepProgress()


def _trial_error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        return Path(path).read_text(errors="replace") if path else str(getattr(trial, "error_msg", "") or "")
    except OSError:
        return ""


def failure_reason(error) -> str:
    """The line of a trial's (wrapped) error that says why it failed."""
    # message lines only: not the traceback's source lines (`raise RuntimeError(f"NonFiniteLoss: ...")`)
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [l.strip() for l in text.strip().splitlines()
             if l.strip() and not l.strip().startswith(("raise ", "File ", "^", "~"))]
    for key in ("NonFiniteLoss", "KdrayError", "WorkerGroupStartupTimeoutError", "OutOfMemoryError"):
        hit = next((l for l in reversed(lines) if key + ":" in l or l.endswith(key)), None)
        if hit:
            return hit[hit.index(key):][:300]
    return (lines[-1] if lines else repr(error))[:300]


def teachers_for(space: Space, workdir: Path, log: Callable[[str], None]) -> Optional[str]:
    """Train the space's teachers once (or find them ready); return their directory."""
    from .distill import get_method

    methods = {space.base.method}
    m = space.params.get("method")
    if isinstance(m, dict):
        methods.update(m["choices"])
    elif m is not None:
        methods.add(m)
    if space.base.teachers or all(get_method(x).min_teachers == 0 for x in methods):
        return space.base.teachers
    spec = {"arch": space.teachers.get("arch", ["resnet20"]), "count": space.teachers.get("count", 3),
            "epochs": space.teachers.get("epochs", 20),
            "train_fraction": space.teachers.get("train_fraction", space.base.train_fraction),
            "dataset": space.base.dataset, "data_dir": space.base.data_dir, "image_size": space.base.image_size}
    if isinstance(spec["arch"], str):
        spec["arch"] = [spec["arch"]]
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    out = workdir / "teachers" / f"{space.base.dataset}-{key}"
    if (out / "manifest.json").is_file():
        log(f"teachers: using {out}")
        return str(out.resolve())
    from .teachers import train_teachers

    tcfg = space.base.replace(epochs=spec["epochs"], train_fraction=spec["train_fraction"])
    log(f"teachers: training {spec['count']} x {spec['arch']} for {spec['epochs']} epochs once for this sweep")
    train_teachers(tcfg, spec["arch"], spec["count"], out, log=log)
    return str(out.resolve())


def _prepare_study(storage, name: str, space: Space, resume: bool, log) -> int:
    """Count finished trials; on resume, mark trials left RUNNING by an interrupted sweep as
    FAIL and enqueue their parameters so each is run once more. Returns trials still to run."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        if resume:
            log(f"resume: no study {name!r} yet; starting it")
        return space.samples
    if not resume:
        raise KdrayError(
            f"a sweep named {name!r} exists already in the Optuna storage; pass --resume to continue it "
            "or --experiment NEW_NAME to start another"
        )
    finished = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            finished += 1
        elif t.state == optuna.trial.TrialState.RUNNING:
            storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            if t.params:  # killed before its parameters were stored: TPE samples a fresh one
                study.enqueue_trial(t.params, skip_if_exists=False)
    left = max(space.samples - finished, 0)
    log(f"resume: {finished} trial(s) finished before, {left} to run")
    return left


def run_sweep(
    space_file: str,
    *,
    workdir: Path,
    samples: Optional[int] = None,
    concurrency: int = 1,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    experiment: Optional[str] = None,
    address: Optional[str] = None,
    resume: bool = False,
    optuna_storage: Optional[str] = None,
    max_failures: int = 0,
    tracking: Optional[dict] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """``tracking``: ``{"uri": ...}`` (an MLflow store checked by the caller) or None for no MLflow."""
    space = load_space(space_file)  # validated before anything starts
    if samples is not None:
        if samples < 1:
            raise KdrayError(f"--samples {samples} is out of range; allowed: >= 1")
        space.samples = samples
    if concurrency < 1 or workers < 1 or gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise KdrayError("--concurrency and --workers must be >= 1, --gpus-per-worker >= 0, --cpus-per-worker > 0")
    name = experiment or space.name
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    import optuna
    from optuna.samplers import TPESampler

    from .scale import DRIVER_RESOURCES, check_resources, init_ray

    storage = optuna.storages.RDBStorage(optuna_storage or f"sqlite:///{workdir / 'optuna.db'}")
    left = _prepare_study(storage, name, space, resume, log)
    if left == 0:  # before Ray, teachers or an MLflow run: nothing is left to run
        log(f"sweep {name!r}: every trial is done already")
        return summarize(name, storage, space, [])

    init_ray(address, env=trial_env(local=not (address or os.environ.get("RAY_ADDRESS"))))
    check_resources(workers, gpus_per_worker, cpus_per_worker)
    concurrency = fit_concurrency(concurrency, workers, gpus_per_worker, cpus_per_worker, log)
    teachers = teachers_for(space, workdir, log)
    if teachers:
        space.base = space.base.replace(teachers=teachers)
    track = _start_tracking(tracking, space, name, storage, workdir, teachers, log) if tracking else None
    trial_track = {k: track[k] for k in ("uri", "experiment_id", "parent_run_id")} if track else None

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    metric_names = [m for m, _ in space.metrics]
    modes = [m for _, m in space.metrics]
    searcher = make_searcher_class()(
        space=space.define_by_run(), metric=metric_names if space.multi_objective else metric_names[0],
        mode=modes if space.multi_objective else modes[0], sampler=TPESampler(seed=space.seed),
        study_name=name, storage=storage,
    )
    total_epochs = space.base.epochs  # the fidelity axis (per generation for sfeed)
    if space.multi_objective:
        scheduler = FIFOScheduler()
    else:
        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=max(total_epochs, 1),
            grace_period=int(space.scheduler.get("grace_period", 1)),
            reduction_factor=float(space.scheduler.get("reduction_factor", 2)),
        )
    storage_path = str(workdir / "ray_results")
    base_cfg = space.base

    def trial(config: dict) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from .scale import make_trainer

        cfg = space.trial_config(config)
        trial_name = ray.tune.get_context().get_trial_name()
        run = None
        if trial_track:  # the child run is created here, on the trial's node (over HTTP on a cluster)
            from . import tracking as tr

            run = {"uri": trial_track["uri"], "run_id": tr.start_run(
                trial_track["uri"], trial_track["experiment_id"], run_name=trial_name, cfg=cfg, kind="trial",
                parent_run_id=trial_track["parent_run_id"],
                extra_tags={tr.TRIAL_TAG: ray.tune.get_context().get_trial_id(),
                            "kdray.sampled": json.dumps(config, sort_keys=True, default=str)})}
        trainer = make_trainer(cfg, workers=workers, gpus_per_worker=gpus_per_worker,
                               cpus_per_worker=cpus_per_worker, storage_path=storage_path,
                               name=f"{name}-{trial_name}", max_failures=max_failures,
                               callbacks=[TuneReportCallback()], tracking=run, quiet=True)
        trainer.fit()

    progress = make_progress_callback(log, metric_names[0])
    tuner = tune.Tuner(
        tune.with_resources(trial, DRIVER_RESOURCES),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=left,
            max_concurrent_trials=concurrency,
            **({} if space.multi_objective else {"metric": metric_names[0], "mode": modes[0]}),
        ),
        # progress: our one line per event on stderr (Tune's own tables would go to stdout)
        run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0, callbacks=(
            [progress] + ([track["callback"]] if track else []))),
    )
    log(f"sweep {name!r}: {left} trial(s), {concurrency} at a time, {workers} worker(s) each; "
        f"study in {storage.url if hasattr(storage, 'url') else 'optuna storage'}")
    t_fit = time.time()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the result (--json)
            grid = tuner.fit()
    except BaseException as exc:
        if track:
            _finish_tracking(track, space, name, storage, "failed", log, reason=f"{type(exc).__name__}: {exc}")
        raise
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial": m.get("trial_id"), "config": r.config, "metrics": {k: v for k, v in m.items()
                     if isinstance(v, (int, float, str)) and not k.startswith("config/")},
                     "error": failure_reason(r.error) if r.error else None,
                     "timing": _row_timing(progress, m.get("trial_id"))})
    del base_cfg
    out = summarize(name, storage, space, rows)
    out["timing"] = sweep_timing(rows, time.time() - t_fit, concurrency)
    if track:
        out["mlflow"] = _finish_tracking(track, space, name, storage, "completed", log, summary=out)
    return out


def _start_tracking(tracking: dict, space: Space, name: str, storage, workdir: Path, teachers, log) -> dict:
    """The sweep's parent run, and the driver-side callback that records pruned / failed trials."""
    import ray

    from . import tracking as tr

    uri = tracking["uri"]
    ips = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if tr.is_local_store(uri) and len(ips) > 1:
        raise KdrayError(
            f"the MLflow store {uri} is a local file, but the Ray cluster spans {len(ips)} hosts ({', '.join(sorted(ips))}); "
            "trials on other hosts cannot write it: pass --tracking-uri http://HEAD:5000 (an `mlflow server`)"
        )
    exp_id = tr.experiment_id(uri, name, workdir)
    storage_url = getattr(storage, "url", str(storage))
    parent = tr.start_sweep_run(uri, exp_id, name=name, space=space, study_name=name, storage_url=storage_url,
                                teachers=teachers)
    log(f"tracking: MLflow experiment {name!r} (id {exp_id}), sweep run {parent} at {uri}")
    return {"uri": uri, "experiment_id": exp_id, "parent_run_id": parent,
            "callback": tr.make_trial_callback(uri, exp_id, parent)}


def _finish_tracking(track: dict, space: Space, name: str, storage, state: str, log, reason=None, summary=None) -> dict:
    import optuna

    from . import tracking as tr

    uri, parent = track["uri"], track["parent_run_id"]
    plots: list = []
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        plots = tr.log_sweep_plots(uri, parent, study, space, log=log)
        counts = {f"trials_{k.lower()}": v for k, v in (summary or {}).get("study_counts", {}).items()}
        best = (summary or {}).get("best")
        if best:
            metric = space.metrics[0][0]
            counts[f"best_{metric}"] = best["metrics"].get(metric)
            run = tr.find_trial_run(uri, track["experiment_id"], parent, str(best["metrics"].get("trial_id")))
            if run is not None:
                best["mlflow_run_id"] = run.info.run_id
        tr._log_batch(tr.client(uri), parent, metrics=counts)
    finally:
        tr.finish_run(uri, parent, state, reason)
    return {"tracking_uri": uri, "experiment_id": track["experiment_id"], "parent_run_id": parent, "plots": plots}


def summarize(name: str, storage, space: Space, rows: list) -> dict:
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    counts = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    out = {"experiment": name, "space": space.path, "trials": rows, "study_counts": counts,
           "metrics": space.metrics}
    done = [r for r in rows if not r["error"] and r["metrics"]]
    if space.multi_objective:
        out["pareto_front"] = [{"number": t.number, "values": t.values, "params": t.params}
                               for t in study.best_trials]
    else:
        metric, mode = space.metrics[0]
        full = [r for r in done if r["metrics"].get("epoch", 0) >= r["metrics"].get("total_epochs", 1)]
        pool = full or done
        earlier = _earlier_best(study, rows, metric)  # a --resume: the best may be from a past session
        if earlier is not None and full:
            pool = full + [earlier]
        elif earlier is not None:
            pool = [earlier]
        if pool:
            best = (max if mode == "max" else min)(pool, key=lambda r: r["metrics"].get(metric, float("-inf") if mode == "max" else float("inf")))
            ckpt = best["metrics"].get("checkpoint_path")
            if ckpt:
                best["student_path"] = str(Path(ckpt) / "student.pt")
            out["best"] = best
    return out


def _earlier_best(study, rows: list, metric: str) -> Optional[dict]:
    """The study's best COMPLETE trial when it ran in an earlier session (not among ``rows``), as a row."""
    try:
        t = study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None
    rid = t.user_attrs.get("ray_trial_id")
    if rid is None or any(r["trial"] == rid for r in rows):
        return None
    metrics = {metric: t.value, "trial_id": rid, **{k: t.user_attrs[k] for k in
               ("checkpoint_path", "node_ip", "epoch", "total_epochs") if k in t.user_attrs}}
    return {"trial": rid, "config": dict(t.params), "metrics": metrics, "error": None, "earlier_session": True}


def _row_timing(progress, trial_id) -> dict:
    """A trial's start-up and training seconds, and when it started and ended (seconds into the sweep)."""
    rec = progress.timing.get(trial_id or "", {})
    out = {k: round(rec[k], 2) for k in ("startup_s", "train_s") if k in rec}
    for key, name in (("start", "started_at_s"), ("end", "ended_at_s")):
        if key in rec:
            out[name] = round(rec[key] - progress.t0, 1)
    return out


def sweep_timing(rows: list, wall_s: float, concurrency: int) -> dict:
    """Where a sweep's time went: mean per-trial start-up (trial start to first report, less that
    epoch's training) and the fixed cost per trial = (wall x concurrency - training) / trials."""
    starts = [r["timing"]["startup_s"] for r in rows if "startup_s" in r.get("timing", {})]
    train = sum(r.get("timing", {}).get("train_s", 0.0) for r in rows)
    n = max(len(rows), 1)
    return {"wall_s": round(wall_s, 1), "trials": len(rows), "train_s": round(train, 1),
            "startup_s_mean": round(sum(starts) / len(starts), 1) if starts else None,
            "overhead_s_per_trial": round((wall_s * concurrency - train) / n, 1)}
