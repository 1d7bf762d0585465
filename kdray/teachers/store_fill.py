"""Completing a teacher store: which (sample, view) rows a run or sweep needs, whether logits and
feature maps fit the budget and the disk, the missing rows computed (here, or by a builder such
as Ray tasks) and the store saved; read-only folders keep it in memory for the run."""

from __future__ import annotations

import errno
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from kdray.core.errors import KdrayError
from kdray.data.access import train_view_images
from kdray.data.bundle import DataBundle
from kdray.data.views import normalisation, to_float
from kdray.teachers.store import (
    DEFAULT_BUDGET_GB,
    STORES,
    TeacherStore,
    check_disk,
    empty_store,
    gb,
    key_digest,
    load_or_rebuild,
    pair_codes,
    save,
    store_key,
)


# ---------------------------------------------------------------------------------------------
# computing rows
# ---------------------------------------------------------------------------------------------
def view_batch(data: DataBundle, views, codes: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The normalised float images of pairs ``codes``, exactly as the train loader makes them."""
    idx, v = codes // views.count, codes % views.count
    return to_float(train_view_images(data, idx, v), *normalisation(data.mean, data.std), channels_last)


def compute_rows(source, data: DataBundle, views, codes: torch.Tensor, channels_last: bool,
                 batch: int = 256) -> tuple:
    """Teacher outputs of ``codes`` in batches: (logits [R,K,C], feats per teacher or None)."""
    logits, feats = [], []
    for s in range(0, len(codes), batch):
        out = source(view_batch(data, views, codes[s : s + batch], channels_last).to(source.device))
        logits.append(out["logits"].transpose(0, 1).cpu())
        feats.append([f.cpu() for f in out["feats"]])
    fmaps = [torch.cat(list(fs)) for fs in zip(*feats)] if feats and feats[0] else None
    return torch.cat(logits), fmaps


# ---------------------------------------------------------------------------------------------
# the budget
# ---------------------------------------------------------------------------------------------
def row_bytes(sample: dict, feats: bool) -> tuple[int, int]:
    """(bytes of one row's logits, bytes of its feature maps)."""
    lg = sample["logits"]
    fb = sum(f[0].numel() * f.element_size() for f in sample["feats"]) if feats else 0
    return lg.shape[0] * lg.shape[2] * lg.element_size(), fb


def plan_features(rows: int, index_bytes: int, sample: dict, want_feats: bool, budget_gb: float) -> bool:
    """Whether feature maps are stored; KdrayError when not even the logits fit ``budget_gb``."""
    lb, fb = row_bytes(sample, want_feats)
    budget = budget_gb * 1024**3
    need = rows * lb + index_bytes
    if need > budget:
        raise KdrayError(
            f"teacher store: {rows} views x {lb} bytes of logits = {gb(need)} exceeds the budget of {budget_gb:g} GB; "
            "raise --teacher-store-budget or pass --no-teacher-store (teachers run live on every batch)")
    return want_feats and need + rows * fb <= budget


# ---------------------------------------------------------------------------------------------
# ensure: open the store of a key and add the rows a run or sweep needs
# ---------------------------------------------------------------------------------------------
@dataclass
class StoreRequest:
    """What a run or sweep needs: the teacher set, the data, the views of ``seeds`` x ``epochs``."""

    teachers_dir: Path
    data: DataBundle
    precision: object
    seeds: tuple
    epochs: tuple
    feats: bool = False
    budget_gb: float = DEFAULT_BUDGET_GB
    root: Optional[Path] = None

    @property
    def views(self):
        return self.data.views

    def folder(self, key: dict) -> Path:
        return Path(self.root or Path(self.teachers_dir) / STORES) / key_digest(key)


Builder = Callable[[torch.Tensor, Callable[[int, int], None]], tuple]


def ensure_store(req: StoreRequest, source, build: Optional[Builder] = None, log=print) -> TeacherStore:
    """The store for ``req``, with every pair it needs; missing rows computed (by ``build(codes,
    progress)``, default: ``source`` in this process) and saved. ``source`` is the live ensemble.
    A store without feature maps is rebuilt with them when a run needs them and the budget allows."""
    from kdray.teachers.manifest import read_manifest

    views = req.views
    key = store_key(read_manifest(req.teachers_dir), req.data, views, req.precision)
    folder = req.folder(key)
    store = load_or_rebuild(folder, log)
    codes = pair_codes(len(req.data.train.y), views, req.seeds, req.epochs)
    sample = source(view_batch(req.data, views, codes[:1], req.precision.channels_last).to(source.device))
    index_bytes = len(req.data.train.y) * views.count * 4
    if store is not None and store.feats is not None and not req.feats and len(store.missing(codes)):
        # this run's source computes no feature maps: new rows would have logits only
        log("teacher store: keeping logits only (this run adds views without computing feature maps)")
        store.feats = None
    if store is not None and req.feats and store.feats is None:
        codes = torch.unique(torch.cat([codes, store.stored_codes()]))
        if plan_features(len(codes), index_bytes, sample, True, req.budget_gb):
            log("teacher store: adding feature maps (the store held logits only); recomputing its views")
            store = None
    if store is None:
        feats = plan_features(len(codes), index_bytes, sample, req.feats, req.budget_gb)
        store = empty_store(key, source.info, len(req.data.train.y), views, sample, feats)
    if req.feats and store.feats is None:
        log("teacher store: feature maps do not fit the budget; they are computed online")
    todo = store.missing(codes)
    if len(todo) == 0:
        log(f"teacher store: {folder} covers the run ({store.coverage()}, {gb(store.nbytes)})")
        return store
    if store.feats is not None and not plan_features(store.rows + len(todo), index_bytes, sample, True, req.budget_gb):
        log("teacher store: feature maps for the added views do not fit the budget; they are computed online")
        store.feats = None
    lb, fb = row_bytes(sample, store.feats is not None)
    check_disk(folder.parent, store.nbytes + len(todo) * (lb + fb))  # before the teachers run, not after
    log(f"teacher store: computing {len(todo)} views x {source.info.count} teachers into {folder}")
    t0 = time.perf_counter()
    progress = _progress_line(len(todo), log)
    if build is None:
        logits, feats = compute_rows(source, req.data, views, todo, req.precision.channels_last)
        progress(len(todo), len(todo))
    else:
        logits, feats = build(todo, progress)
    store.add(todo, logits, feats)
    build_s = time.perf_counter() - t0
    try:
        save(store, folder, build_s)
    except (PermissionError, OSError) as exc:  # e.g. a read-only teacher set: the store serves this run from memory
        if getattr(exc, "errno", None) == errno.ENOSPC:  # no space: said (kdray's disk-full line), not hidden
            raise
        store.meta = {"digest": key_digest(key), "build_s": round(build_s, 2)}
        log(f"teacher store: cannot write {folder} ({exc.strerror}); kept in memory for this run only "
            "(--teacher-store DIR puts stores elsewhere)")
        return store
    log(f"teacher store: built in {build_s:.1f} s; {store.coverage()}, {gb(store.nbytes)}"
        f"{', feature maps stored' if store.feats is not None else ', logits only'}")
    return store


def _progress_line(total: int, log) -> Callable[[int, int], None]:
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done: int, _total: int) -> None:
        now = time.perf_counter()
        if done < total and now - last[0] < 5:
            return
        last[0] = now
        rate = done / max(now - t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else math.inf
        log(f"teacher store: {done}/{total} views ({100.0 * done / total:.0f}%), ETA {eta:.0f} s")

    return progress
