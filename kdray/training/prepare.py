"""What every generation of a run shares, prepared once: the data, the teacher ensemble or the
teacher store that replaces it, precision and device, the batch loaders, rank and world size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kdray.core.device import Precision, pick_device, rank_and_world
from kdray.core.errors import KdrayError
from kdray.data.access import loader_for
from kdray.data.bundle import DataBundle
from kdray.data.loader import BatchLoader
from kdray.data.sources import load_data
from kdray.distill import check_teacher_count, get_method
from kdray.teachers.ensemble import TeacherEnsemble, load_teachers
from kdray.teachers.source import on_device, store_mismatch
from kdray.teachers.store import TeacherStore


@dataclass
class Loaders:
    """This rank's shard of each split, batched on the training device."""

    train: BatchLoader
    val: BatchLoader
    test: BatchLoader
    bn: Optional[BatchLoader]  # the un-augmented train split, for precise BatchNorm statistics


@dataclass
class Prepared:
    """A run's shared parts, as :func:`prepare` made them."""

    cfg: object
    data: DataBundle
    teachers: Optional[TeacherEnsemble]  # None until needed when a store serves the outputs
    precision: Precision
    loaders: Loaders
    rank: int
    world: int
    store: Optional[TeacherStore] = None
    note: Optional[str] = None  # what the run's log should say about its teacher outputs

    def ensemble(self) -> TeacherEnsemble:
        """The frozen ensemble, loaded on first need (a run whose store covers it never loads it)."""
        if self.teachers is None:
            self.teachers = on_device(load_teachers(self.cfg.teachers, self.data.classes), self.precision)
        return self.teachers


def _resolve_teachers(cfg, method_cls, data: DataBundle, teachers, precision: Precision, store):
    """The frozen ensemble on the training device, loaded from ``cfg.teachers`` unless given or
    unless a store gives the outputs (then it loads when a view is missing from the store)."""
    if method_cls.min_teachers == 0 and teachers is None:
        return None
    if store is not None:
        check_teacher_count(method_cls, store.info.count)
        return on_device(teachers, precision) if teachers is not None else None
    if teachers is None:
        if not cfg.teachers:
            check_teacher_count(method_cls, 0)
        teachers = load_teachers(cfg.teachers, data.classes)
    check_teacher_count(method_cls, teachers.info.count)
    return on_device(teachers, precision)


def make_loaders(cfg, data: DataBundle, precision: Precision, rank: int, world: int) -> Loaders:
    """The loaders of this rank: the global batch split evenly across ``world`` ranks; a streamed
    bundle's through Ray Data (:class:`~kdray.data.stream.StreamLoader`), else from memory."""
    per_rank_batch = cfg.batch_size // world
    shard = dict(device=precision.device, rank=rank, world_size=world, channels_last=precision.channels_last)
    return Loaders(
        train=loader_for(data, "train", per_rank_batch, train=True, seed=cfg.seed, **shard),
        val=loader_for(data, "val", cfg.eval_batch_size, **shard),
        test=loader_for(data, "test", cfg.eval_batch_size, **shard),
        bn=loader_for(data, "train", per_rank_batch, **shard) if cfg.precise_bn else None,
    )


def prepare(cfg, data=None, teachers=None, device=None, store: Optional[TeacherStore] = None) -> Prepared:
    """Prepare a run of ``cfg``; ``data``, ``teachers`` and ``store`` are used when given (a store that
    does not fit the run is set aside, with a note saying why: the teachers then run live)."""
    rank, world = rank_and_world()
    if cfg.batch_size < world:
        raise KdrayError(f"batch_size {cfg.batch_size} is smaller than the number of workers {world}")
    precision = Precision.for_config(cfg, device or pick_device(cfg))
    data = data or load_data(cfg)
    method_cls = get_method(cfg.method)
    store = store if method_cls.min_teachers > 0 else None
    note = None
    why = store_mismatch(store, cfg, data, precision) if store is not None else None
    if why:
        store, note = None, f"teacher store not used ({why}): the teachers run live"
    teachers = _resolve_teachers(cfg, method_cls, data, teachers, precision, store)
    return Prepared(cfg, data, teachers, precision, make_loaders(cfg, data, precision, rank, world), rank, world,
                    store, note)
