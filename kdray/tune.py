"""Sweeps: Ray Tune + OptunaSearch (TPE, persistent study) + ASHA on the epoch axis.

Each trial is a Tune function that builds and fits a TorchTrainer with W workers (the supported
Train-inside-Tune pattern); a TuneReportCallback forwards every epoch's report to Tune. Teachers
are trained once, before any trial, by the driver.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

from .errors import KdrayError
from .space import Space, load_space


def make_searcher_class():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class PrunedAwareOptunaSearch(OptunaSearch):
        """Records a trial that ASHA stopped before its last epoch as PRUNED, not COMPLETE."""

        def on_trial_complete(self, trial_id, result=None, error=False):
            if (not error and result and trial_id in self._ot_trials
                    and result.get("epoch", 0) < result.get("total_epochs", 0)):
                ot_trial = self._ot_trials[trial_id]
                try:
                    self._ot_study.tell(ot_trial, None, state=optuna.trial.TrialState.PRUNED)
                finally:
                    self._completed_trials.add(trial_id)
                return
            super().on_trial_complete(trial_id, result=result, error=error)

    return PrunedAwareOptunaSearch


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
    log: Callable[[str], None] = print,
) -> dict:
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

    init_ray(address)
    check_resources(workers, gpus_per_worker, cpus_per_worker)
    teachers = teachers_for(space, workdir, log)
    if teachers:
        space.base = space.base.replace(teachers=teachers)

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
        trainer = make_trainer(cfg, workers=workers, gpus_per_worker=gpus_per_worker,
                               cpus_per_worker=cpus_per_worker, storage_path=storage_path,
                               name=f"{name}-{trial_name}", max_failures=max_failures,
                               callbacks=[TuneReportCallback()])
        trainer.fit()

    if left == 0:
        log(f"sweep {name!r}: every trial is done already")
        return summarize(name, storage, space, [])
    tuner = tune.Tuner(
        tune.with_resources(trial, DRIVER_RESOURCES),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=left,
            max_concurrent_trials=concurrency,
            **({} if space.multi_objective else {"metric": metric_names[0], "mode": modes[0]}),
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=1),
    )
    log(f"sweep {name!r}: {left} trial(s), {concurrency} at a time, {workers} worker(s) each; "
        f"study in {storage.url if hasattr(storage, 'url') else 'optuna storage'}")
    grid = tuner.fit()
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial": m.get("trial_id"), "config": r.config, "metrics": {k: v for k, v in m.items()
                     if isinstance(v, (int, float, str)) and not k.startswith("config/")},
                     "error": str(r.error).strip().splitlines()[-1][:300] if r.error else None})
    del base_cfg
    return summarize(name, storage, space, rows)


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
        if pool:
            best = (max if mode == "max" else min)(pool, key=lambda r: r["metrics"].get(metric, float("-inf") if mode == "max" else float("inf")))
            out["best"] = best
    return out
