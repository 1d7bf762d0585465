"""The teacher-output store: the frozen ensemble's outputs for the training views students see,
computed once and shared by every trial of a sweep, later sweeps and `kdray train` runs.

Views are replayable (:class:`kdray.data.views.ViewSpec`, :class:`kdray.data.resized_crop.ResizedCropViews`):
sample i in epoch e is seen as view ``view_ids(seed, e, i)``, one of V per sample. A store row holds
the teachers' logits (encoded as the store's key says: :mod:`kdray.teachers.store_codec`) and, when
the budget allows, their last-stage feature maps, for one (sample, view) pair; the rows are sorted by
the pair's code ``i * V + v``, found by binary search (nothing is dense in samples x views: an
ImageNet-sized dense index alone would take 33 GB). Teacher and student always see the same view: a
row is the output the live ensemble gives for it, so the maths does not change (with an exact
encoding; a lossy one is bounded as its docstring says).

A store lives in ``<root>/<key digest>/`` (root: the teacher set's ``stores/`` unless given) as
``store.pt`` (tensors, loaded with ``weights_only=True``) and ``meta.json`` (its key, sha256,
coverage, size and build time), both written atomically; the sha256 is checked on load. Its key is
everything the outputs depend on: the teacher files' sha256, the train split's bytes, the view set,
the precision they were computed in, and the logits' encoding. Format 1 (a dense index) is not
read: its stores are rebuilt, with a line saying so.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from kdray.core.errors import KdrayError
from kdray.core.io import atomic_save, atomic_write, sha256_file
from kdray.data.bundle import DataBundle
from kdray.data.views import ViewSpec
from kdray.distill.base import TeacherInfo
from kdray.teachers.store_codec import LogitCodec

STORE_FILE, META_FILE, STORES = "store.pt", "meta.json", "stores"
DEFAULT_BUDGET_GB = 4.0
FORMAT = 2  # 2: sparse sorted codes, encoded logits (1: a dense int32 index [N, V], raw logits)


# ---------------------------------------------------------------------------------------------
# the key: everything a stored output depends on
# ---------------------------------------------------------------------------------------------
def data_fingerprint(data: DataBundle) -> str:
    """The train split's images and labels, in order (row i of a store is train sample i)."""
    if data.fingerprint:  # a catalogued set: its files and split, without hashing every pixel
        return f"{data.fingerprint}|{data.mean}|{data.std}"
    h = hashlib.blake2b(digest_size=16)
    for t in (data.train.x, data.train.y):
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().cpu().numpy().tobytes())
    h.update(repr((tuple(data.mean), tuple(data.std))).encode())
    return h.hexdigest()


def store_key(manifest: dict, data: DataBundle, views, precision, codec: LogitCodec) -> dict:
    return {
        "format": FORMAT,
        "teachers": [t.get("sha256") for t in manifest["teachers"]],
        "dataset": data.name,
        "train": data_fingerprint(data),
        "image_size": data.image_size,
        "views": views.to_dict(),
        "precision": precision_key(precision),
        "logits": codec.key(),
    }


def precision_key(precision) -> dict:
    return {"device": precision.device.type, "bf16": bool(precision.use_amp),
            "channels_last": bool(precision.channels_last)}


def mismatch(store: "TeacherStore", manifest: Optional[dict], data: DataBundle, precision) -> Optional[str]:
    """Why ``store`` cannot serve a run on ``data`` in ``precision`` (None when it can): another
    data set, split, view set, precision or teacher set gives other outputs, or other rows."""
    key = store.key
    views = data.views
    want = {"dataset": data.name, "image_size": data.image_size, "views": views.to_dict(),
            "precision": precision_key(precision)}
    for name, value in want.items():
        if key.get(name) != value:
            return f"{name} {key.get(name)} in the store, {value} in this run"
    shape = (len(data.train.y), views.count)
    if (store.samples, store.view_count) != shape or key.get("train") != data_fingerprint(data):
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
    """Rows of teacher outputs, sorted by pair code: row r holds pair ``codes[r]`` (``sample * V +
    view``), its logits encoded as ``parts`` say (:mod:`kdray.teachers.store_codec`, the key's
    ``logits``). Nothing is dense in samples x views: a lookup is a binary search of ``codes``."""

    key: dict
    info: TeacherInfo
    codes: torch.Tensor  # int64 [R], sorted, unique
    parts: dict  # the encoded logits: name -> [R, ...]
    samples: int  # N: train samples
    view_count: int  # V: views per sample
    feats: Optional[list] = None  # per teacher [R, C_k, H_k, W_k], or None: feature maps online
    meta: dict = field(default_factory=dict)

    @property
    def codec(self) -> LogitCodec:
        return LogitCodec.from_key(self.key["logits"])

    @property
    def rows(self) -> int:
        return int(self.codes.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list:
        return [self.codes] + [self.parts[n] for n in sorted(self.parts)] + list(self.feats or [])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """The row of each pair code (int64), -1 where the store lacks it."""
        codes = codes.long()
        pos = torch.searchsorted(self.codes, codes).clamp_(max=max(self.rows - 1, 0))
        hit = self.codes[pos] == codes if self.rows else torch.zeros_like(codes, dtype=torch.bool)
        return torch.where(hit, pos, torch.full_like(pos, -1))

    def missing(self, codes: torch.Tensor) -> torch.Tensor:
        return codes[self.lookup(codes) < 0] if len(codes) else codes

    def stored_codes(self) -> torch.Tensor:
        return self.codes

    def covers(self, codes: torch.Tensor) -> bool:
        return len(self.missing(codes)) == 0

    def logits_of(self, rows: torch.Tensor, device=None) -> torch.Tensor:
        """``[len(rows), K, C]`` logits of stored ``rows`` on ``device`` (see :meth:`LogitCodec.decode`)."""
        return self.codec.decode(self.parts, rows, device)

    def describe(self) -> str:
        """One line for logs and the MLflow tag ``kdray.teacher_store``."""
        what = self.codec.describe() + (" and feature maps" if self.feats is not None else " (feature maps online)")
        return f"{self.meta.get('digest', '(in memory)')}: {what}, {self.coverage()}, {gb(self.nbytes)}"

    def coverage(self) -> str:
        total = self.samples * self.view_count  # a number: never allocated
        return f"{self.rows}/{total} views ({100.0 * self.rows / max(total, 1):.1f}%)"

    def add(self, codes: torch.Tensor, logits: torch.Tensor, feats: Optional[list]) -> None:
        """Merge rows for ``codes`` (pairs not yet stored; ``logits`` [R,K,C] encoded here) into
        code order."""
        if len(logits) != len(codes) or (self.feats is not None and (feats is None or len(feats[0]) != len(codes))):
            raise ValueError("teacher store: rows to add do not match their codes (logits and feature maps)")
        codes, order = torch.sort(codes.long())
        if len(codes) and ((codes[1:] == codes[:-1]).any() or (self.lookup(codes) >= 0).any()):
            raise ValueError("teacher store: rows to add repeat a pair or one already stored")
        pos_old = torch.arange(self.rows) + torch.searchsorted(codes, self.codes)
        pos_new = torch.arange(len(codes)) + torch.searchsorted(self.codes, codes)
        merged = self.codec.encode(logits.index_select(0, order))
        self.codes = _place(self.codes, codes, pos_old, pos_new)
        self.parts = {n: _place(t, merged[n], pos_old, pos_new) for n, t in self.parts.items()}
        if self.feats is not None:
            self.feats = [_place(a, b.index_select(0, order).to(a.dtype), pos_old, pos_new)
                          for a, b in zip(self.feats, feats)]

    def to_arrays(self) -> dict:
        """Numpy arrays for Ray's object store (read zero-copy by every trial on a node)."""
        tensors = self._tensors()
        return {"key": self.key, "info": [self.info.count, list(self.info.feat_channels)], "meta": self.meta,
                "shape": [self.samples, self.view_count], "parts": sorted(self.parts),
                "tensors": [t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy() for t in tensors],
                "dtypes": [str(t.dtype) for t in tensors], "feats": self.feats is not None}

    @classmethod
    def from_arrays(cls, obj: dict) -> "TeacherStore":
        import warnings

        tensors = []
        with warnings.catch_warnings():  # the object store's arrays are read-only; rows are only read
            warnings.simplefilter("ignore", UserWarning)
            for a, dt in zip(obj["tensors"], obj["dtypes"]):
                t = torch.from_numpy(a)
                tensors.append(t.view(torch.bfloat16) if dt == "torch.bfloat16" else t)
        names = obj["parts"]
        parts = dict(zip(names, tensors[1 : 1 + len(names)]))
        feats = tensors[1 + len(names):] if obj["feats"] else None
        return cls(obj["key"], _info(obj["info"]), tensors[0], parts, *obj["shape"], feats, obj["meta"])


def _place(old: torch.Tensor, new: torch.Tensor, pos_old: torch.Tensor, pos_new: torch.Tensor) -> torch.Tensor:
    """``old`` and ``new`` rows interleaved: row i of old at ``pos_old[i]``, of new at ``pos_new[i]``."""
    out = old.new_empty((len(old) + len(new), *old.shape[1:]))
    out[pos_old] = old
    out[pos_new] = new.to(old.dtype)
    return out


def _info(raw) -> TeacherInfo:
    return TeacherInfo(int(raw[0]), tuple(int(c) for c in raw[1]))


def empty_store(key: dict, info: TeacherInfo, n: int, views, sample: dict, feats: bool) -> TeacherStore:
    """No rows yet; ``sample``: one teacher output (logits [K,1,C], feats) fixing the feature maps'
    shapes and dtypes (the logits' come from the key's encoding)."""
    codec = LogitCodec.from_key(key["logits"])
    fmaps = [f[:0].clone() for f in sample["feats"]] if feats else None
    return TeacherStore(key, info, torch.empty(0, dtype=torch.int64), codec.empty(info.count), n, views.count, fmaps)


def gb(n: float) -> str:
    """``n`` bytes for a person: GB from 10 MB up, MB from 100 KB up, else KB."""
    if n >= 1024**3 / 100:
        return f"{n / 1024**3:.2f} GB"
    return f"{n / 1024**2:.1f} MB" if n >= 100 * 1024 else f"{n / 1024:.1f} KB"


def check_disk(root: Path, nbytes: int) -> None:
    """KdrayError when ``root`` has too little room for ``nbytes``; a folder that cannot be made
    (read-only) is left to :func:`save`, which keeps the store in memory."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
    except OSError:
        return
    if nbytes * 2 > free:  # the new file is written beside the old one before the rename
        raise KdrayError(f"teacher store: {gb(nbytes)} to write at {root} but only {gb(free)} free; "
                         "free space, point --teacher-store elsewhere or pass --no-teacher-store")


def save(store: TeacherStore, folder: Path, build_s: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    check_disk(folder, store.nbytes)
    payload = {"codes": store.codes, "parts": store.parts, "feats": store.feats,
               "shape": [store.samples, store.view_count]}
    atomic_save(payload, folder / STORE_FILE)
    store.meta = {
        "key": store.key, "digest": key_digest(store.key), "sha256": sha256_file(folder / STORE_FILE),
        "info": [store.info.count, list(store.info.feat_channels)], "rows": store.rows,
        "views": store.samples * store.view_count, "feats": store.feats is not None, "bytes": store.nbytes,
        "build_s": round(float(store.meta.get("build_s", 0.0)) + build_s, 2),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write(folder / META_FILE, json.dumps(store.meta, indent=1))


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
    if meta.get("key", {}).get("format") != FORMAT:
        raise StoreCorrupt(f"teacher store: {folder} is in format {meta.get('key', {}).get('format')}; this kdray "
                           f"reads format {FORMAT}")
    raw = file.read_bytes()
    if hashlib.sha256(raw).hexdigest() != meta.get("sha256"):
        raise StoreCorrupt(f"teacher store: {file} does not verify (its sha256 does not match {META_FILE})")
    try:  # tensors only: a file holding other Python objects is refused, never run
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StoreCorrupt(f"teacher store: {file} was refused ({type(exc).__name__}: it is unreadable or holds "
                           "more than tensors)") from None
    return TeacherStore(meta["key"], _info(meta["info"]), obj["codes"], obj["parts"], *obj["shape"], obj["feats"],
                        meta)


def load_or_rebuild(folder: Path, log) -> Optional[TeacherStore]:
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


def outdated_stores(root: Path, key: dict) -> list[dict]:
    """Stores under ``root`` of an older format for the same teachers, data and precision: a new
    format is a new key (another folder), so a run says it rebuilds them rather than ignoring them
    silently."""
    same = ("teachers", "dataset", "train", "image_size", "precision")
    return [m for m in list_stores(root)
            if m["key"].get("format") != FORMAT and all(m["key"].get(f) == key.get(f) for f in same)]
