"""One trial of a sweep as a Tune function: its config, its MLflow run, then the engine (in the
trial's process, or a TorchTrainer of W workers); and the environment of the sweep's Ray processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from kdray.tracking.state import RunHandle, SweepTracking
from kdray.tune.options import SweepOptions
from kdray.tune.space import Space

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


def make_trial(space: Space, name: str, opts: SweepOptions, storage_path: str, track: Optional[SweepTracking],
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
        run = _start_trial_run(track, cfg, context)
        if opts.in_trial:
            from kdray.distributed.raytrain import fit_in_tune_trial

            root = Path(storage_path) / name / "kdray-checkpoints" / context.get_trial_id()
            fit_in_tune_trial(cfg, tracking=run, store_ref=store_ref, checkpoint_root=str(root))
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


def ray_trial_retried() -> bool:
    """Whether this trial was started before (Tune hands it a checkpoint to resume from)."""
    import ray.tune

    return ray.tune.get_checkpoint() is not None


def _start_trial_run(track: Optional[SweepTracking], cfg, context) -> Optional[RunHandle]:
    """The trial's child run, created on the trial's node (over HTTP on a cluster); a retried trial
    goes on in the same run. A tracking server that does not answer (after MLflow's bounded
    retries) is a :class:`~kdray.tracking.store.TrackingLost`, as it is for an epoch's logging."""
    if not track:
        return None
    from kdray.core.errors import KdrayError
    from kdray.tracking.store import lost, scheme
    from kdray.tracking.trials import start_trial_run
    from kdray.training.config import tracked_config

    params = tracked_config(cfg)
    try:
        return start_trial_run(track, cfg, trial_id=context.get_trial_id(), params=params,
                               retried=ray_trial_retried())
    except KdrayError:
        raise
    except Exception as exc:  # MLflow's errors after its (bounded) retries: the server is gone
        if scheme(track.uri) not in ("http", "https"):
            raise
        raise lost(track.uri, exc) from None
