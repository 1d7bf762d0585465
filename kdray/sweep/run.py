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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from kdray.core.errors import KdrayError
from kdray.core.guards import Interrupted, rearm_stop_signals, tune_stops_gracefully
from kdray.core.values import mask_credentials
from kdray.sweep.space import Space, load_space

#: Optuna's samplers seed numpy's RandomState, which takes 0 .. 2**32 - 1
SEED_LIMIT = 2**32


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep runs (the CLI's flags), checked before anything starts."""

    samples: Optional[int] = None
    concurrency: int = 1
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    experiment: Optional[str] = None
    address: Optional[str] = None
    resume: bool = False
    optuna_storage: Optional[str] = None
    max_failures: int = 0
    teacher_store: bool = True  # teachers' outputs computed once and shared (--no-teacher-store: live)
    teacher_store_dir: Optional[str] = None  # default: the teacher set's stores/
    teacher_store_budget: float = 4.0  # GB of memory (and disk) a store may take
    seed: Optional[int] = None  # the sampler's seed (default: the space's `seed`, else a random one)

    def check(self) -> None:
        if self.samples is not None and self.samples < 1:
            raise KdrayError(f"--samples {self.samples} is out of range; allowed: >= 1")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise KdrayError(f"--seed {self.seed} is out of range; allowed: 0 .. {SEED_LIMIT - 1}")
        if self.concurrency < 1 or self.workers < 1 or self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise KdrayError("--concurrency and --workers must be >= 1, --gpus-per-worker >= 0, --cpus-per-worker > 0")
        if not self.teacher_store_budget > 0:
            raise KdrayError(f"--teacher-store-budget {self.teacher_store_budget:g} is out of range; allowed: > 0 (GB)")

    @property
    def in_trial(self) -> bool:
        """A 1-worker trial trains in the trial's own process: no Train worker group to start."""
        return self.workers == 1

    @property
    def trial_resources(self) -> dict:
        if self.in_trial:
            from kdray.distributed.raytrain import worker_resources

            return worker_resources(self.cpus_per_worker, self.gpus_per_worker)
        from kdray.distributed.raytrain import DRIVER_RESOURCES

        return DRIVER_RESOURCES

    @property
    def local(self) -> bool:
        return not (self.address or os.environ.get("RAY_ADDRESS"))


def fit_concurrency(concurrency: int, workers: int, gpus_per_worker: float, cpus_per_worker: float,
                    log: Callable[[str], None], in_trial: bool = False) -> int:
    """How many trials the cluster can host at once, at most ``concurrency``.

    Tune only sees each trial's driver (DRIVER_RESOURCES: no CPU); the TorchTrainer a trial starts
    asks for its W workers later, in a placement group of its own that Tune does not count. A
    concurrency the nodes cannot host makes the surplus trials' workers wait for CPUs that are not
    there (WorkerGroupStartupTimeoutError after 60 s, retried for ever by Train's controller), so
    clamp it here, packing drivers and worker bundles onto the alive nodes the way Ray would. Counts
    the cluster as it is now: an autoscaling cluster gets the concurrency its current nodes allow."""
    import ray

    from kdray.distributed.raytrain import DRIVER_RESOURCES

    free = [{"CPU": float(n["Resources"].get("CPU", 0)), "GPU": float(n["Resources"].get("GPU", 0))}
            for n in ray.nodes() if n.get("Alive")]
    bundle = {"CPU": cpus_per_worker, "GPU": gpus_per_worker}
    driver = {"CPU": 0.0 if in_trial else float(DRIVER_RESOURCES.get("cpu", 0)), "GPU": 0.0}
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
    from kdray.tracking.store import BOUNDED_HTTP_ENV

    env = {**TRIAL_ENV_DEFAULTS, **BOUNDED_HTTP_ENV}
    if local:  # one actor process fewer per trial: nothing pre-empts a node of a local Ray
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return {k: os.environ.get(k, v) for k, v in env.items()}


def teachers_for(space: Space, workdir: Path, log: Callable[[str], None],
                 tracking: Optional[dict] = None) -> Optional[str]:
    """Train the space's teachers once (or find them, by their whole recipe); their directory.
    Teachers trained here are tracked as runs of the kdray-teachers experiment."""
    from kdray.distill import get_method

    if space.base.teachers or all(get_method(m).min_teachers == 0 for m in space.methods()):
        return space.base.teachers
    from kdray.train.teacher_set import ensure_teachers

    spec = space.teachers
    archs = spec.get("arch", ["resnet20"])
    archs = [archs] if isinstance(archs, str) else list(archs)
    tcfg = space.base.replace(epochs=spec.get("epochs", 20),
                              train_fraction=spec.get("train_fraction", space.base.train_fraction))
    teacher_tracking = {"uri": tracking["uri"], "workdir": str(workdir)} if tracking else None
    return ensure_teachers(tcfg, archs, int(spec.get("count", 3)), workdir / "teachers", log, teacher_tracking)


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


@dataclass(frozen=True)
class SweepSeed:
    """The seed of a sweep's TPE sampler. ``value``: the sweep's, recorded on its Optuna study and
    its MLflow sweep run; ``source``: ``--seed``, ``space``, ``random`` or ``study`` (a resumed
    sweep keeps its study's); ``sampler``: what this session's sampler starts from."""

    value: int
    source: str
    sampler: int


def sweep_seed(options: SweepOptions, space: Space, storage, name: str, log: Callable[[str], None]) -> SweepSeed:
    """--seed, else the space's ``seed``, else a random one: two sweeps of one space explore
    differently unless told otherwise. A resumed sweep keeps the seed its study recorded."""
    import secrets

    from kdray.sweep.search import recorded_seed, trial_count

    kept = recorded_seed(storage, name) if options.resume else None
    if kept is not None:
        if options.seed is not None and options.seed != kept:
            log(f"--seed {options.seed} ignored: the resumed sweep {name!r} keeps its seed {kept}")
        value, source = kept, "study"
    elif options.seed is not None:
        value, source = options.seed, "--seed"
    elif space.seed is not None:
        value, source = space.seed, "space"
    else:
        value, source = secrets.randbelow(SEED_LIMIT), "random"
    seed = SweepSeed(value, source, session_seed(value, trial_count(storage, name)))
    log(f"sampler seed {value} ({source}); `--seed {value}` repeats this sweep's proposals")
    return seed


def session_seed(seed: int, trials_before: int) -> int:
    """The seed of one session's sampler: the sweep's on its first session; on a resumed one, one
    derived from (seed, trials already in the study). Optuna's samplers draw from an RNG seeded
    once per sampler object (``LazyRandomState`` in optuna/samplers/_random.py and
    _tpe/sampler.py): the same seed in a new process would propose the first session's random
    start-up trials again."""
    if trials_before == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, trials_before]).generate_state(1)[0])


def make_searcher(space: Space, name: str, storage, seed: SweepSeed, link_run=None):
    """TPE seeded by ``seed``; ``link_run``: see :func:`make_run_linker`."""
    from optuna.samplers import TPESampler

    from kdray.sweep.search import SEED_ATTR, SEED_SOURCE_ATTR, make_searcher_class

    names, modes = [m for m, _ in space.metrics], [d for _, d in space.metrics]
    multi = space.multi_objective
    first_session = seed.source != "study"  # a resumed study keeps what its first session recorded
    return make_searcher_class()(
        space=space.define_by_run(), metric=names if multi else names[0], mode=modes if multi else modes[0],
        sampler=TPESampler(seed=seed.sampler), study_name=name, storage=storage, link_run=link_run,
        study_attrs={SEED_ATTR: seed.value, SEED_SOURCE_ATTR: seed.source} if first_session else None,
    )


#: tags on a trial's MLflow run naming its Optuna trial (the trial holds the run id: ``mlflow_run_id``)
OPTUNA_TRIAL_TAG, OPTUNA_STUDY_TAG = "optuna.trial_number", "optuna.study_name"


def make_run_linker(track: Optional[dict], study_name: str, log: Callable[[str], None]):
    """For the searcher (on the driver): the MLflow run of a Tune trial, found by its
    ``kdray.trial_id`` tag and tagged with the Optuna trial's number and study; None while the trial
    has no run yet. A store that fails costs one line per trial, not the sweep."""
    if not track:
        return None
    from kdray.tracking import runs as tr

    warned: set = set()

    def link(trial_id: str, number: int) -> Optional[str]:
        try:
            run = tr.find_trial_run(track["uri"], track["experiment_id"], track["parent_run_id"], trial_id)
            if run is None:
                return None
            tr.log_batch(tr.client(track["uri"]), run.info.run_id,
                         tags={OPTUNA_TRIAL_TAG: number, OPTUNA_STUDY_TAG: study_name})
            tr.name_trial_run(track["uri"], run.info.run_id, number)
            return run.info.run_id
        except Exception as exc:  # noqa: BLE001 - the store is down or refuses
            if trial_id not in warned:
                from kdray.core.outcome import failure_reason

                warned.add(trial_id)
                log(f"tracking: trial {trial_id} not linked to Optuna trial {number} ({failure_reason(exc)})")
            return None

    return link


def record_sweep_seed(track: dict, seed: SweepSeed) -> None:
    """The sampler's seed on the sweep's MLflow run (the study holds it as user attribute ``seed``)."""
    from kdray.tracking import runs as tr

    tr.log_batch(tr.client(track["uri"]), track["parent_run_id"],
                 params={"optuna_seed": seed.value, "optuna_seed_source": seed.source,
                         "optuna_sampler_seed": seed.sampler})


def make_trial(space: Space, name: str, opts: SweepOptions, storage_path: str, trial_track: Optional[dict],
               store_ref=None):
    """The Tune function of one trial: its config validated once, a child MLflow run, then the
    engine: in this process for a 1-worker trial, else a TorchTrainer of W workers. ``store_ref``:
    the sweep's teacher store in Ray's object store (or None: teachers run live)."""
    from kdray.distributed.raytrain import method_payload

    methods = method_payload()

    def trial(config: dict) -> None:
        import ray

        from kdray.distributed.raytrain import register_payload

        register_payload(methods)  # methods and architectures defined outside kdray travel by value
        cfg = space.trial_config(config)
        context = ray.tune.get_context()
        run = _start_trial_run(trial_track, cfg, context)
        if opts.in_trial:
            from kdray.distributed.raytrain import fit_in_tune_trial

            fit_in_tune_trial(cfg, tracking=run, store_ref=store_ref,
                              checkpoint_root=str(Path(storage_path) / name / "kdray-checkpoints" / context.get_trial_id()))
            return
        from ray.tune.integration.ray_train import TuneReportCallback

        from kdray.distributed.raytrain import make_trainer

        trainer = make_trainer(cfg, workers=opts.workers, gpus_per_worker=opts.gpus_per_worker,
                               cpus_per_worker=opts.cpus_per_worker, storage_path=storage_path,
                               name=f"{name}-{context.get_trial_name()}", max_failures=opts.max_failures,
                               callbacks=[TuneReportCallback()], tracking=run, quiet=True, methods=methods,
                               store_ref=store_ref)
        trainer.fit()

    return trial


def sweep_seeds(space: Space) -> tuple:
    """The seeds a sweep's trials may train with (their views go in the teacher store): the base
    seed, or a searched seed's choices / small integer range."""
    spec = space.params.get("seed")
    if isinstance(spec, dict) and spec["type"] == "categorical":
        return tuple(int(c) for c in spec["choices"])
    if isinstance(spec, dict) and spec["type"] == "int":
        span = range(int(spec["low"]), int(spec["high"]) + 1)
        return tuple(span) if len(span) <= 16 else ()  # too many to store: () says so
    return (int(spec) if isinstance(spec, int) else space.base.seed,)


#: keys whose searched values change the teachers' outputs or the train split: one store cannot serve them
STORE_CHANGING_KEYS = ("dataset", "data_dir", "train_fraction", "val_fraction", "data_seed", "image_size",
                       "crop_padding", "hflip", "amp", "channels_last", "device", "teachers")


def sweep_store_needs(space: Space):
    """What a sweep of ``space`` needs from a teacher store: (a config of its teachers, data and
    precision, the seeds, the loader epochs, whether feature maps); None without teachers."""
    from kdray.distill import get_method
    from kdray.teachers.source import teacher_view_epochs
    from kdray.train.config import from_dict

    high = {**space.base.to_dict(), **space.corner("high")}
    cfgs = [from_dict({**high, "method": m}, space.path) for m in space.methods() if get_method(m).min_teachers > 0]
    if not cfgs or not space.base.teachers:
        return None
    epochs = sorted({e for c in cfgs for e in teacher_view_epochs(c)})
    feats = any(get_method(c.method).needs_teacher_feats(c) for c in cfgs)
    return cfgs[0], sweep_seeds(space), epochs, feats


def sweep_teacher_store(space: Space, opts: SweepOptions, log):
    """The sweep's teacher store, built before any trial (its missing views by Ray tasks over the
    cluster) and put in Ray's object store: (ObjectRef or None, one line for the sweep's run)."""
    needs = sweep_store_needs(space)
    if needs is None:
        return None, None
    if not opts.teacher_store:
        return None, "off (--no-teacher-store): teachers run live in every trial"
    cfg, seeds, epochs, feats = needs
    varied = [k for k in STORE_CHANGING_KEYS if isinstance(space.params.get(k), dict)]
    why = (f"the space searches {', '.join(varied)}" if varied else
           "the space searches seed over more than 16 values" if not seeds else None)
    if why:
        log(f"teacher store: off ({why}); the teachers run live in every trial")
        return None, f"off ({why})"
    from kdray.teachers.building_ray import ray_builder, share
    from kdray.teachers.source import open_teacher_store

    store = open_teacher_store(cfg, seeds=seeds, epochs=epochs, feats=feats, root=opts.teacher_store_dir,
                               budget_gb=opts.teacher_store_budget,
                               builder=ray_builder(opts.cpus_per_worker, opts.gpus_per_worker),
                               device="cuda" if opts.gpus_per_worker > 0 else "cpu", log=log)
    return share(store), store.describe()


def ray_trial_retried() -> bool:
    """Whether this trial was started before (Tune hands it a checkpoint to resume from)."""
    import ray.tune

    return ray.tune.get_checkpoint() is not None


def _start_trial_run(trial_track: Optional[dict], cfg, context) -> Optional[dict]:
    """The trial's child run, created on the trial's node (over HTTP on a cluster)."""
    if not trial_track:
        return None
    from kdray.tracking import runs as tr

    uri = trial_track["uri"]
    retried = ray_trial_retried()
    if retried:  # Tune started this trial again from its checkpoint: it goes on in the same run
        earlier = tr.find_trial_run(uri, trial_track["experiment_id"], trial_track["parent_run_id"], context.get_trial_id())
        if earlier is not None:
            return {"uri": uri, "run_id": earlier.info.run_id}
    from kdray.train.config import tracked_config

    run_id = tr.start_run(uri, trial_track["experiment_id"], run_name=tr.trial_run_name(cfg.method, context.get_trial_id()),
                          cfg=cfg, kind="trial", params=tracked_config(cfg), parent_run_id=trial_track["parent_run_id"],
                          teacher_archs=trial_track.get("teacher_archs"), workdir=trial_track.get("workdir"),
                          extra_tags={tr.TRIAL_TAG: context.get_trial_id(),
                                      **({tr.STORE_TAG: trial_track["teacher_store"]} if trial_track.get("teacher_store") else {})})
    return {"uri": uri, "run_id": run_id}


def _start_tracking(tracking: dict, space: Space, name: str, storage, workdir: Path, teachers, log,
                    resume: bool = False) -> dict:
    """The sweep's parent run, and the driver-side callback that records each trial's state."""
    import ray

    from kdray.sweep.report import make_tracking_callback
    from kdray.tracking import runs as tr
    from kdray.train.run import teacher_archs

    uri = tracking["uri"]
    ips = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if tr.is_local_store(uri) and len(ips) > 1:
        raise KdrayError(
            f"the MLflow store {uri} is a local file, but the Ray cluster spans {len(ips)} hosts ({', '.join(sorted(ips))}); "
            "trials on other hosts cannot write it: pass --tracking-uri http://HEAD:5000 (an `mlflow server`)"
        )
    from kdray.core.guards import stores_initialising

    with stores_initialising(workdir):
        exp_id = tr.experiment_id(uri, name, workdir)
    if resume:  # runs an earlier driver left open (killed, interrupted, cut off from the server)
        closed = tr.close_running_runs(uri, exp_id, "interrupted", "left running by an earlier driver of this sweep")
        if closed:
            log(f"resume: {closed} MLflow run(s) an earlier driver left running closed as interrupted")
    archs = teacher_archs(teachers)
    parent = tr.start_sweep_run(uri, exp_id, name=name, space=space, study_name=name,
                                storage_url=mask_credentials(getattr(storage, "url", str(storage))), teachers=teachers,
                                teacher_archs=archs, workdir=workdir)
    metric, mode = space.metrics[0]
    tr.save_trials_view(uri, exp_id, metric=metric, mode=mode, searched=tr.searched_params(space))
    log(f"tracking: MLflow experiment {name!r} (id {exp_id}), sweep run {parent} at {mask_credentials(uri)}")
    return {"uri": uri, "experiment_id": exp_id, "parent_run_id": parent, "teacher_archs": archs,
            "workdir": str(workdir), "callback": make_tracking_callback(uri, exp_id, parent, log)}


def _finish_tracking(track: dict, space: Space, name: str, storage, state: str, log, reason=None, summary=None) -> dict:
    import optuna

    from kdray.tracking import runs as tr

    uri, parent = track["uri"], track["parent_run_id"]
    plots: list = []
    try:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            plots = tr.log_sweep_plots(uri, parent, study, space, log=log)
            _summarize_parent(track, space, summary or {})
            log(f"tracking: {tr.ui_hint(uri, track['experiment_id'])}")
        finally:
            tr.finish_run(uri, parent, state, reason)
    except KdrayError:
        raise
    except Exception as exc:  # the server went away during the sweep: one line, --resume closes the run
        if not uri.startswith(("http://", "https://")):
            raise
        raise tr.lost(uri, exc) from None
    return {"tracking_uri": mask_credentials(uri), "experiment_id": track["experiment_id"], "parent_run_id": parent, "plots": plots}


def _summarize_parent(track: dict, space: Space, summary: dict) -> None:
    """The parent run carries the best trial's metrics, params and a link to it (and the summary
    its MLflow run id); counts by state go into its description."""
    from kdray.tracking import runs as tr

    best = summary.get("best")
    if best and not best.get("mlflow_run_id"):
        run = tr.find_trial_run(track["uri"], track["experiment_id"], track["parent_run_id"],
                                str(best["metrics"].get("trial_id")))
        if run is not None:
            best["mlflow_run_id"] = run.info.run_id
    tr.summarize_sweep(track["uri"], track["parent_run_id"], best_run_id=(best or {}).get("mlflow_run_id"),
                       metric=space.metrics[0][0], counts=tr.trial_counts(summary.get("study_counts", {})))


def open_storage(opts: SweepOptions, workdir: Path):
    import optuna

    return optuna.storages.RDBStorage(opts.optuna_storage or f"sqlite:///{workdir / 'optuna.db'}")


def start_ray(opts: SweepOptions, log) -> int:
    """Ray up (local or the given cluster), checked to host one trial; the concurrency it can host."""
    from kdray.distributed.raytrain import check_resources, init_ray

    init_ray(opts.address, env=trial_env(local=opts.local), worker_logs=False)  # trials report through kdray's lines
    rearm_stop_signals()  # after Ray's own SIGTERM handler
    check_resources(opts.workers, opts.gpus_per_worker, opts.cpus_per_worker)
    return fit_concurrency(opts.concurrency, opts.workers, opts.gpus_per_worker, opts.cpus_per_worker, log,
                           in_trial=opts.in_trial)


def make_tuner(space: Space, name: str, opts: SweepOptions, storage, left: int, concurrency: int,
               storage_path: str, track: Optional[dict], progress, store_ref=None, *, seed: SweepSeed,
               link_run=None):
    from ray import tune

    # Tune snapshots its experiment state whenever a trial has checkpointed num_to_keep times since
    # the last snapshot, and warns (three lines) each time that happens more than once in 5 s:
    # with a checkpoint every epoch of short epochs that is every few seconds. The snapshot is
    # cheap on a local disk; the warning is noise (ray/tune/execution/experiment_state.py).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trial_track = ({k: track.get(k) for k in ("uri", "experiment_id", "parent_run_id", "teacher_archs", "teacher_store",
                                              "workdir")}
                   if track else None)
    metric, mode = space.metrics[0]
    return tune.Tuner(
        tune.with_resources(make_trial(space, name, opts, storage_path, trial_track, store_ref), opts.trial_resources),
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(space, name, storage, seed, link_run), scheduler=make_scheduler(space), num_samples=left,
            max_concurrent_trials=concurrency,
            reuse_actors=opts.in_trial,  # a finished trial's process runs the next: no process start, no imports
            **({} if space.multi_objective else {"metric": metric, "mode": mode}),
        ),
        # progress: our one line per event on stderr (Tune's own tables would go to stdout)
        run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0,
                                  callbacks=[progress] + ([track["callback"]] if track else []),
                                  # a 1-worker trial is retried by Tune from its last checkpoint; a
                                  # TorchTrainer retries its own workers (its FailureConfig)
                                  failure_config=tune.FailureConfig(max_failures=opts.max_failures if opts.in_trial else 0),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )


def run_sweep(space_file: str, *, workdir: Path, options: SweepOptions = SweepOptions(),
              tracking: Optional[dict] = None, log: Callable[[str], None] = print,
              handles: Optional[dict] = None) -> dict:
    """``tracking``: ``{"uri": ...}`` (an MLflow store checked by the caller) or None for no MLflow.
    ``handles``, when given, receives the live objects behind the summary: ``storage`` (Optuna's)
    and ``result_grid`` (Tune's). Raises :class:`~kdray.guards.Interrupted` after recording a
    SIGINT / SIGTERM."""
    handles = {} if handles is None else handles
    from kdray.core.console import library_output_to
    from kdray.core.guards import (
        one_sweep_at_a_time,
        stop_signals_interrupt,
        stores_initialising,
    )
    from kdray.sweep.report import summarize
    from kdray.sweep.search import prepare_study

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
            storage = handles["storage"] = open_storage(options, workdir)
            left = prepare_study(storage, name, space.samples, options.resume, log)
            seed = sweep_seed(options, space, storage, name, log) if left else None
        if left == 0:  # before Ray, teachers or an MLflow run: nothing is left to run
            log(f"sweep {name!r}: every trial is done already")
            return summarize(name, storage, space, [])
        sweep = {"space": space, "space_file": space_file, "name": name, "options": options,
                 "storage": storage, "workdir": workdir, "log": log, "track": None, "handles": handles, "seed": seed}
        try:
            return _run_trials(sweep, left, tracking)
        except Interrupted as exc:
            raise _record_interruption(sweep, exc) from None


def _run_trials(sweep: dict, left: int, tracking: Optional[dict]) -> dict:
    from kdray.sweep.report import (
        make_progress_callback,
        quiet_trial_tracebacks,
        result_rows,
        summarize,
        sweep_timing,
    )

    quiet_trial_tracebacks()
    space, name, options, storage, workdir, log = (sweep[k] for k in
                                                    ("space", "name", "options", "storage", "workdir", "log"))
    concurrency = start_ray(options, log)
    teachers = teachers_for(space, workdir, log, tracking)
    if teachers:
        space.base = space.base.replace(teachers=teachers)
    store_ref, sweep["teacher_store"] = sweep_teacher_store(space, options, log)
    if tracking:
        sweep["track"] = _start_tracking(tracking, space, name, storage, workdir, teachers, log, options.resume)
        if sweep["teacher_store"]:
            from kdray.tracking.store import client
            from kdray.tracking.tags import STORE_TAG

            client(sweep["track"]["uri"]).set_tag(sweep["track"]["parent_run_id"], STORE_TAG, sweep["teacher_store"])
            sweep["track"]["teacher_store"] = sweep["teacher_store"]
        record_sweep_seed(sweep["track"], sweep["seed"])
    track = sweep["track"]
    progress = make_progress_callback(log, space.metrics[0][0], space.metrics[0][1], total=left)
    tuner = make_tuner(space, name, options, storage, left, concurrency, str(workdir / "ray_results"), track, progress,
                       store_ref, seed=sweep["seed"], link_run=make_run_linker(track, name, log))
    log(f"sweep {name!r}: {left} trial(s), {concurrency} at a time, {options.workers} worker(s) each; "
        f"study in {mask_credentials(getattr(storage, 'url', 'optuna storage'))}")
    t_fit = time.time()
    try:
        with tune_stops_gracefully():  # Tune's prints go to the sweep's log file (library_output_to)
            grid = sweep["handles"]["result_grid"] = tuner.fit()
    except Exception as exc:
        if track:
            from kdray.core.outcome import failure_reason

            _finish_tracking(track, space, name, storage, "failed", log, reason=failure_reason(exc))
        raise
    rows = result_rows(grid, progress)
    _requeue_lost_tracking(rows, storage, name, log)
    out = summarize(name, storage, space, rows)
    out["timing"] = sweep_timing(rows, time.time() - t_fit, concurrency)
    if track:
        out["mlflow"] = _finish_tracking(track, space, name, storage, "completed", log, summary=out)
    return out


def _record_interruption(sweep: dict, exc: Interrupted) -> Interrupted:
    """Stop the trials (Ray down), then record them as interrupted in Optuna and MLflow."""
    import ray

    from kdray.sweep.search import close_interrupted_trials

    sweep["log"](f"{exc.signal_name}: stopping the sweep's trials")
    if ray.is_initialized():
        ray.shutdown()  # the trials' drivers and workers stop here (a cluster's stay for other jobs)
    name = sweep["name"]
    count = close_interrupted_trials(sweep["storage"], name)
    track = sweep["track"]
    if track:
        from kdray.tracking import runs as tr

        tr.close_running_runs(track["uri"], track["experiment_id"], "interrupted", f"interrupted by {exc.signal_name}")
    return Interrupted(exc.signum, (
        f"sweep {name!r} interrupted by {exc.signal_name}: {count} running trial(s) recorded as interrupted; "
        f"`kdray tune --space {sweep['space_file']} --experiment {name} --resume` runs them again"))


def _requeue_lost_tracking(rows: list, storage, name: str, log) -> None:
    """Trials that failed because the tracking server went away did not fail on their own: they
    are marked interrupted and queued again, so --resume runs them once the server is back."""
    from kdray.sweep.search import requeue_trials

    lost = [r["trial"] for r in rows if (r["error"] or "").startswith("TrackingLost")]
    if lost:
        requeue_trials(storage, name, lost)
        log(f"{len(lost)} trial(s) stopped because the tracking server was lost; --resume runs them again")
