"""Completing a teacher store: which (sample, view) rows a run or sweep needs, whether logits and
feature maps fit the budget and the disk, the missing rows computed (here, or by a builder such
as a Ray Data pipeline) and the store saved; read-only folders keep it in memory for the run."""

from __future__ import annotations

import errno
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from kdray.core.errors import KdrayError
from kdray.core.guards import held_exclusively
from kdray.data.access import train_view_images
from kdray.data.bundle import DataBundle
from kdray.data.views import normalisation, to_float
from kdray.teachers.store import (
    DEFAULT_BUDGET_GB,
    FORMAT,
    STORES,
    TeacherStore,
    empty_store,
    gb,
    key_digest,
    pair_codes,
    store_key,
)
from kdray.teachers.store_codec import CODE_BYTES, LogitCodec, LogitEncoding
from kdray.teachers.store_files import check_disk, load_or_rebuild, outdated_stores, save
from kdray.teachers.store_remote import pull, push, remote_folder, store_root


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
def row_bytes(sample: dict, codec: LogitCodec, feats: bool) -> tuple[int, int]:
    """(bytes of one row's encoded logits and its code in the index, bytes of its feature maps)."""
    fb = sum(f[0].numel() * f.element_size() for f in sample["feats"]) if feats else 0
    return CODE_BYTES + codec.row_bytes(sample["logits"].shape[0]), fb


def plan_features(rows: int, codec: LogitCodec, sample: dict, want_feats: bool, budget_gb: float) -> bool:
    """Whether feature maps are stored; KdrayError when not even the logits fit ``budget_gb``."""
    lb, fb = row_bytes(sample, codec, want_feats)
    budget = budget_gb * 1024**3
    need = rows * lb
    if need > budget:
        raise KdrayError(
            f"teacher store: {rows} views x {lb} bytes ({codec.describe()}) = {gb(need)} exceeds the budget of "
            f"{budget_gb:g} GB; raise --teacher-store-budget, choose a smaller --teacher-store-logits (fp16, topk) "
            "or pass --no-teacher-store (teachers run live on every batch)")
    return want_feats and need + rows * fb <= budget


# ---------------------------------------------------------------------------------------------
# ensure: open the store of a key and add the rows a run or sweep needs
# ---------------------------------------------------------------------------------------------
@dataclass
class StoreRequest:
    """What a run or sweep needs: the teacher set, the data, the views of ``seeds`` x ``epochs``,
    and how the store keeps logits (``encoding``: part of its key)."""

    teachers_dir: Path
    data: DataBundle
    precision: object
    seeds: tuple
    epochs: tuple
    feats: bool = False
    budget_gb: float = DEFAULT_BUDGET_GB
    root: Optional[Union[Path, str]] = None  # a folder or a URI (None: the teacher set's stores/)
    encoding: LogitEncoding = LogitEncoding()

    @property
    def views(self):
        return self.data.views

    @property
    def root_dir(self) -> Path:
        """The local folder of the stores (for a URI: this node's mirror of it)."""
        return store_root(self.root)[0] or Path(self.teachers_dir) / STORES

    def folder(self, key: dict) -> Path:
        return self.root_dir / key_digest(key)

    def remote(self, key: dict) -> Optional[tuple]:
        """(URI root, digest) when the stores live at a URI."""
        uri = store_root(self.root)[1]
        return (uri, key_digest(key)) if uri else None


@dataclass(frozen=True)
class StoreChoice:
    """``--teacher-store DIR|auto`` with its logit encoding, as one value: what ``kdray train`` hands
    through :func:`kdray.api.train`'s ``teacher_store`` argument to the run's ``open_store`` (a
    plain folder or "auto" there means encoding auto)."""

    root: str
    encoding: LogitEncoding = LogitEncoding()

    @classmethod
    def of(cls, value) -> Optional["StoreChoice"]:
        if not value:
            return None
        return value if isinstance(value, StoreChoice) else cls(str(value))


Builder = Callable[[torch.Tensor, Callable[[int, int], None]], tuple]
BUILD_CHUNK_BYTES = 2 * 1024**3  # fp32 logits one build call returns at most: bounds a build's memory


def ensure_store(req: StoreRequest, source, build: Optional[Builder] = None, log=print) -> TeacherStore:
    """The store for ``req``, with every pair it needs; missing rows computed (by ``build(codes,
    progress)``, default: ``source`` in this process) and saved. ``source`` is the live ensemble.
    A store without feature maps is rebuilt with them when a run needs them and the budget allows."""
    from kdray.teachers.manifest import read_manifest

    codes = pair_codes(len(req.data.train.y), req.views, req.seeds, req.epochs)
    sample = source(view_batch(req.data, req.views, codes[:1], req.precision.channels_last).to(source.device))
    codec = req.encoding.resolve(int(sample["logits"].shape[-1]), sample["logits"].dtype)
    key = store_key(read_manifest(req.teachers_dir), req.data, req.views, req.precision, codec)
    folder, remote = req.folder(key), req.remote(key)
    # one build of a store at a time on this machine: a save removes the shard files its meta does
    # not name, and two drivers extending one store (two sweeps over one teacher set) would remove
    # each other's new shards; the second waits, then finds the rows the first computed
    with held_exclusively(folder.parent / ".locks" / f"{folder.name}.lock",
                          lambda: log(f"teacher store: waiting for another kdray process building {folder}")):
        return _fill(req, key, codec, folder, remote, codes, sample, source, build, log)


def _fill(req: StoreRequest, key: dict, codec: LogitCodec, folder: Path, remote, codes: torch.Tensor, sample: dict,
          source, build: Optional[Builder], log) -> TeacherStore:
    """The store in ``folder`` (pulled from ``remote`` first) with every pair of ``codes``: what is
    missing computed and saved."""
    if remote and (fetched := pull(remote_folder(*remote), folder)):
        log(f"teacher store: fetched {fetched} shard(s) from {remote_folder(*remote)} into {folder}")
    store, codes = _open(req, key, folder, codes, sample, source.info, log)
    store.remote = remote
    todo = store.missing(codes)
    if len(todo) == 0:
        log(f"teacher store: {folder} covers the run ({store.coverage()}, {gb(store.nbytes)})")
        return store
    if store.has_feats and not plan_features(store.rows + len(todo), codec, sample, True, req.budget_gb):
        log("teacher store: feature maps for the added views do not fit the budget; they are computed online")
        store.drop_feats()
    lb, fb = row_bytes(sample, codec, store.has_feats)
    check_disk(folder.parent, len(todo) * (lb + fb))  # before the teachers run, not after
    log(f"teacher store: computing {len(todo)} views x {source.info.count} teachers ({codec.describe()}) into "
        f"{folder}")
    saver = _Saver(folder, remote, log)
    _compute_into(store, todo, source, req, build, saver, log)
    saver.finish(store)
    return store


def _open(req: StoreRequest, key: dict, folder: Path, codes: torch.Tensor, sample: dict, info, log) -> tuple:
    """The store in ``folder`` (or a new empty one), with feature maps as the request and budget
    allow, and the codes it must hold (a store rebuilt to add feature maps keeps all its views)."""
    store = load_or_rebuild(folder, log)
    codec = LogitCodec.from_key(key["logits"])
    if store is None:
        for old in outdated_stores(req.root_dir, key):
            log(f"teacher store: {old['path']} is in format {old['key'].get('format')} (this kdray writes format "
                f"{FORMAT}: a sparse index and encoded logits); building a new store (the old folder can be deleted)")
    if store is not None and store.has_feats and not req.feats and len(store.missing(codes)):
        # this run's source computes no feature maps: new rows would have logits only
        log("teacher store: keeping logits only (this run adds views without computing feature maps)")
        store.drop_feats()
    if store is not None and req.feats and not store.has_feats:
        codes = torch.unique(torch.cat([codes, store.codes]))
        if plan_features(len(codes), codec, sample, True, req.budget_gb):
            log("teacher store: adding feature maps (the store held logits only); recomputing its views")
            store = None
    if store is None:
        feats = plan_features(len(codes), codec, sample, req.feats, req.budget_gb)
        store = empty_store(key, info, len(req.data.train.y), req.views, feats)
    if req.feats and not store.has_feats:
        log("teacher store: feature maps do not fit the budget; they are computed online")
    return store, codes


def _compute_into(store: TeacherStore, todo: torch.Tensor, source, req: StoreRequest, build: Optional[Builder],
                  saver: "_Saver", log) -> None:
    """Rows of ``todo`` computed in chunks of at most BUILD_CHUNK_BYTES of fp32 logits, each encoded
    into a shard and saved as it comes (a build holds one chunk's rows at a time, and one stopped
    half-way keeps the shards it saved)."""
    progress = _progress_line(len(todo), log)
    step = max(1, BUILD_CHUNK_BYTES // (4 * store.info.count * store.codec.classes))
    for s in range(0, len(todo), step):
        part = todo[s : s + step]
        if build is None:
            logits, feats = compute_rows(source, req.data, req.views, part, req.precision.channels_last)
        else:
            logits, feats = build(part, lambda done, _total, base=s: progress(base + done, len(todo)))
        store.add(part, logits, feats if store.has_feats else None)
        store.compact()
        saver.save(store)
        progress(s + len(part), len(todo))


class _Saver:
    """Saves a growing store after each chunk; a folder that cannot be written keeps the store in
    memory for this run (said once); a full disk is raised (kdray's disk-full line), never hidden."""

    def __init__(self, folder: Path, remote: Optional[tuple], log):
        self.folder, self.remote, self.log = folder, remote, log
        self.writable = True
        self.t0 = self.last = time.perf_counter()

    def save(self, store: TeacherStore) -> None:
        if not self.writable:
            return
        now = time.perf_counter()
        try:
            save(store, self.folder, now - self.last)
        except (PermissionError, OSError) as exc:  # e.g. a read-only teacher set: the store serves from memory
            if getattr(exc, "errno", None) == errno.ENOSPC:
                raise
            self.writable = False
            store.meta = {"digest": key_digest(store.key)}
            self.log(f"teacher store: cannot write {self.folder} ({exc.strerror}); kept in memory for this run "
                     "only (--teacher-store DIR puts stores elsewhere)")
        if self.writable and self.remote:
            push(store, self.folder, remote_folder(*self.remote))
        self.last = now

    def finish(self, store: TeacherStore) -> None:
        build_s = time.perf_counter() - self.t0
        if not self.writable:
            store.meta["build_s"] = round(build_s, 2)
            return
        self.log(f"teacher store: built in {build_s:.1f} s; {store.coverage()}, {gb(store.nbytes)} in "
                 f"{len(store.shards)} shard(s){', feature maps stored' if store.has_feats else ', logits only'}")


def _progress_line(total: int, log) -> Callable[[int, int], None]:
    t0 = time.perf_counter()
    last = [0.0, -1]  # when, and at what count, the last line was printed

    def progress(done: int, _total: int) -> None:
        now = time.perf_counter()
        if done == last[1] or (done < total and now - last[0] < 5):
            return
        last[:] = [now, done]
        rate = done / max(now - t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else math.inf
        log(f"teacher store: {done}/{total} views ({100.0 * done / total:.0f}%), ETA {eta:.0f} s")

    return progress
