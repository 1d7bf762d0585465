"""The teachers of a sweep: trained once before any trial (or found by their recipe), and their
outputs computed once into the teacher store every trial shares."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from kdray.tracking.state import TrackingSettings
from kdray.tune.options import SweepOptions
from kdray.tune.space import Space


def teachers_for(space: Space, workdir: Path, log: Callable[[str], None],
                 tracking: Optional[TrackingSettings] = None) -> Optional[str]:
    """Train the space's teachers once (or find them, by their whole recipe); their directory.
    Teachers trained here are tracked as runs of the kdray-teachers experiment."""
    from kdray.distill import get_method

    if space.base.teachers or all(get_method(m).min_teachers == 0 for m in space.methods()):
        return space.base.teachers
    from kdray.training.teacher_set import TEACHER_EXPERIMENT, ensure_teachers

    spec = space.teachers
    archs = spec.get("arch", ["resnet20"])
    archs = [archs] if isinstance(archs, str) else list(archs)
    tcfg = space.base.replace(epochs=spec.get("epochs", 20),
                              train_fraction=spec.get("train_fraction", space.base.train_fraction))
    teacher_tracking = replace(tracking, experiment=TEACHER_EXPERIMENT, workdir=str(workdir)) if tracking else None
    return ensure_teachers(tcfg, archs, int(spec.get("count", 3)), workdir / "teachers", log, teacher_tracking)


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
                       "crop_padding", "hflip", "views", "view_count", "crop_scale", "crop_ratio", "amp",
                       "channels_last", "device", "teachers")


def sweep_store_needs(space: Space):
    """What a sweep of ``space`` needs from a teacher store: (a config of its teachers, data and
    precision, the seeds, the loader epochs, whether feature maps); None without teachers."""
    from kdray.distill import get_method
    from kdray.teachers.source import teacher_view_epochs
    from kdray.training.config import from_dict

    high = {**space.base.to_dict(), **space.corner("high")}
    cfgs = [from_dict({**high, "method": m}, space.path) for m in space.methods() if get_method(m).min_teachers > 0]
    if not cfgs or not space.base.teachers:
        return None
    epochs = sorted({e for c in cfgs for e in teacher_view_epochs(c)})
    feats = any(get_method(c.method).needs_teacher_feats(c) for c in cfgs)
    return cfgs[0], sweep_seeds(space), epochs, feats


def sweep_teacher_store(space: Space, opts: SweepOptions, log):
    """The sweep's teacher store, built before any trial (its missing views by a Ray Data pipeline
    over the cluster) and put in Ray's object store: (ObjectRef or None, one line for the sweep's run)."""
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
    from kdray.distributed.store_tasks import ray_data_builder, share
    from kdray.teachers.source import open_teacher_store

    store = open_teacher_store(cfg, seeds=seeds, epochs=epochs, feats=feats, root=opts.teacher_store_dir,
                               budget_gb=opts.teacher_store_budget, encoding=opts.store_encoding,
                               builder=ray_data_builder(cpus=opts.cpus_per_worker),
                               device="cuda" if opts.gpus_per_worker > 0 else "cpu", log=log)
    return share(store), store.describe()
