"""The teacher-output store: the frozen ensemble's outputs for the training views students see,
computed once and shared by every trial of a sweep, later sweeps and `kdray train` runs.

Views are replayable (:class:`kdray.data.views.ViewSpec`, :class:`kdray.data.resized_crop.ResizedCropViews`):
sample i in epoch e is seen as view ``view_ids(seed, e, i)``, one of V per sample. A store row holds
the teachers' logits (encoded as the store's key says: :mod:`kdray.teachers.store_codec`) and, when
the budget allows, their last-stage feature maps, for one (sample, view) pair, found by the pair's
code ``i * V + v``. Nothing is dense in samples x views (an ImageNet-sized dense index alone would
take 33 GB). Teacher and student always see the same view: a row is the output the live ensemble
gives for it, so the maths does not change (with an exact encoding; a lossy one is bounded as its
docstring says).

Rows live in **shards** (:class:`Shard`): each one block of rows sorted by code, written once and
never rewritten. A build adds one shard per chunk it computes, so a build's memory is one chunk and
an interrupted build keeps the shards it finished; extending a store adds a shard of the new rows
only. A lookup binary-searches each shard (few: :meth:`TeacherStore.compact` merges the smallest).
On disk (:mod:`kdray.teachers.store_files`) shards are memory-mapped, so a process holds in memory
only the pages its lookups touch, and the processes of a node share them through the page cache.

Its key is everything the outputs depend on: the teacher files' sha256, the train split's bytes, the
view set, the precision they were computed in, and the logits' encoding.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from kdray.data.bundle import DataBundle
from kdray.data.views import ViewSpec
from kdray.distill.base import TeacherInfo
from kdray.teachers.store_codec import LogitCodec

STORES = "stores"
DEFAULT_BUDGET_GB = 4.0
# 3: shards of sorted codes, memory-mapped; 2: one file of sorted codes; 1: a dense int32 index [N, V], raw logits
FORMAT = 3
MAX_SHARDS = 16  # more, and compact() merges the smallest: a lookup searches every shard


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
class Shard:
    """A block of rows sorted by pair code: row r holds pair ``codes[r]``, its logits encoded in
    ``parts`` (name -> [R, ...]), its feature maps per teacher in ``feats`` (or None). ``file``:
    its file in the store's folder once saved (its tensors then memory-mapped from it)."""

    codes: torch.Tensor  # int64 [R], sorted, unique
    parts: dict
    feats: Optional[list] = None
    file: Optional[str] = None
    sha256: Optional[str] = None

    @property
    def rows(self) -> int:
        return int(self.codes.shape[0])

    def tensors(self) -> list:
        return [self.codes] + [self.parts[n] for n in sorted(self.parts)] + list(self.feats or [])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def positions(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row of each code in this shard, whether it is here)."""
        if not self.rows:
            return torch.zeros_like(codes), torch.zeros_like(codes, dtype=torch.bool)
        pos = torch.searchsorted(self.codes, codes).clamp_(max=self.rows - 1)
        return pos, self.codes[pos] == codes

    @classmethod
    def merged(cls, shards: list["Shard"]) -> "Shard":
        """One shard of all the rows of ``shards`` (disjoint codes), in code order."""
        codes = torch.cat([s.codes for s in shards])
        codes, order = torch.sort(codes)
        parts = {n: torch.cat([s.parts[n] for s in shards]).index_select(0, order) for n in shards[0].parts}
        feats = None
        if shards[0].feats is not None:
            feats = [torch.cat(fs).index_select(0, order) for fs in zip(*(s.feats for s in shards))]
        return cls(codes, parts, feats)


@dataclass
class TeacherStore:
    """Rows of teacher outputs in :class:`Shard` s (disjoint codes). A row's global number (what
    :meth:`lookup` returns and :meth:`logits_of` takes) counts the shards' rows in shard order."""

    key: dict
    info: TeacherInfo
    samples: int  # N: train samples
    view_count: int  # V: views per sample
    shards: list = field(default_factory=list)
    has_feats: bool = False  # every row holds the teachers' feature maps
    meta: dict = field(default_factory=dict)
    folder: Optional[Path] = None  # where it is saved (None: in memory only)
    remote: Optional[tuple] = None  # (URI root, digest) when the folder mirrors a store at a URI

    @property
    def codec(self) -> LogitCodec:
        return LogitCodec.from_key(self.key["logits"])

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def _offsets(self) -> list[int]:
        out, total = [], 0
        for s in self.shards:
            out.append(total)
            total += s.rows
        return out

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """The global row of each pair code (int64), -1 where the store lacks it."""
        codes = codes.long()
        out = torch.full_like(codes, -1)
        for off, shard in zip(self._offsets(), self.shards):
            pos, hit = shard.positions(codes)
            out[hit] = pos[hit] + off
        return out

    def missing(self, codes: torch.Tensor) -> torch.Tensor:
        return codes[self.lookup(codes) < 0] if len(codes) else codes

    def covers(self, codes: torch.Tensor) -> bool:
        return len(self.missing(codes)) == 0

    def _by_shard(self, rows: torch.Tensor):
        """(shard, mask of ``rows`` in it, their rows in the shard) for each shard ``rows`` touch."""
        rows = rows.long()
        for off, shard in zip(self._offsets(), self.shards):
            m = (rows >= off) & (rows < off + shard.rows)
            if len(self.shards) == 1 or bool(m.any()):
                yield shard, m, rows[m] - off

    def logits_of(self, rows: torch.Tensor, device=None) -> torch.Tensor:
        """``[len(rows), K, C]`` logits of stored ``rows`` on ``device`` (see :meth:`LogitCodec.decode`)."""
        return self._gather(rows, device, lambda shard, r: self.codec.decode(shard.parts, r, device))

    def feats_of(self, rows: torch.Tensor, device=None) -> list:
        """Each teacher's feature maps ``[len(rows), C_k, H_k, W_k]`` of stored ``rows`` on ``device``."""
        return [self._gather(rows, device, lambda shard, r, k=k: shard.feats[k].index_select(0, r).to(device))
                for k in range(self.info.count)]

    def _gather(self, rows: torch.Tensor, device, take) -> torch.Tensor:
        out = None
        for shard, m, r in self._by_shard(rows):
            got = take(shard, r)
            if len(self.shards) == 1:
                return got
            if out is None:
                out = got.new_empty((len(rows), *got.shape[1:]))
            out[m.to(got.device)] = got
        return out

    # -- every row in code order (reports, tests, the object store) --
    @property
    def codes(self) -> torch.Tensor:
        return self._in_code_order().codes

    @property
    def parts(self) -> dict:
        return self._in_code_order().parts

    @property
    def feats(self) -> Optional[list]:
        return self._in_code_order().feats if self.has_feats else None

    def _in_code_order(self) -> Shard:
        if len(self.shards) == 1:
            return self.shards[0]
        if not self.shards:
            return Shard(torch.empty(0, dtype=torch.int64), self.codec.empty(self.info.count))
        return Shard.merged(self.shards)

    def describe(self) -> str:
        """One line for logs and the MLflow tag ``kdray.teacher_store``."""
        what = self.codec.describe() + (" and feature maps" if self.has_feats else " (feature maps online)")
        return (f"{self.meta.get('digest', '(in memory)')}: {what}, {self.coverage()}, {gb(self.nbytes)} in "
                f"{len(self.shards)} shard{'s' if len(self.shards) != 1 else ''}")

    def coverage(self) -> str:
        total = self.samples * self.view_count  # a number: never allocated
        return f"{self.rows}/{total} views ({100.0 * self.rows / max(total, 1):.1f}%)"

    # -- changes --
    def add(self, codes: torch.Tensor, logits: torch.Tensor, feats: Optional[list]) -> Shard:
        """A new shard of rows for ``codes`` (pairs not yet stored; ``logits`` [R,K,C] encoded here)."""
        if len(logits) != len(codes) or (self.has_feats and (feats is None or len(feats[0]) != len(codes))):
            raise ValueError("teacher store: rows to add do not match their codes (logits and feature maps)")
        codes, order = torch.sort(codes.long())
        if len(codes) and ((codes[1:] == codes[:-1]).any() or (self.lookup(codes) >= 0).any()):
            raise ValueError("teacher store: rows to add repeat a pair or one already stored")
        fmaps = [f.index_select(0, order) for f in feats] if self.has_feats else None
        shard = Shard(codes, self.codec.encode(logits.index_select(0, order)), fmaps)
        self.shards.append(shard)
        return shard

    def drop_feats(self) -> None:
        """Logits only from now on: rows added later need no feature maps (a shard's maps stay in its
        file, unread)."""
        self.has_feats = False
        self.shards = [Shard(s.codes, s.parts, None, s.file, s.sha256) for s in self.shards]

    def compact(self) -> Optional[Shard]:
        """Past :data:`MAX_SHARDS` shards, the smallest merged into one new shard (returned, to be
        saved; the merged ones are gone from the store); None when there are few enough."""
        if len(self.shards) <= MAX_SHARDS:
            return None
        small = sorted(self.shards, key=lambda s: s.rows)[: len(self.shards) - MAX_SHARDS // 2 + 1]
        merged = Shard.merged(small)
        self.shards = [s for s in self.shards if all(s is not t for t in small)] + [merged]
        return merged

    # -- Ray's object store --
    def to_arrays(self) -> dict:
        """Numpy arrays for Ray's object store (read zero-copy by every trial on a node)."""
        tensors = [t for s in self.shards for t in s.tensors()]
        return {"key": self.key, "info": [self.info.count, list(self.info.feat_channels)], "meta": self.meta,
                "shape": [self.samples, self.view_count], "parts": sorted(self.codec.empty(self.info.count)),
                "shards": len(self.shards), "feats": self.has_feats,
                "tensors": [t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy() for t in tensors],
                "dtypes": [str(t.dtype) for t in tensors]}

    @classmethod
    def from_arrays(cls, obj: dict) -> "TeacherStore":
        import warnings

        tensors = []
        with warnings.catch_warnings():  # the object store's arrays are read-only; rows are only read
            warnings.simplefilter("ignore", UserWarning)
            for a, dt in zip(obj["tensors"], obj["dtypes"]):
                t = torch.from_numpy(a)
                tensors.append(t.view(torch.bfloat16) if dt == "torch.bfloat16" else t)
        info, names = info_of(obj["info"]), obj["parts"]
        per = 1 + len(names) + (info.count if obj["feats"] else 0)
        shards = []
        for s in range(obj["shards"]):
            t = tensors[s * per : (s + 1) * per]
            shards.append(Shard(t[0], dict(zip(names, t[1 : 1 + len(names)])),
                                t[1 + len(names):] if obj["feats"] else None))
        return cls(obj["key"], info, *obj["shape"], shards, obj["feats"], obj["meta"])


def info_of(raw) -> TeacherInfo:
    return TeacherInfo(int(raw[0]), tuple(int(c) for c in raw[1]))


def empty_store(key: dict, info: TeacherInfo, n: int, views, feats: bool) -> TeacherStore:
    """No rows yet (``feats``: rows will hold feature maps)."""
    return TeacherStore(key, info, n, views.count, [], feats)


def gb(n: float) -> str:
    """``n`` bytes for a person: GB from 10 MB up, MB from 100 KB up, else KB."""
    if n >= 1024**3 / 100:
        return f"{n / 1024**3:.2f} GB"
    return f"{n / 1024**2:.1f} MB" if n >= 100 * 1024 else f"{n / 1024:.1f} KB"
