"""One training run end to end: in this process, or on Ray Train workers when workers > 1,
tracked as one MLflow run unless tracking is off. What it needs of the later stages (the
student's latency, Ray Train) its caller hands in (:func:`kdray.api.train`).

A run begins with its first epoch. Everything it reads is checked before it creates anything;
a refusal that comes later, before that epoch (a data set failing in its first batches), takes
away what the run had created: its folder, its MLflow run (:class:`~kdray.core.io.Undo`). A run
that began and then fails is recorded as failed, its checkpoints kept for ``--resume``; a full
disk is one line naming the file, also when the MLflow run could not be closed on it."""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from kdray.core.errors import DiskFull, KdrayError
from kdray.core.guards import Interrupted
from kdray.core.io import Undo, atomic_write, first_line, safe_load, undone_on_refusal
from kdray.core.values import mask_credentials
from kdray.teachers.manifest import teacher_archs
from kdray.tracking.state import RunHandle, TrackingSettings
from kdray.training.checkpoint import latest_checkpoint, load_training_state
from kdray.training.config import tracked_config
from kdray.training.loop import NonFiniteLoss


@dataclass
class Inputs:
    """What :func:`check_inputs` loaded: the data set and the teachers (None: no --teachers)."""

    data: Any
    teachers: Any = None


def check_inputs(cfg) -> Inputs:
    """Everything a run reads, checked before it creates anything (its log file, its folder, its
    MLflow run): the device (of a run in this process), the data set, the teachers' manifest,
    checksums, weights, classes and count, the student's architecture, and the checkpoint that
    ``resume`` continues from. A run in this process trains on the data and teachers loaded here."""
    from kdray.data.sources import load_data
    from kdray.distill import check_teacher_count, get_method
    from kdray.models import build_student

    method_cls = get_method(cfg.method)
    if cfg.workers <= 1:  # Ray Train workers pick their own
        from kdray.core.device import pick_device

        pick_device(cfg)
    data = load_data(cfg)
    teachers = None
    if cfg.teachers:
        from kdray.teachers.ensemble import load_teachers

        teachers = load_teachers(cfg.teachers, data.classes)
        if method_cls.min_teachers > 0:
            check_teacher_count(method_cls, teachers.info.count)
    build_student(cfg.student, data.num_classes, branches=cfg.branches, split_stage=cfg.split_stage,
                  multi_branch=method_cls.multi_branch)
    found = latest_checkpoint(cfg.checkpoint_dir) if cfg.resume and cfg.checkpoint_dir else None
    if found is not None:
        load_training_state(found)
    return Inputs(data, teachers)


def _open_run(tracking: Optional[TrackingSettings], cfg, run_name: str, out: Path, log, undo: Undo,
              store=None, run_tags: Optional[dict] = None) -> Optional[RunHandle]:
    """The run's MLflow run (taken away again if the run is refused before it begins), tagged with
    the teacher ``store`` it reads and ``run_tags`` (a seed group's link to its parent); on
    ``resume``, the runs earlier attempts at ``out`` left running are closed as failed."""
    if not tracking:
        return None
    from kdray.core.guards import stores_initialising
    from kdray.tracking.runs import (
        FOLDER_TAG,
        close_earlier_attempts,
        discard_run,
        relative_path,
        start_run,
        store_writes,
        versions,
    )
    from kdray.tracking.store import experiment_id

    uri, experiment, workdir = tracking.uri, tracking.experiment or "kdray", tracking.workdir
    folder = relative_path(str(Path(out).resolve()), Path(workdir) if workdir else None)
    with store_writes(uri):  # a full disk under the store: one line naming its file
        with stores_initialising(workdir) if workdir else contextlib.nullcontext():
            exp_id = experiment_id(uri, experiment, workdir)
        run_id = start_run(uri, exp_id, run_name=run_name, cfg=cfg, kind="train", params=tracked_config(cfg),
                           extra_tags={**versions(), FOLDER_TAG: folder, **(run_tags or {})},
                           teacher_archs=teacher_archs(cfg.teachers),
                           workdir=workdir)
        undo.call(lambda: discard_run(uri, run_id))
        log(f"tracking: MLflow run {run_id} in experiment {experiment!r} at {mask_credentials(uri)}")
        if store is not None:
            from kdray.tracking.store import client
            from kdray.tracking.tags import STORE_TAG

            client(uri).set_tag(run_id, STORE_TAG, store.describe())
        if cfg.resume:
            reason = ("ended without closing its MLflow run (killed, or its store could not be written as it failed); "
                      f"continued by --resume in run {run_id}")
            closed = close_earlier_attempts(uri, exp_id, folder, run_id, reason)
            if closed:
                log(f"resume: MLflow run(s) {', '.join(closed)} that an earlier attempt left running closed as failed")
    return RunHandle(uri, run_id, exp_id)


def _close(track: RunHandle, state: str, reason: str) -> Optional[Exception]:
    """End the MLflow run as ``state``; the error when its store could not take it (the run then
    stays open, and ``--resume`` closes it)."""
    from kdray.tracking.runs import finish_run

    try:
        finish_run(track.uri, track.run_id, state, reason)
    except Exception as exc:  # noqa: BLE001 - the run's own failure is what the user must see
        return exc
    return None


def _left_open(track: RunHandle, error: Exception, state: str) -> str:
    from kdray.core.outcome import is_disk_full

    why = "its store's disk is full too" if is_disk_full(error) else first_line(error, 160)
    return f"MLflow run {track.run_id} could not be marked {state} ({why}): --resume closes it"


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


def _train_here(cfg, track: Optional[RunHandle], log, store=None, final_extras: Optional[Extras] = None,
                inputs: Optional[Inputs] = None, undo: Optional[Undo] = None) -> tuple[dict, Path]:
    """In this process, on ``inputs`` when given; returns the result and the latest checkpoint
    folder. The run begins (``undo.began``) when its first epoch reports."""
    from kdray.distill import get_method
    from kdray.training.fit import fit

    extras = {}
    final_extras = final_extras or (lambda metrics, ckpt_dir: {})
    logger = None
    if track:
        from kdray.tracking.runs import RunLogger

        logger = RunLogger(track.uri, track.run_id, teachers=cfg.teachers)

    def reporter(metrics: dict, ckpt_dir: Optional[str]) -> None:
        if undo is not None:
            undo.began()  # an epoch has run: what the run made stays, whatever happens next
        if logger is not None:
            extras.update(final_extras(metrics, ckpt_dir))
            logger.epoch({**metrics, **extras}, ckpt_dir)

    teachers = None  # a store serves the teachers' outputs: they load only for the views it lacks
    if inputs is not None and store is None and get_method(cfg.method).min_teachers > 0:
        teachers = inputs.teachers
    result = fit(cfg, data=inputs.data if inputs else None, teachers=teachers, log=log,
                 checkpoint_root=cfg.checkpoint_dir, reporter=reporter, teacher_store=store)
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
                 fit_distributed: Optional[Callable] = None, undo: Optional[Undo] = None,
                 run_tags: Optional[dict] = None) -> dict:
    """``tracking``: where the run is tracked (experiment None: ``kdray``), or None for no MLflow.
    ``store_root``: a teacher-store folder (or "auto": the teacher set's) to take the teachers'
    outputs from; None: they run live. ``final_extras``: see :data:`Extras` (a tracked run in this
    process logs them); ``fit_distributed(cfg, workers=, out=, name=, tracking=, **ray options)``:
    a run on ``cfg.workers`` > 1 Ray Train workers (``kdray.distributed.raytrain``). ``undo``: the
    caller's record of what it created (its log file), which a refusal takes away with the run's
    folder and MLflow run; without it, the run undoes its own. ``run_tags``: more tags on its MLflow
    run (``mlflow.parentRunId`` of a seed group's child)."""
    if cfg.workers > 1 and fit_distributed is None:
        raise KdrayError(f"workers={cfg.workers} needs Ray Train: run it with kdray.train or `kdray train`")
    if cfg.workers > 1 and cfg.sync_bn and cfg.device == "cpu":  # known before Ray starts
        from kdray.training.config import SYNC_BN_NEEDS_CUDA

        raise KdrayError(SYNC_BN_NEEDS_CUDA)
    if store_budget <= 0:
        raise KdrayError(f"--teacher-store-budget {store_budget:g} is out of range; allowed: > 0 (GB)")
    with undone_on_refusal() if undo is None else contextlib.nullcontext(undo) as undo:
        t0 = time.perf_counter()
        inputs = check_inputs(cfg)  # bad input stops here with one line, before anything is said or created
        log(f"starting: {cfg.method} {cfg.student} on {cfg.dataset}, {cfg.epochs} epochs (data"
            + (" and teachers" if cfg.teachers else "") + f" checked in {time.perf_counter() - t0:.1f}s)")
        workers_device = ("cuda" if gpus_per_worker > 0 else "cpu") if cfg.workers > 1 else None
        store = open_store(cfg, store_root, store_budget, log, workers_device)
        out = undo.path(out)
        out.mkdir(parents=True, exist_ok=True)
        track = _open_run(tracking, cfg, run_name, out, log, undo, store, run_tags)
        try:
            if cfg.workers > 1:
                inputs = None  # the workers load their own
                undo.began()  # its epochs run on the workers: from here a failure is the run's
                result, latest = _train_on_ray(cfg, track, out, run_name, fit_distributed, address=address,
                                               max_failures=max_failures, gpus_per_worker=gpus_per_worker,
                                               cpus_per_worker=cpus_per_worker, store=store)
            else:
                result, latest = _train_here(cfg, track, log, store, final_extras, inputs, undo)
        except Interrupted as exc:
            if track and (error := _close(track, "interrupted", f"interrupted by {exc.signal_name}")):
                log(f"tracking: {_left_open(track, error, 'interrupted')}")
            raise Interrupted(exc.signum, f"training interrupted by {exc.signal_name}; `kdray train ... --out {out} "
                                          "--resume` continues from its last checkpoint") from None
        except BaseException as exc:
            if isinstance(exc, NonFiniteLoss):
                undo.began()  # a loss that diverged did train: the run is recorded as failed, not taken away
            if undo.refused(exc):  # before the run began: it is taken away, not recorded
                raise
            _failed(exc, track, log)
            raise
        student_path = out / "student.pt"
        with open(latest / "student.pt", "rb") as src:  # whole or not at all; a full disk names the file
            atomic_write(student_path, lambda fh: shutil.copyfileobj(src, fh))
        result["student_path"] = str(student_path)
        if track:
            result["run_id"] = track.run_id
        return result


def _failed(exc: BaseException, track: Optional[RunHandle], log) -> None:
    """Record the run as failed; a full disk is raised as one :class:`DiskFull` line naming the file
    (and the MLflow run, when it could not be closed on that disk)."""
    from kdray.core.outcome import disk_full_line, failure_reason

    error = _close(track, "failed", failure_reason(exc)) if track else None
    note = _left_open(track, error, "failed") if error is not None else None
    line = disk_full_line(exc) if isinstance(exc, Exception) else None
    if line:
        raise DiskFull(f"{line}; {note}" if note else line) from exc
    if note:
        log(f"tracking: {note}")
