"""Sweeps: Ray Tune + OptunaSearch (TPE, persistent study) + ASHA on the epoch axis.

Each trial is a Tune function. A 1-worker trial runs the engine in the trial's own process
(reporting and checkpointing through ``ray.tune``; Tune reuses the process for the next trial); a
trial of W > 1 workers builds and fits a TorchTrainer (the supported Train-inside-Tune pattern),
whose TuneReportCallback forwards every epoch's report to Tune. Teachers are trained once, and
their outputs computed once into the teacher store, before any trial, by the driver (the store's
rows by Ray tasks). ``run_sweep`` reads as the outline: check the options, open the study, start
Ray, teachers, their store, tracking, then the Tuner, then the summary.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from kdray.core.guards import Interrupted, rearm_stop_signals, tune_stops_gracefully
from kdray.tracking.state import TrackingSettings
from kdray.tune.options import SweepOptions, fit_concurrency
from kdray.tune.parent_run import finish_tracking, start_tracking, storage_url
from kdray.tune.seeds import SweepSeed, sweep_seed
from kdray.tune.space import Space, load_space
from kdray.tune.state import SweepOutcome, SweepState
from kdray.tune.teachers import sweep_teacher_store, teachers_for
from kdray.tune.trial import make_trial, trial_env


def make_scheduler(space: Space):
    """ASHA on the epoch axis, its max_t the longest a trial can train (every generation of a
    sequential method); FIFO for multi-objective sweeps (ASHA ranks by one metric)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.multi_objective:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration", max_t=max(space.max_total_epochs(), 1),
        grace_period=int(space.scheduler.get("grace_period", 1)),
        reduction_factor=float(space.scheduler.get("reduction_factor", 2)),
    )


def make_searcher(space: Space, name: str, storage, seed: SweepSeed, link_run=None, trial_numbers=None,
                  budget=None, warm=None):
    """TPE seeded by ``seed``; ``link_run``: see :func:`kdray.tracking.trials.make_run_linker`;
    ``trial_numbers``, ``budget``, ``warm``: see :class:`kdray.tune.search.PrunedAwareSearch`. A
    new study records its seed and the space's constants (what a later warm start compares)."""
    from optuna.samplers import TPESampler

    from kdray.tune.search import SEED_ATTR, SEED_SOURCE_ATTR, make_searcher_class
    from kdray.tune.warm_start import CONSTANTS_ATTR, space_constants

    names, modes = [m for m, _ in space.metrics], [d for _, d in space.metrics]
    multi = space.multi_objective
    first_session = seed.source != "study"  # a resumed study keeps what its first session recorded
    return make_searcher_class()(
        space=space.define_by_run(), metric=names if multi else names[0], mode=modes if multi else modes[0],
        sampler=TPESampler(seed=seed.sampler), study_name=name, storage=storage, link_run=link_run,
        trial_numbers=trial_numbers, budget=budget, warm_start=warm,
        study_attrs={SEED_ATTR: seed.value, SEED_SOURCE_ATTR: seed.source,
                     CONSTANTS_ATTR: space_constants(space)} if first_session else None,
    )


def open_storage(opts: SweepOptions, workdir: Path):
    import optuna

    return optuna.storages.RDBStorage(opts.optuna_storage or f"sqlite:///{workdir / 'optuna.db'}")


def start_ray(opts: SweepOptions, log) -> int:
    """Ray up (local or the given cluster), checked to host one trial; the concurrency it can host."""
    from kdray.distributed.local_ray import init_ray
    from kdray.distributed.raytrain import check_resources

    init_ray(opts.address, env=trial_env(local=opts.local), worker_logs=False)  # trials report through kdray's lines
    rearm_stop_signals()  # after Ray's own SIGTERM handler
    check_resources(opts.workers, opts.gpus_per_worker, opts.cpus_per_worker)
    return fit_concurrency(opts.concurrency, opts.workers, opts.gpus_per_worker, opts.cpus_per_worker, log,
                           in_trial=opts.in_trial)


def make_tuner(sweep: SweepState, progress, watch, budget=None):
    """The Tuner of the sweep's ``left`` trials, ``concurrency`` at a time; ``progress`` (and the
    trials' MLflow states when tracked) as its callbacks; ``watch`` (a
    :class:`~kdray.tune.halt.TrackingWatch`) sees every failed trial first, and its stopper ends
    the experiment once the tracking server is lost; ``budget`` (a
    :class:`~kdray.tune.budget.SweepBudget`, None: none) ends the proposals, and with ``stop`` the
    running trials, once it is spent."""
    from ray import tune

    from kdray.tune.budget import make_budget_callback
    from kdray.tune.halt import make_stopper, make_watch_callback
    from kdray.tune.report import make_tracking_callback

    # Tune snapshots its experiment state whenever a trial has checkpointed num_to_keep times since
    # the last snapshot, and warns (three lines) each time that happens more than once in 5 s:
    # with a checkpoint every epoch of short epochs that is every few seconds. The snapshot is
    # cheap on a local disk; the warning is noise (ray/tune/execution/experiment_state.py).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    space, name, opts, track = sweep.space, sweep.name, sweep.options, sweep.track
    metric, mode = space.metrics[0]
    trial = make_trial(space, name, opts, sweep.storage_path, track, sweep.store_ref)
    searcher = make_searcher(space, name, sweep.storage, sweep.seed, _run_linker(sweep, watch),
                             trial_numbers=progress.trial_numbers, budget=budget, warm=sweep.warm)
    callbacks = [make_watch_callback(watch), progress] + ([make_tracking_callback(track, sweep.log, watch)]
                                                          if track else [])
    if budget is not None:
        callbacks.append(make_budget_callback(budget, sweep.left, sweep.log))
    return tune.Tuner(
        tune.with_resources(trial, opts.trial_resources),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=make_scheduler(space), num_samples=sweep.left,
            max_concurrent_trials=sweep.concurrency,
            reuse_actors=opts.in_trial,  # a finished trial's process runs the next: no process start, no imports
            **({} if space.multi_objective else {"metric": metric, "mode": mode}),
        ),
        # progress: our one line per event on stderr (Tune's own tables would go to stdout)
        run_config=tune.RunConfig(name=name, storage_path=sweep.storage_path, verbose=0, callbacks=callbacks,
                                  stop=make_stopper(watch, budget),
                                  # a 1-worker trial is retried by Tune from its last checkpoint; a
                                  # TorchTrainer retries its own workers (its FailureConfig)
                                  failure_config=tune.FailureConfig(
                                      max_failures=opts.max_failures if opts.in_trial else 0),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )


def _run_linker(sweep: SweepState, watch):
    """The searcher's link from a Tune trial to its MLflow run; silent once the server is lost."""
    from kdray.tracking.trials import make_run_linker

    link = make_run_linker(sweep.track, sweep.name, sweep.log)
    if link is None:
        return None
    return lambda trial_id, number: None if watch.lost else link(trial_id, number)


def run_sweep(space_file: str, *, workdir: Path, options: SweepOptions = SweepOptions(),
              tracking: Optional[TrackingSettings] = None, log: Callable[[str], None] = print) -> SweepOutcome:
    """``tracking``: an MLflow store checked by the caller, or None for no MLflow. Returns the
    summary with the live objects behind it: Optuna's storage and Tune's result grid. Raises
    :class:`~kdray.core.guards.Interrupted` after recording a SIGINT / SIGTERM."""
    from kdray.core.console import library_output_to
    from kdray.core.guards import (
        one_sweep_at_a_time,
        stop_signals_interrupt,
        stores_initialising,
    )
    from kdray.tune.recover import recover_finished_trials
    from kdray.tune.report import summarize
    from kdray.tune.search import prepare_study
    from kdray.tune.warm_start import warm_start_for

    space = load_space(space_file)  # validated before anything starts
    options.check()
    if options.samples is not None:
        space.samples = options.samples
    name = options.experiment or space.name
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    chatter = workdir / "logs" / f"{name}.log"
    with one_sweep_at_a_time(workdir, name), stop_signals_interrupt(), library_output_to(chatter):
        log(f"sweep {name!r}: Ray's, Tune's and Optuna's own output goes to {chatter}")
        with stores_initialising(workdir):
            storage = open_storage(options, workdir)
            if options.resume:  # before the trials a killed driver left RUNNING are closed as interrupted
                recover_finished_trials(storage, name, tracking.uri if tracking else None, space.metrics, log)
            left = prepare_study(storage, name, space.samples, options.resume, log)
            seed = sweep_seed(options, space, storage, name, log) if left else None
            warm = warm_start_for(options, space, storage, name, log) if left else None
        if left == 0:  # before Ray, teachers or an MLflow run: nothing is left to run
            log(f"sweep {name!r}: every trial is done already")
            return SweepOutcome(summarize(name, storage, space, []), storage=storage)
        sweep = SweepState(space=space, space_file=space_file, name=name, options=options, storage=storage,
                           workdir=workdir, log=log, seed=seed, left=left, warm=warm)
        try:
            sweep = _set_up(sweep, tracking)
            return _run_trials(sweep)
        except Interrupted as exc:
            raise _record_interruption(sweep, exc, tracking.uri if tracking else None) from None


def _set_up(sweep: SweepState, tracking: Optional[TrackingSettings]) -> SweepState:
    """Ray (and the concurrency it hosts), the teachers, their store, then the sweep's MLflow run."""
    from kdray.tune.report import quiet_trial_tracebacks

    quiet_trial_tracebacks()
    space, options, log = sweep.space, sweep.options, sweep.log
    concurrency = start_ray(options, log)
    teachers = teachers_for(space, sweep.workdir, log, tracking)
    if teachers:
        space.base = space.base.replace(teachers=teachers)
    store_ref, store_line = sweep_teacher_store(space, options, log)
    sweep = replace(sweep, concurrency=concurrency, teachers=teachers, store_ref=store_ref, store_line=store_line)
    if tracking:
        sweep = replace(sweep, track=start_tracking(sweep, tracking))
    return sweep


def _run_trials(sweep: SweepState) -> SweepOutcome:
    from kdray.tune.budget import SweepBudget, end_of_budget, record_budget
    from kdray.tune.halt import TrackingWatch
    from kdray.tune.report import result_rows, summarize, sweep_timing

    space, name, storage, log = sweep.space, sweep.name, sweep.storage, sweep.log
    progress, watch, budget = _progress(sweep), TrackingWatch(), SweepBudget.of(sweep.options, space)
    progress.eta.budget = budget
    tuner = make_tuner(sweep, progress, watch, budget)
    log(f"sweep {name!r}: {sweep.left} trial(s), {sweep.concurrency} at a time, {sweep.options.workers} worker(s) "
        f"each; study in {storage_url(storage)}")
    t_fit = time.time()
    if budget is not None:
        budget.begin(sweep, t_fit)
    try:
        with tune_stops_gracefully():  # Tune's prints go to the sweep's log file (library_output_to)
            grid = tuner.fit()
    except Exception as exc:
        if sweep.track:
            from kdray.core.outcome import failure_reason

            finish_tracking(sweep, "failed", reason=failure_reason(exc))
        raise
    rows = result_rows(grid, progress)
    if watch.lost:
        raise lost_tracking(sweep, rows, watch)
    _requeue_lost_trials(rows, storage, name, log)
    at_budget, rows = end_of_budget(sweep, budget, rows, progress,
                                    resume_command(sweep, sweep.track.uri if sweep.track else None))
    out = summarize(name, storage, space, rows)
    out["timing"] = sweep_timing(rows, time.time() - t_fit, sweep.concurrency)
    if at_budget is not None:
        out["time_budget"] = at_budget
        if sweep.track:
            record_budget(sweep.track, budget, at_budget)
    if sweep.track:
        out["mlflow"] = finish_tracking(sweep, "completed", summary=out)
    return SweepOutcome(summary=out, result_grid=grid, storage=storage)


def _progress(sweep: SweepState):
    """The sweep's progress lines; on --resume, an earlier session's best is the best so far."""
    import optuna

    from kdray.tune.report import make_progress_callback, trial_name
    from kdray.tune.search import earlier_best

    (metric, mode), method = sweep.space.metrics[0], sweep.space.base.method
    progress = make_progress_callback(sweep.log, metric, mode, total=sweep.left, method=method)
    if sweep.options.resume and not sweep.space.multi_objective:
        try:
            study = optuna.load_study(study_name=sweep.name, storage=sweep.storage)
        except KeyError:  # --resume of a sweep that never started: its first trial makes the study
            study = None
        earlier = earlier_best(study, [], metric) if study is not None else None
        if earlier is not None:
            progress.earlier = dict(earlier, name=trial_name(earlier["config"].get("method") or method,
                                                             earlier.get("number")))
    return progress


def resume_command(sweep: SweepState, tracking_uri: Optional[str]) -> str:
    """The ``kdray tune`` command that continues ``sweep``: its working directory, space and name,
    the options it was given (those not at their default; not --seed: a resumed sweep keeps its
    study's), where it tracks (``tracking_uri``; None: --no-track), and --resume. Credentials in
    URLs are masked."""
    import shlex
    from dataclasses import fields

    from kdray.core.values import mask_credentials
    from kdray.tracking.store import default_uri

    parts = ["kdray", "--workdir", str(sweep.workdir), "tune", "--space", sweep.space_file,
             "--experiment", sweep.name]
    for f in fields(SweepOptions):
        value = getattr(sweep.options, f.name)
        # not --seed nor --warm-start*: a resumed sweep keeps its study's seed and history
        if f.name in ("experiment", "resume", "seed", "warm_start", "warm_start_top") or value == f.default:
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        parts += [flag] if isinstance(value, bool) else [flag, mask_credentials(str(value))]
    if tracking_uri is None:
        parts.append("--no-track")
    elif tracking_uri != default_uri(sweep.workdir):
        parts += ["--tracking-uri", mask_credentials(tracking_uri)]
    return " ".join(shlex.quote(p) for p in parts + ["--resume"])


def lost_tracking(sweep: SweepState, rows: list, watch):
    """After Tune stopped the sweep because its tracking server was lost (``watch``): the trials it
    ended and those it stopped recorded in Optuna as interrupted and queued again; the one line
    (a :class:`~kdray.tracking.store.TrackingLost`) naming the server and the --resume command.
    MLflow is not called: its runs left RUNNING are closed by that --resume."""
    from kdray.core.values import mask_credentials
    from kdray.tracking.store import TrackingLost, is_tracking_lost
    from kdray.tune.search import close_interrupted_trials, requeue_trials

    lost = [r["trial"] for r in rows if is_tracking_lost(r["error"])] or [watch.trial_id]
    again = requeue_trials(sweep.storage, sweep.name, lost) + close_interrupted_trials(sweep.storage, sweep.name)
    uri = sweep.track.uri
    return TrackingLost(
        f"sweep {sweep.name!r} stopped: the MLflow tracking server at {mask_credentials(uri)} stopped answering (trial "
        f"{watch.trial_id} failed on it) and no trial was started after; {again} trial(s) queued to run again. "
        f"Once the server is back, `{resume_command(sweep, uri)}` closes the runs left open and goes on")


def _record_interruption(sweep: SweepState, exc: Interrupted, tracking_uri: Optional[str]) -> Interrupted:
    """Stop the trials (Ray down), then record them as interrupted in Optuna and MLflow."""
    import ray

    from kdray.tune.search import close_interrupted_trials

    sweep.log(f"{exc.signal_name}: stopping the sweep's trials")
    if ray.is_initialized():
        ray.shutdown()  # the trials' drivers and workers stop here (a cluster's stay for other jobs)
    count = close_interrupted_trials(sweep.storage, sweep.name)
    if sweep.track:
        from kdray.tracking.sweeps import interrupt_sweep_runs

        interrupt_sweep_runs(sweep.track, exc.signal_name)
    return Interrupted(exc.signum, (
        f"sweep {sweep.name!r} interrupted by {exc.signal_name}: {count} running trial(s) recorded as interrupted; "
        f"`{resume_command(sweep, tracking_uri)}` runs them again"))


def _requeue_lost_trials(rows: list, storage, name: str, log) -> None:
    """Trials that failed because the tracking server went away did not fail on their own: they
    are marked interrupted and queued again, so --resume runs them once the server is back."""
    from kdray.tracking.store import is_tracking_lost
    from kdray.tune.search import requeue_trials

    lost = [r["trial"] for r in rows if is_tracking_lost(r["error"])]
    if lost:
        requeue_trials(storage, name, lost)
        log(f"{len(lost)} trial(s) stopped because the tracking server was lost; --resume runs them again")
