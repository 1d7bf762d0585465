"""One training run end to end: in this process, or on Ray Train workers when workers > 1,
tracked as one MLflow run unless tracking is off. What it needs of the later stages (the
student's latency, Ray Train) its caller hands in (:func:`kdray.api.train`)."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from kdray.core.errors import KdrayError
from kdray.core.guards import Interrupted
from kdray.core.io import safe_load
from kdray.core.values import mask_credentials
from kdray.teachers.manifest import teacher_archs
from kdray.tracking.state import RunHandle, TrackingSettings
from kdray.training.checkpoint import latest_checkpoint
from kdray.training.config import tracked_config


def check_inputs(cfg) -> None:
    """Everything a run reads, checked before it creates anything (its folder, its MLflow run):
    the data set, and the teachers' manifest, checksums, weights and classes."""
    if not cfg.teachers:
        return
    from kdray.data.sources import load_data
    from kdray.teachers.ensemble import load_teachers

    load_teachers(cfg.teachers, load_data(cfg).classes)


def _open_run(tracking: Optional[TrackingSettings], cfg, run_name: str, log) -> Optional[RunHandle]:
    if not tracking:
        return None
    from kdray.core.guards import stores_initialising
    from kdray.tracking.runs import start_run, versions
    from kdray.tracking.store import experiment_id

    uri, experiment, workdir = tracking.uri, tracking.experiment or "kdray", tracking.workdir
    with stores_initialising(workdir) if workdir else contextlib.nullcontext():
        exp_id = experiment_id(uri, experiment, workdir)
    run_id = start_run(uri, exp_id, run_name=run_name, cfg=cfg, kind="train", params=tracked_config(cfg),
                       extra_tags=versions(), teacher_archs=teacher_archs(cfg.teachers), workdir=workdir)
    log(f"tracking: MLflow run {run_id} in experiment {experiment!r} at {mask_credentials(uri)}")
    return RunHandle(uri, run_id, exp_id)


def open_store(cfg, root, budget_gb: float, log, device=None):
    """``--teacher-store DIR|auto`` (a folder, "auto" or a :class:`~kdray.teachers.store_fill.StoreChoice`
    with its logit encoding): the store with every view this run needs (built here, in the
    precision of ``device``, the workers' device type), or None."""
    from kdray.teachers.store_fill import StoreChoice

    choice = StoreChoice.of(root)
    if choice is None:
        return None
    from kdray.teachers.source import open_teacher_store

    return open_teacher_store(cfg, root=None if choice.root == "auto" else choice.root, budget_gb=budget_gb,
                              log=log, device=device, encoding=choice.encoding)


#: ``final_extras(metrics, ckpt_dir)``: what the last epoch's record adds (the final student's latency)
Extras = Callable[[dict, Optional[str]], dict]


def _train_here(cfg, track: Optional[RunHandle], log, store=None,
                final_extras: Optional[Extras] = None) -> tuple[dict, Path]:
    """In this process; returns the result and the latest checkpoint folder."""
    from kdray.training.fit import fit

    reporter, extras = None, {}
    final_extras = final_extras or (lambda metrics, ckpt_dir: {})
    if track:
        from kdray.tracking.runs import RunLogger

        logger = RunLogger(track.uri, track.run_id, teachers=cfg.teachers)

        def reporter(metrics: dict, ckpt_dir: Optional[str]) -> None:
            extras.update(final_extras(metrics, ckpt_dir))
            logger.epoch({**metrics, **extras}, ckpt_dir)

    result = fit(cfg, log=log, checkpoint_root=cfg.checkpoint_dir, reporter=reporter, teacher_store=store)
    result["metrics"].update(extras)  # the final student's latency, as logged
    return result, latest_checkpoint(cfg.checkpoint_dir)


def _train_on_ray(cfg, track: Optional[RunHandle], out: Path, run_name: str, fit_distributed: Callable,
                  **ray_options) -> tuple[dict, Path]:
    """On ``cfg.workers`` Ray Train workers (``ray_options``: address, resources, retries, store)."""
    res = fit_distributed(cfg, workers=cfg.workers, out=out, name=run_name, tracking=track, **ray_options)
    latest = Path(res["checkpoint_dir"])
    result = {"metrics": safe_load(latest / "student.pt", "student")["metrics"]}
    result["metrics"].update({k: v for k, v in res["metrics"].items() if isinstance(v, (int, float))})
    return result, latest


def run_training(cfg, *, out: Path, run_name: str, tracking: Optional[TrackingSettings] = None, log=print,
                 address=None, gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, max_failures: int = 0,
                 store_root: Optional[str] = None, store_budget: float = 4.0, final_extras: Optional[Extras] = None,
                 fit_distributed: Optional[Callable] = None) -> dict:
    """``tracking``: where the run is tracked (experiment None: ``kdray``), or None for no MLflow.
    ``store_root``: a teacher-store folder (or "auto": the teacher set's) to take the teachers'
    outputs from; None: they run live. ``final_extras``: see :data:`Extras` (a tracked run in this
    process logs them); ``fit_distributed(cfg, workers=, out=, name=, tracking=, **ray options)``:
    a run on ``cfg.workers`` > 1 Ray Train workers (``kdray.distributed.raytrain``)."""
    if cfg.workers > 1 and fit_distributed is None:
        raise KdrayError(f"workers={cfg.workers} needs Ray Train: run it with kdray.train or `kdray train`")
    if cfg.workers > 1 and cfg.sync_bn and cfg.device == "cpu":  # known before Ray starts
        from kdray.training.config import SYNC_BN_NEEDS_CUDA

        raise KdrayError(SYNC_BN_NEEDS_CUDA)
    t0 = time.perf_counter()
    check_inputs(cfg)  # bad input stops here with one line, before anything is said or created
    log(f"starting: {cfg.method} {cfg.student} on {cfg.dataset}, {cfg.epochs} epochs (data"
        + (" and teachers" if cfg.teachers else "") + f" checked in {time.perf_counter() - t0:.1f}s)")
    if store_budget <= 0:
        raise KdrayError(f"--teacher-store-budget {store_budget:g} is out of range; allowed: > 0 (GB)")
    workers_device = ("cuda" if gpus_per_worker > 0 else "cpu") if cfg.workers > 1 else None
    store = open_store(cfg, store_root, store_budget, log, workers_device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    track = _open_run(tracking, cfg, run_name, log)
    if track and store is not None:
        from kdray.tracking.store import client
        from kdray.tracking.tags import STORE_TAG

        client(track.uri).set_tag(track.run_id, STORE_TAG, store.describe())
    try:
        if cfg.workers > 1:
            result, latest = _train_on_ray(cfg, track, out, run_name, fit_distributed, address=address,
                                           max_failures=max_failures, gpus_per_worker=gpus_per_worker,
                                           cpus_per_worker=cpus_per_worker, store=store)
        else:
            result, latest = _train_here(cfg, track, log, store, final_extras)
    except Interrupted as exc:
        if track:
            from kdray.tracking.runs import finish_run

            finish_run(track.uri, track.run_id, "interrupted", f"interrupted by {exc.signal_name}")
        raise Interrupted(exc.signum, f"training interrupted by {exc.signal_name}; `kdray train ... --out {out} "
                                      "--resume` continues from its last checkpoint") from None
    except BaseException as exc:
        if track:
            from kdray.core.outcome import failure_reason
            from kdray.tracking.runs import finish_run

            finish_run(track.uri, track.run_id, "failed", failure_reason(exc))
        raise
    student_path = out / "student.pt"
    shutil.copyfile(latest / "student.pt", student_path)
    result["student_path"] = str(student_path)
    if track:
        result["run_id"] = track.run_id
    return result
