"""The teacher store over Ray: its missing rows computed by Ray tasks spread over the cluster, and
the finished store shared through Ray's object store so trials on every node read the same arrays."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from kdray.data.bundle import DataBundle
from kdray.data.splits import Split
from kdray.teachers.store import (
    TeacherStore,
)
from kdray.teachers.store_fill import Builder, compute_rows

CHUNKS_PER_TASK_SLOT = 2  # more chunks than slots: progress and load balance without much overhead


def _rows_task(ensemble, data: DataBundle, precision, feats: bool, codes: torch.Tensor) -> tuple:
    """One Ray task: the teachers' outputs of ``codes`` on this task's device."""
    from kdray.core.device import Precision
    from kdray.teachers.ensemble import LiveTeacherOutputs
    from kdray.teachers.source import on_device

    device = torch.device("cuda" if precision.device.type == "cuda" and torch.cuda.is_available() else "cpu")
    here = Precision(device, precision.use_amp, precision.channels_last)
    ensemble = on_device(ensemble, here)
    source = LiveTeacherOutputs(ensemble, here.autocast, feats)
    return compute_rows(source, data, data.views, codes, here.channels_last)


def ray_builder(cpus: float = 1.0, gpus: float = 0.0, slots: Optional[int] = None) -> Callable[..., Builder]:
    """A builder factory for :func:`kdray.teachers.source.open_teacher_store`: chunks of the missing views,
    one Ray task each (``cpus``/``gpus`` per task, like a trial's worker), as many at once as the
    cluster has room for."""
    import ray

    def factory(ensemble, data: DataBundle, precision, feats: bool) -> Builder:
        def build(codes: torch.Tensor, progress) -> tuple:
            width = slots or max(1, int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1) // (gpus or cpus)))
            chunks = list(torch.tensor_split(codes, min(len(codes), width * CHUNKS_PER_TASK_SLOT)))
            slim = dataclasses.replace(data, val=_empty(data.val), test=_empty(data.test))  # train only
            task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=2)(_rows_task)
            ens_ref, data_ref = ray.put(ensemble.cpu()), ray.put(slim)
            pending = {task.remote(ens_ref, data_ref, precision, feats, c): i for i, c in enumerate(chunks)}
            results, done = {}, 0
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ready[0])
                results[i] = ray.get(ready[0])
                done += len(chunks[i])
                progress(done, len(codes))
            parts = [results[i] for i in range(len(chunks))]
            logits = torch.cat([p[0] for p in parts])
            fmaps = [torch.cat(fs) for fs in zip(*[p[1] for p in parts])] if parts[0][1] is not None else None
            return logits, fmaps

        return build

    return factory


def _empty(split: Split) -> Split:
    return Split(split.x[:0] if split.x is not None else None, split.y[:0], [] if split.records is not None else None)


def share(store: Optional[TeacherStore]):
    """The store in Ray's object store (None stays None): an ObjectRef trials can hold."""
    if store is None:
        return None
    import ray

    return ray.put(store.to_arrays())


def fetch(ref) -> Optional[TeacherStore]:
    if ref is None:
        return None
    import ray

    return TeacherStore.from_arrays(ray.get(ref))
