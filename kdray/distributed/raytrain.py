"""Ray Train: a run's ``fit`` as a TorchTrainer worker loop (DDP via torch.distributed;
gloo on CPU, NCCL on GPU), a checkpoint reported each epoch, resume after worker failures; the
resources a worker asks for, a custom method sent to workers by value, and a run's final extras
(the student's latency)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Optional

from kdray.core.errors import KdrayError
from kdray.distributed.local_ray import init_ray
from kdray.tracking.state import RunHandle
from kdray.training.config import from_dict

# A trial's driver (the Tune function that fits a TorchTrainer) mostly waits: it asks for no CPU, so
# C trials of W one-CPU workers fit on C*W CPUs (at 0.01 CPU each, 2 trials x 1 worker needed 2.02 of
# 2 and the second trial's workers never started), only for a little logical memory (Tune needs one
# non-zero resource in a request).
DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 1024**2}


def worker_resources(cpus_per_worker: float, gpus_per_worker: float) -> dict:
    """What one training process asks of Tune when a 1-worker trial trains in the trial itself."""
    return {"cpu": cpus_per_worker, "gpu": gpus_per_worker}


def _quiet_ray_train_console() -> None:
    """Ray Train logs every report and checkpoint (a full metrics dict) at INFO to the console of
    each worker; keep those in Ray's log files only, the console for warnings and kdray's lines."""
    import logging

    for name in ("", "ray.train", "ray.tune"):
        for h in logging.getLogger(name).handlers:
            if type(h) is logging.StreamHandler or type(h).__name__ == "PlainRayHandler":  # the console
                h.setLevel(max(h.level, logging.WARNING))


def final_extras(metrics: dict, ckpt_dir: Optional[str]) -> dict:
    """What the last epoch's record adds: the final student's CPU latency, measured where it trained."""
    student = Path(ckpt_dir) / "student.pt" if ckpt_dir else None
    if not metrics.get("done") or student is None or not student.is_file():
        return {}
    from kdray.deploy.latency import student_latency_ms

    return {"latency_ms": student_latency_ms(student)}


def _rank0_tracker(track: Optional[RunHandle], cfg, node_ip: str):
    """Rank 0 logs the run to MLflow (over HTTP on a cluster); other ranks log nothing."""
    import ray.train

    if not track or ray.train.get_context().get_world_rank() != 0:
        return None
    from kdray.tracking.runs import RunLogger

    return RunLogger(track.uri, track.run_id, teachers=cfg.teachers, node_ip=node_ip)


def _ray_reporter(tracker, node_ip: str, node_id: str, api=None):
    """``api``: ``ray.train`` on a Train worker, ``ray.tune`` in a trial that trains itself (there
    the checkpoint folder is kdray's own, kept in the trial's folder: its path names the student;
    Train reports its own ``checkpoint_path``)."""
    if api is None:
        import ray.train as api
    in_trial = api.__name__ == "ray.tune"

    def report(metrics: dict, ckpt_dir: Optional[str]) -> None:
        metrics = dict(metrics, node_ip=node_ip, node_id=node_id, **final_extras(metrics, ckpt_dir))
        if in_trial and ckpt_dir:
            metrics["checkpoint_path"] = ckpt_dir
        if tracker is not None:  # before the report: ASHA may end the trial right after it
            tracker.epoch(metrics, ckpt_dir)
        checkpoint = api.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        api.report(metrics, checkpoint=checkpoint)

    return report


def _fit_reporting(cfg, tracker, reporter, checkpoint, store_ref, device, quiet: bool,
                   root: Optional[str] = None) -> None:
    """``fit`` from ``checkpoint`` (Ray's last, or None) with the store behind ``store_ref``; a
    failure is recorded on the run before it propagates."""
    from kdray.core.outcome import failure_reason
    from kdray.distributed.store_tasks import fetch
    from kdray.tracking.store import TrackingLost
    from kdray.training.fit import fit

    root = root or tempfile.mkdtemp(prefix="kdray-ckpt-")
    with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)) as resume_dir:
        try:
            # in a sweep, the driver prints one line per trial epoch; the workers stay quiet
            fit(cfg, reporter=reporter, resume_dir=resume_dir, checkpoint_root=root, device=device,
                keep_checkpoints=1, log=(lambda s: None) if quiet else None, teacher_store=fetch(store_ref))
        except Exception as exc:
            if tracker is not None and not isinstance(exc, TrackingLost):  # no server to tell
                tracker.failed(failure_reason(exc))
            raise


def fit_in_tune_trial(cfg, *, tracking: Optional[RunHandle], store_ref=None, checkpoint_root: str) -> None:
    """A 1-worker trial trains in the trial's own process (no Train worker group to start):
    reports and checkpoints go to Tune each epoch, and a retried trial resumes from its last one.
    ``checkpoint_root``: kdray's own checkpoint folder of this trial (its latest names the student)."""
    import logging

    import ray
    import ray.tune
    from ray.util import get_node_ip_address

    from kdray.core.device import pick_device
    from kdray.tracking.runs import RunLogger

    node_ip = get_node_ip_address()
    tracker = (RunLogger(tracking.uri, tracking.run_id, teachers=cfg.teachers, node_ip=node_ip)
               if tracking else None)
    reporter = _ray_reporter(tracker, node_ip, ray.get_runtime_context().get_node_id(), api=ray.tune)
    # Tune persists each reported checkpoint with an INFO line on the console ("Checkpoint
    # successfully created at ...", ray/train/_internal/storage.py): one per epoch per trial
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    _fit_reporting(cfg, tracker, reporter, ray.tune.get_checkpoint(), store_ref, pick_device(cfg), quiet=True,
                   root=checkpoint_root)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: the plain ``fit``, reporting through ray.train. The config
    arrives as a dict and is rebuilt (validated) once here."""
    import ray.train
    import ray.train.torch
    from ray.util import get_node_ip_address

    _quiet_ray_train_console()
    register_payload(config.get("methods"))  # methods and architectures defined outside kdray, by value
    cfg = from_dict(config["cfg"])
    node_ip = get_node_ip_address()
    tracker = _rank0_tracker(config.get("tracking"), cfg, node_ip)
    reporter = _ray_reporter(tracker, node_ip, ray.get_runtime_context().get_node_id())
    _fit_reporting(cfg, tracker, reporter, ray.train.get_checkpoint(), config.get("teacher_store"),
                   ray.train.torch.get_device(), quiet=bool(config.get("quiet")))


def _send_by_value(objects) -> None:
    """cloudpickle pickles a class or function of an importable module by reference (its module
    name), which a Ray worker may not be able to import (a notebook, a test file); ask it to send
    these modules by value instead (public cloudpickle API)."""
    import sys

    from ray import cloudpickle

    for obj in objects:
        module = sys.modules.get(getattr(obj, "__module__", None) or "")
        if module is not None and module.__name__ != "__main__" and not module.__name__.startswith("kdray."):
            cloudpickle.register_pickle_by_value(module)


def method_payload() -> dict:
    """What Ray workers must register before they build anything, sent by value: the methods and
    the architectures (``kdray.models.register_model``) defined outside kdray."""
    from kdray.distill import methods_defined_outside_kdray
    from kdray.models import registered_builders

    classes, builders = methods_defined_outside_kdray(), registered_builders()
    _send_by_value([*classes, *builders.values()])
    return {"methods": classes, "models": builders}


def register_payload(payload) -> None:
    """In a Ray worker: register what ``method_payload`` sent (names already known are kept)."""
    from kdray.distill import ensure_registered
    from kdray.models import ensure_models_registered

    payload = payload or {}
    ensure_registered(payload.get("methods", ()))
    ensure_models_registered(payload.get("models", {}))


def make_trainer(
    cfg,
    *,
    workers: int,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    storage_path: str,
    name: str,
    max_failures: int = 0,
    callbacks=(),
    tracking: Optional[RunHandle] = None,
    quiet: bool = False,
    methods=None,
    store_ref=None,
):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kdray.distributed.local_ray import torch_config

    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "tracking": tracking, "quiet": quiet, "methods": methods,
                           "teacher_store": store_ref},
        # on a local Ray, torch's rendezvous store listens on loopback too (kdray.distributed.local_ray)
        torch_config=torch_config("nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def check_resources(workers: int, gpus_per_worker: float, cpus_per_worker: float, concurrency: int = 1) -> None:
    """Fail at once, not hang, when the cluster can never host one trial."""
    import ray

    total = ray.cluster_resources()
    need_gpu, need_cpu = workers * gpus_per_worker, workers * cpus_per_worker
    if need_gpu > total.get("GPU", 0):
        raise KdrayError(
            f"asked for {workers} worker(s) x {gpus_per_worker} GPU = {need_gpu:g} GPUs per trial, "
            f"but the Ray cluster has {total.get('GPU', 0):g}; lower --workers/--gpus-per-worker or add GPU nodes"
        )
    if need_cpu > total.get("CPU", 0):
        raise KdrayError(
            f"asked for {workers} worker(s) x {cpus_per_worker} CPU = {need_cpu:g} CPUs per trial, "
            f"but the Ray cluster has {total.get('CPU', 0):g}; lower --workers/--cpus-per-worker"
        )


def fit_distributed(cfg, *, workers: int, out: Path, gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
                    address: Optional[str] = None, max_failures: int = 0, name: str = "kdray-train",
                    tracking: Optional[RunHandle] = None, store=None) -> dict:
    """`kdray train --workers W`: one TorchTrainer run; returns the final metrics and checkpoint.
    ``store``: a teacher store, handed to the workers through Ray's object store."""
    from kdray.distributed.store_tasks import share
    from kdray.tracking.store import bounded_http_env

    init_ray(address, env=bounded_http_env())
    from kdray.core.guards import rearm_stop_signals

    rearm_stop_signals()  # after Ray's own SIGTERM handler
    check_resources(workers, gpus_per_worker, cpus_per_worker)
    trainer = make_trainer(cfg, workers=workers, gpus_per_worker=gpus_per_worker,
                           cpus_per_worker=cpus_per_worker, storage_path=str(Path(out).resolve() / "ray"),
                           name=name, max_failures=max_failures, tracking=tracking,
                           methods=method_payload(), store_ref=share(store))
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps the worker's error
        from kdray.core.outcome import failure_reason

        raise KdrayError(f"distributed training failed: {failure_reason(exc)}") from None
    return {"metrics": dict(result.metrics), "checkpoint_dir": result.checkpoint.path if result.checkpoint else None}
