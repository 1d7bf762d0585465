"""The teacher-output store: the frozen ensemble's outputs for the training views students see,
computed once and shared by every trial of a sweep, later sweeps and `kdray train` runs.

Views are replayable (:class:`kdray.data.views.ViewSpec`): sample i in epoch e is seen as view
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

STORE_FILE, META_FILE, STORES = "store.pt", "meta.json", "stores"
DEFAULT_BUDGET_GB = 4.0
FORMAT = 1


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


def store_key(manifest: dict, data: DataBundle, views, precision) -> dict:
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
    views = data.views
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


def gb(n: float) -> str:
    """``n`` bytes for a person: GB from 10 MB up, else MB."""
    return f"{n / 1024**3:.2f} GB" if n >= 1024**3 / 100 else f"{n / 1024**2:.1f} MB"


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
    payload = {"index": store.index, "logits": store.logits, "feats": store.feats}
    atomic_save(payload, folder / STORE_FILE)
    store.meta = {
        "key": store.key, "digest": key_digest(store.key), "sha256": sha256_file(folder / STORE_FILE),
        "info": [store.info.count, list(store.info.feat_channels)], "rows": store.rows,
        "views": int(store.index.numel()), "feats": store.feats is not None, "bytes": store.nbytes,
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
    raw = file.read_bytes()
    if hashlib.sha256(raw).hexdigest() != meta.get("sha256"):
        raise StoreCorrupt(f"teacher store: {file} does not verify (its sha256 does not match {META_FILE})")
    try:  # tensors only: a file holding other Python objects is refused, never run
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StoreCorrupt(f"teacher store: {file} was refused ({type(exc).__name__}: it is unreadable or holds "
                           "more than tensors)") from None
    return TeacherStore(meta["key"], _info(meta["info"]), obj["index"], obj["logits"], obj["feats"], meta)


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

