"""The engine's source of teacher outputs for a run: the teacher store of its teachers, data, views
and precision (opened, and completed where it lacks rows), served by (sample, view) with the live
ensemble filling any pair the store lacks; and the ensemble placed on the run's device."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from kdray.core.device import Precision, pick_device
from kdray.data.bundle import DataBundle
from kdray.data.sources import load_data
from kdray.data.views import ViewKeys
from kdray.distill import get_method
from kdray.distill.base import TeacherInfo
from kdray.teachers.ensemble import LiveTeacherOutputs, TeacherEnsemble, load_teachers
from kdray.teachers.manifest import MANIFEST, read_manifest
from kdray.teachers.store import DEFAULT_BUDGET_GB, TeacherStore, mismatch
from kdray.teachers.store_codec import LogitEncoding
from kdray.teachers.store_fill import StoreRequest, ensure_store


def on_device(teachers: TeacherEnsemble, precision: Precision) -> TeacherEnsemble:
    """The frozen ensemble on the run's device, in its memory format."""
    teachers = teachers.to(precision.device)
    return teachers.to(memory_format=torch.channels_last) if precision.channels_last else teachers


def store_mismatch(store: TeacherStore, cfg, data: DataBundle, precision: Precision) -> Optional[str]:
    """Why a given store cannot serve this run, or None (the teachers' manifest is compared where
    the run can read it: on a cluster node without the teacher files the store's key stands)."""
    manifest = None
    if cfg.teachers and (Path(cfg.teachers) / MANIFEST).is_file():
        manifest = read_manifest(cfg.teachers)
    return mismatch(store, manifest, data, precision)


def teacher_view_epochs(cfg) -> tuple:
    """The train loader's epoch numbers in which the ensemble teaches (``set_epoch``'s values)."""
    plans = get_method(cfg.method).generations(cfg)
    return tuple(p.view_epoch(e) for p in plans if p.teacher != "previous" for e in range(cfg.epochs))


def open_teacher_store(cfg, *, data: Optional[DataBundle] = None, seeds=None, epochs=None, feats=None,
                       root=None, budget_gb: float = DEFAULT_BUDGET_GB, builder=None, device=None,
                       encoding: LogitEncoding = LogitEncoding(), log=print) -> Optional[TeacherStore]:
    """The teacher store of ``cfg``'s teachers, data, views and precision (that of ``device``, the
    trials' device type), its logits kept as ``encoding`` says, holding every view of ``seeds`` x
    ``epochs`` (default: the config's own); rows it lacks are computed and saved: by
    ``builder(ensemble, data, precision, feats)`` (a :data:`~kdray.teachers.store_fill.Builder`
    factory, e.g. a Ray Data pipeline) or else here. None for a method without teachers."""
    method_cls = get_method(cfg.method)
    if method_cls.min_teachers == 0 or not cfg.teachers:
        return None
    encoding.check()  # a bad option stops here, before the data and teachers load
    precision = Precision.for_config(cfg, torch.device(device) if device else pick_device(cfg))
    here = precision if builder is None else Precision(torch.device("cpu"), precision.use_amp, precision.channels_last)
    data = data or load_data(cfg)
    ensemble = on_device(load_teachers(cfg.teachers, data.classes), here)
    want_feats = method_cls.needs_teacher_feats(cfg) if feats is None else feats
    source = LiveTeacherOutputs(ensemble, here.autocast, want_feats)
    req = StoreRequest(Path(cfg.teachers), data, precision, tuple(seeds or (cfg.seed,)),
                       tuple(epochs or teacher_view_epochs(cfg)), want_feats, budget_gb,
                       root or None, encoding)
    build = builder(ensemble, data, precision, want_feats) if builder is not None else None
    return ensure_store(req, source, build=build, log=log)


class StoredTeacherOutputs:
    """Teacher outputs looked up by (sample, view); a pair the store lacks is computed by the live
    ensemble (``live()``, built on first need), so a run is exact whatever the store covers.
    ``images`` counts the images the teachers ran on in this process."""

    def __init__(self, store: TeacherStore, device, feats: bool, live: Callable[[], object]):
        if feats and not store.has_feats:
            raise ValueError("a store without feature maps cannot serve a method that needs them")
        self.store, self.device, self.feats, self._live_factory = store, torch.device(device), feats, live
        self._live = None
        self.images = 0

    @property
    def info(self) -> TeacherInfo:
        return self.store.info

    def __call__(self, x: torch.Tensor, keys: ViewKeys) -> dict:
        codes = keys.index.cpu().long() * self.store.view_count + keys.view.cpu().long()
        rows = self.store.lookup(codes)
        miss = rows < 0
        if miss.any():
            return self._with_live(x, rows, miss)
        return self._gather(rows)

    def _gather(self, rows: torch.Tensor) -> dict:
        logits = self.store.logits_of(rows, self.device).transpose(0, 1)
        feats = self.store.feats_of(rows, self.device) if self.feats else []
        return {"logits": logits, "feats": feats}

    def _with_live(self, x: torch.Tensor, rows: torch.Tensor, miss: torch.Tensor) -> dict:
        if self._live is None:
            self._live = self._live_factory()
        m = miss.to(x.device)
        live = self._live(x[m])
        self.images += int(miss.sum())
        out = self._gather(rows.clamp(min=0))
        out["logits"][:, m] = live["logits"].to(out["logits"].dtype)
        for f, lf in zip(out["feats"], live["feats"]):
            f[m] = lf.to(f.dtype)
        return out
