"""The teacher-output store: the frozen ensemble's outputs for the training views students see,
computed once and shared by every trial of a sweep, later sweeps and `kdray train` runs.

Views are replayable (:class:`kdray.data.ViewSpec`): sample i in epoch e is seen as view
``view_ids(seed, e, i)``, one of a finite set (crop offset x flip). A store row holds the teachers'
logits (and, when the budget allows, their last-stage feature maps) for one (sample, view) pair;
``index[i, v]`` is that pair's row or -1. Teacher and student always see the same view: a store
row is the output the live ensemble would give for it, so the maths does not change.

A store lives in ``<root>/<key digest>/`` (root: the teacher set's ``stores/`` unless given) as
``store.pt`` (tensors, loaded with ``weights_only=True``) and ``meta.json`` (its key, sha256,
coverage, size and build time), both written atomically; the sha256 is checked on load. Its key is
everything the outputs depend on: the teacher files' sha256, the train split's bytes, the view set
and the precision they were computed in.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from kdray.core.errors import KdrayError
from kdray.data.sources import DataBundle, ViewKeys, ViewSpec, normalisation, to_float
from kdray.distill.base import TeacherInfo
from kdray.train.checkpoint import atomic_save, sha256_file

STORE_FILE, META_FILE, STORES = "store.pt", "meta.json", "stores"
DEFAULT_BUDGET_GB = 4.0
FORMAT = 1


# ---------------------------------------------------------------------------------------------
# the key: everything a stored output depends on
# ---------------------------------------------------------------------------------------------
def data_fingerprint(data: DataBundle) -> str:
    """The train split's images and labels, in order (row i of a store is train sample i)."""
    h = hashlib.blake2b(digest_size=16)
    for t in (data.train.x, data.train.y):
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().cpu().numpy().tobytes())
    h.update(repr((tuple(data.mean), tuple(data.std))).encode())
    return h.hexdigest()


def store_key(manifest: dict, data: DataBundle, views: ViewSpec, precision) -> dict:
    return {
        "format": FORMAT,
        "teachers": [t.get("sha256") for t in manifest["teachers"]],
        "dataset": data.name,
        "train": data_fingerprint(data),
        "image_size": data.image_size,
        "views": views.to_dict(),
        "precision": precision_key(precision),
    }


def precision_key(precision) -> dict:
    return {"device": precision.device.type, "bf16": bool(precision.use_amp),
            "channels_last": bool(precision.channels_last)}


def mismatch(store: "TeacherStore", manifest: Optional[dict], data: DataBundle, precision) -> Optional[str]:
    """Why ``store`` cannot serve a run on ``data`` in ``precision`` (None when it can): another
    data set, split, view set, precision or teacher set gives other outputs, or other rows."""
    key = store.key
    views = ViewSpec(data.crop_padding, data.hflip)
    want = {"dataset": data.name, "image_size": data.image_size, "views": views.to_dict(),
            "precision": precision_key(precision)}
    for name, value in want.items():
        if key.get(name) != value:
            return f"{name} {key.get(name)} in the store, {value} in this run"
    if tuple(store.index.shape) != (len(data.train.y), views.count) or key.get("train") != data_fingerprint(data):
        return "it was built for another train split"
    if manifest is not None and key.get("teachers") != [t.get("sha256") for t in manifest["teachers"]]:
        return "it was built for other teachers"
    return None


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# which (sample, view) pairs a run needs
# ---------------------------------------------------------------------------------------------
def pair_codes(n: int, views: ViewSpec, seeds, epochs) -> torch.Tensor:
    """Sorted unique codes ``i * views.count + v`` of the pairs ``seeds`` x ``epochs`` visit."""
    idx = torch.arange(n)
    if not views.augments:
        return idx
    codes = [idx * views.count + views.view_ids(s, e, idx) for s in seeds for e in epochs]
    return torch.unique(torch.cat(codes))


# ---------------------------------------------------------------------------------------------
# the store in memory
# ---------------------------------------------------------------------------------------------
@dataclass
class TeacherStore:
    key: dict
    info: TeacherInfo
    index: torch.Tensor  # int32 [N, V]: row of (sample, view) or -1
    logits: torch.Tensor  # [R, K, C]
    feats: Optional[list] = None  # per teacher [R, C_k, H_k, W_k], or None: feature maps online
    meta: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.logits.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list:
        return [self.index, self.logits] + list(self.feats or [])

    def missing(self, codes: torch.Tensor) -> torch.Tensor:
        return codes[self.index.view(-1)[codes] < 0] if len(codes) else codes

    def stored_codes(self) -> torch.Tensor:
        return torch.nonzero(self.index.view(-1) >= 0).view(-1)

    def covers(self, codes: torch.Tensor) -> bool:
        return len(self.missing(codes)) == 0

    def describe(self) -> str:
        """One line for logs and the MLflow tag ``kdray.teacher_store``."""
        what = "logits and feature maps" if self.feats is not None else "logits (feature maps online)"
        return f"{self.meta.get('digest', '(in memory)')}: {what}, {self.coverage()}, {self.nbytes / 1024**2:.1f} MB"

    def coverage(self) -> str:
        total = self.index.numel()
        return f"{self.rows}/{total} views ({100.0 * self.rows / max(total, 1):.1f}%)"

    def add(self, codes: torch.Tensor, logits: torch.Tensor, feats: Optional[list]) -> None:
        """Append rows for ``codes`` (pairs not yet stored)."""
        if len(logits) != len(codes) or (self.feats is not None and (feats is None or len(feats[0]) != len(codes))):
            raise ValueError("teacher store: rows to add do not match their codes (logits and feature maps)")
        start = self.rows
        self.index.view(-1)[codes] = torch.arange(start, start + len(codes), dtype=torch.int32)
        self.logits = torch.cat([self.logits, logits.to(self.logits.dtype)])
        if self.feats is not None:
            self.feats = [torch.cat([a, b.to(a.dtype)]) for a, b in zip(self.feats, feats)]

    def to_arrays(self) -> dict:
        """Numpy arrays for Ray's object store (read zero-copy by every trial on a node)."""
        return {"key": self.key, "info": [self.info.count, list(self.info.feat_channels)], "meta": self.meta,
                "tensors": [t.numpy() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy()
                            for t in self._tensors()],
                "dtypes": [str(t.dtype) for t in self._tensors()], "feats": self.feats is not None}

    @classmethod
    def from_arrays(cls, obj: dict) -> "TeacherStore":
        import warnings

        tensors = []
        with warnings.catch_warnings():  # the object store's arrays are read-only; rows are only read
            warnings.simplefilter("ignore", UserWarning)
            for a, dt in zip(obj["tensors"], obj["dtypes"]):
                t = torch.from_numpy(a)
                tensors.append(t.view(torch.bfloat16) if dt == "torch.bfloat16" else t)
        feats = tensors[2:] if obj["feats"] else None
        return cls(obj["key"], _info(obj["info"]), tensors[0], tensors[1], feats, obj["meta"])


def _info(raw) -> TeacherInfo:
    return TeacherInfo(int(raw[0]), tuple(int(c) for c in raw[1]))


def empty_store(key: dict, info: TeacherInfo, n: int, views: ViewSpec, sample: dict, feats: bool) -> TeacherStore:
    """No rows yet; ``sample``: one teacher output (logits [K,1,C], feats) fixing shapes and dtypes."""
    logits = sample["logits"][:, :0].transpose(0, 1).contiguous()
    fmaps = [f[:0].clone() for f in sample["feats"]] if feats else None
    index = torch.full((n, views.count), -1, dtype=torch.int32)
    return TeacherStore(key, info, index, logits, fmaps)


# ---------------------------------------------------------------------------------------------
# computing rows
# ---------------------------------------------------------------------------------------------
def view_batch(data: DataBundle, views: ViewSpec, codes: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The normalised float images of pairs ``codes``, exactly as the train loader makes them."""
    idx, v = codes // views.count, codes % views.count
    x = data.train.x.index_select(0, idx)
    if views.augments:
        x = views.apply(x, v)
    return to_float(x, *normalisation(data.mean, data.std), channels_last)


def compute_rows(source, data: DataBundle, views: ViewSpec, codes: torch.Tensor, channels_last: bool,
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
# budget, disk and files
# ---------------------------------------------------------------------------------------------
def row_bytes(sample: dict, feats: bool) -> tuple[int, int]:
    """(bytes of one row's logits, bytes of its feature maps)."""
    lg = sample["logits"]
    fb = sum(f[0].numel() * f.element_size() for f in sample["feats"]) if feats else 0
    return lg.shape[0] * lg.shape[2] * lg.element_size(), fb


def _gb(n: float) -> str:
    return f"{n / 1024**3:.2f} GB" if n >= 1024**3 / 100 else f"{n / 1024**2:.1f} MB"


def plan_features(rows: int, index_bytes: int, sample: dict, want_feats: bool, budget_gb: float) -> bool:
    """Whether feature maps are stored; KdrayError when not even the logits fit ``budget_gb``."""
    lb, fb = row_bytes(sample, want_feats)
    budget = budget_gb * 1024**3
    need = rows * lb + index_bytes
    if need > budget:
        raise KdrayError(
            f"teacher store: {rows} views x {lb} bytes of logits = {_gb(need)} exceeds the budget of {budget_gb:g} GB; "
            "raise --teacher-store-budget or pass --no-teacher-store (teachers run live on every batch)")
    return want_feats and need + rows * fb <= budget


def check_disk(root: Path, nbytes: int) -> None:
    """KdrayError when ``root`` has too little room for ``nbytes``; a folder that cannot be made
    (read-only) is left to :func:`save`, which keeps the store in memory."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
    except OSError:
        return
    if nbytes * 2 > free:  # the new file is written beside the old one before the rename
        raise KdrayError(f"teacher store: {_gb(nbytes)} to write at {root} but only {_gb(free)} free; "
                         "free space, point --teacher-store elsewhere or pass --no-teacher-store")


def save(store: TeacherStore, folder: Path, build_s: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    check_disk(folder, store.nbytes)
    payload = {"index": store.index, "logits": store.logits, "feats": store.feats}
    atomic_save(payload, folder / STORE_FILE)
    store.meta = {
        "key": store.key, "digest": key_digest(store.key), "sha256": sha256_file(folder / STORE_FILE),
        "info": [store.info.count, list(store.info.feat_channels)], "rows": store.rows, "views": int(store.index.numel()),
        "feats": store.feats is not None, "bytes": store.nbytes,
        "build_s": round(float(store.meta.get("build_s", 0.0)) + build_s, 2),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = folder / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(store.meta, indent=1))
    os.replace(tmp, folder / META_FILE)


def read_meta(folder: Path) -> Optional[dict]:
    try:
        return json.loads((Path(folder) / META_FILE).read_text())
    except (OSError, ValueError):
        return None


class StoreCorrupt(KdrayError):
    pass


def load(folder: Path) -> Optional[TeacherStore]:
    """The store in ``folder``, verified against its meta (the bytes hashed are the bytes loaded);
    None when there is none; :class:`StoreCorrupt` when it does not verify."""
    import io

    meta = read_meta(folder)
    file = Path(folder) / STORE_FILE
    if meta is None or not file.is_file():
        return None
    raw = file.read_bytes()
    if hashlib.sha256(raw).hexdigest() != meta.get("sha256"):
        raise StoreCorrupt(f"teacher store: {file} does not verify (its sha256 does not match {META_FILE})")
    try:  # tensors only: a file holding other Python objects is refused, never run
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StoreCorrupt(f"teacher store: {file} was refused ({type(exc).__name__}: it is unreadable or holds "
                           "more than tensors)") from None
    return TeacherStore(meta["key"], _info(meta["info"]), obj["index"], obj["logits"], obj["feats"], meta)


def _load_or_rebuild(folder: Path, log) -> Optional[TeacherStore]:
    """A store that does not verify (a crash between its two files, a damaged disk) is kdray's own
    derived data: it is rebuilt, with a line saying so."""
    try:
        return load(folder)
    except StoreCorrupt as exc:
        log(f"{exc}; rebuilding it")
        return None


def list_stores(root: Path) -> list[dict]:
    """Meta of every store under ``root`` (for `kdray teachers show`)."""
    root = Path(root)
    metas = [read_meta(d) for d in sorted(root.iterdir())] if root.is_dir() else []
    return [dict(m, path=str(root / m["digest"])) for m in metas if m and "digest" in m]


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
    def views(self) -> ViewSpec:
        return ViewSpec(self.data.crop_padding, self.data.hflip)

    def folder(self, key: dict) -> Path:
        return Path(self.root or Path(self.teachers_dir) / STORES) / key_digest(key)


Builder = Callable[[torch.Tensor, Callable[[int, int], None]], tuple]


def ensure_store(req: StoreRequest, source, build: Optional[Builder] = None, log=print) -> TeacherStore:
    """The store for ``req``, with every pair it needs; missing rows computed (by ``build(codes,
    progress)``, default: ``source`` in this process) and saved. ``source`` is the live ensemble.
    A store without feature maps is rebuilt with them when a run needs them and the budget allows."""
    from kdray.teachers.ensemble import read_manifest

    views = req.views
    key = store_key(read_manifest(req.teachers_dir), req.data, views, req.precision)
    folder = req.folder(key)
    store = _load_or_rebuild(folder, log)
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
        log(f"teacher store: {folder} covers the run ({store.coverage()}, {_gb(store.nbytes)})")
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
    log(f"teacher store: built in {build_s:.1f} s; {store.coverage()}, {_gb(store.nbytes)}"
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


# ---------------------------------------------------------------------------------------------
# the engine's source of teacher outputs, from a store
# ---------------------------------------------------------------------------------------------
class StoredTeacherOutputs:
    """Teacher outputs looked up by (sample, view); a pair the store lacks is computed by the live
    ensemble (``live()``, built on first need), so a run is exact whatever the store covers.
    ``images`` counts the images the teachers ran on in this process."""

    def __init__(self, store: TeacherStore, device, feats: bool, live: Callable[[], object]):
        if feats and store.feats is None:
            raise ValueError("a store without feature maps cannot serve a method that needs them")
        self.store, self.device, self.feats, self._live_factory = store, torch.device(device), feats, live
        self._live = None
        self.images = 0

    @property
    def info(self) -> TeacherInfo:
        return self.store.info

    def __call__(self, x: torch.Tensor, keys: ViewKeys) -> dict:
        codes = keys.index.cpu() * self.store.index.shape[1] + keys.view.cpu()
        rows = self.store.index.view(-1)[codes].long()
        miss = rows < 0
        if miss.any():
            return self._with_live(x, rows, miss)
        return self._gather(rows)

    def _gather(self, rows: torch.Tensor) -> dict:
        logits = self.store.logits.index_select(0, rows).transpose(0, 1)
        feats = [f.index_select(0, rows).to(self.device) for f in self.store.feats] if self.feats else []
        return {"logits": logits.to(self.device), "feats": feats}

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
