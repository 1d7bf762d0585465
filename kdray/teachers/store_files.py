"""A teacher store on disk: ``<root>/<key digest>/`` holds ``meta.json`` (its key, its shards with
their sha256, coverage, size and build time) and one ``shard-<sha256 prefix>.pt`` per shard
(tensors only, loaded with ``weights_only=True``, memory-mapped).

Every file is written atomically and the meta last, so whatever stops a build, the folder holds the
shards its last meta names: a shard file the meta does not name (a write the meta never recorded,
or a shard merged into another) is removed when the store is next saved. On load each shard's
sha256 is checked, streamed from disk (nothing held), before it is mapped; a process handed a store
another process verified (a sweep's trials: :func:`stamps`) compares each shard's size and
modification time with what that process saw instead of reading every byte again. Mapping after
hashing leaves a window in which a file could change: verification guards against damage (a
crash, a bad disk, a file from elsewhere), not against someone rewriting the folder meanwhile.
Stores of formats 1 and 2 are not read: they are rebuilt, with a line saying so.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from kdray.core.errors import KdrayError
from kdray.core.io import atomic_write, sha256_file
from kdray.teachers.store import FORMAT, Shard, TeacherStore, gb, info_of, key_digest
from kdray.teachers.store_codec import LogitCodec

META_FILE = "meta.json"
SHARD_GLOB = "shard-*.pt"


class StoreCorrupt(KdrayError):
    pass


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def check_disk(root: Path, nbytes: int) -> None:
    """KdrayError when ``root`` has too little room for ``nbytes``; a folder that cannot be made
    (read-only) is left to :func:`save`, which keeps the store in memory."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
    except OSError:
        return
    if nbytes * 2 > free:  # a shard is serialised beside its file before the rename
        raise KdrayError(f"teacher store: {gb(nbytes)} to write at {root} but only {gb(free)} free; "
                         "free space, point --teacher-store elsewhere or pass --no-teacher-store")


def save(store: TeacherStore, folder: Path, build_s: float) -> None:
    """Every shard not yet on disk written to ``folder``, then the meta naming them all, then shard
    files no longer named removed (``build_s``: build time since the last save)."""
    folder.mkdir(parents=True, exist_ok=True)
    new = [s for s in store.shards if s.file is None]
    check_disk(folder, sum(s.nbytes for s in new))
    for shard in new:
        _write_shard(shard, folder)
    _write_meta(store, folder, build_s)
    named = {s.file for s in store.shards}
    for f in folder.glob(SHARD_GLOB):
        if f.name not in named:
            f.unlink(missing_ok=True)
    store.folder = folder


def _write_shard(shard: Shard, folder: Path) -> None:
    """The shard's file (named by its content), its tensors then mapped from it: a saved shard
    takes no memory of its own."""
    buffer = io.BytesIO()
    torch.save({"codes": shard.codes, "parts": shard.parts, "feats": shard.feats}, buffer)
    sha = hashlib.sha256(buffer.getbuffer()).hexdigest()
    name = f"shard-{sha[:16]}.pt"
    atomic_write(folder / name, buffer.getbuffer())
    del buffer
    mapped = _map(folder / name)
    shard.codes, shard.parts, shard.feats = mapped["codes"], mapped["parts"], mapped["feats"]
    shard.file, shard.sha256 = name, sha


def _write_meta(store: TeacherStore, folder: Path, build_s: float) -> None:
    store.meta = {
        "key": store.key, "digest": key_digest(store.key),
        "info": [store.info.count, list(store.info.feat_channels)], "shape": [store.samples, store.view_count],
        "shards": [{"file": s.file, "sha256": s.sha256, "rows": s.rows} for s in store.shards],
        "rows": store.rows, "views": store.samples * store.view_count, "feats": store.has_feats,
        "bytes": store.nbytes, "build_s": round(float(store.meta.get("build_s", 0.0)) + build_s, 2),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write(folder / META_FILE, json.dumps(store.meta, indent=1))


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def read_meta(folder: Path) -> Optional[dict]:
    """The meta in ``folder``; None when there is none; :class:`StoreCorrupt` when it cannot be read."""
    file = Path(folder) / META_FILE
    try:
        text = file.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreCorrupt(f"teacher store: {file} cannot be read ({exc.strerror})") from None
    try:
        meta = json.loads(text)
    except ValueError:
        raise StoreCorrupt(f"teacher store: {file} is damaged (not JSON: truncated or overwritten)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("key"), dict):
        raise StoreCorrupt(f"teacher store: {file} is damaged (it holds no store's key)")
    return meta


def stamps(store: TeacherStore, folder: Path) -> dict:
    """Each shard file's (size, modification time) as this process verified it."""
    out = {}
    for s in store.shards:
        st = (Path(folder) / s.file).stat()
        out[s.file] = [st.st_size, st.st_mtime_ns]
    return out


def load(folder: Path, verified: Optional[dict] = None) -> Optional[TeacherStore]:
    """The store in ``folder``, every shard verified against the meta's sha256 (or, for a shard in
    ``verified`` (:func:`stamps`) whose size and time still match, taken as verified) and mapped;
    None when there is none; :class:`StoreCorrupt` when it does not verify."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta is None:
        return None
    if meta["key"].get("format") != FORMAT:
        raise StoreCorrupt(f"teacher store: {folder} is in format {meta['key'].get('format')}; this kdray "
                           f"reads format {FORMAT}")
    try:
        info, (samples, views), entries = info_of(meta["info"]), meta["shape"], list(meta["shards"])
        codec = LogitCodec.from_key(meta["key"]["logits"])
    except (KeyError, TypeError, ValueError, IndexError):
        raise StoreCorrupt(f"teacher store: {folder / META_FILE} is damaged (fields missing)") from None
    feats = bool(meta.get("feats"))
    shards = [_verified_shard(folder, e, (verified or {}).get(e.get("file")), codec, info, feats) for e in entries]
    return TeacherStore(meta["key"], info, int(samples), int(views), shards, feats, meta, folder)


def _verified_shard(folder: Path, entry: dict, stamp, codec: LogitCodec, info, feats: bool) -> Shard:
    file = folder / str(entry.get("file"))
    if not file.is_file():
        raise StoreCorrupt(f"teacher store: {file} is missing (named in {META_FILE})")
    st = file.stat()
    if stamp is None or [st.st_size, st.st_mtime_ns] != list(stamp):
        if sha256_file(file) != entry.get("sha256"):
            raise StoreCorrupt(f"teacher store: {file} does not verify (its sha256 does not match {META_FILE})")
    try:  # tensors only: a file holding other Python objects is refused, never run
        obj = _map(file)
    except Exception as exc:
        raise StoreCorrupt(f"teacher store: {file} was refused ({type(exc).__name__}: it is unreadable or holds "
                           "more than tensors)") from None
    why = _layout_problem(obj, codec, info, feats, entry.get("rows"))
    if why:
        raise StoreCorrupt(f"teacher store: {file} does not verify: it is not a shard of this store ({why})")
    return Shard(obj["codes"], obj["parts"], obj["feats"] if feats else None, file.name, entry.get("sha256"))


def _map(file: Path) -> dict:
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def _layout_problem(obj, codec: LogitCodec, info, feats: bool, rows) -> Optional[str]:
    """What in a loaded shard file differs from the layout its meta promises, or None."""
    if not isinstance(obj, dict) or not {"codes", "parts", "feats"} <= set(obj):
        return "its fields are " + (", ".join(sorted(map(str, obj))) if isinstance(obj, dict) else type(obj).__name__)
    codes, parts = obj["codes"], obj["parts"]
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int64 or codes.dim() != 1 or len(codes) != rows:
        return f"its index is not {rows} int64 codes"
    layout = codec.layout(info.count)
    if not isinstance(parts, dict) or set(parts) != set(layout):
        return f"its logits are not {codec.describe()}"
    for name, (shape, dtype) in layout.items():
        t = parts[name]
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != (rows, *shape):
            return f"its {name} is not [{rows}, {', '.join(map(str, shape))}] {dtype}"
    if feats and (not isinstance(obj["feats"], list) or len(obj["feats"]) != info.count
                  or any(len(f) != rows for f in obj["feats"])):
        return f"it holds no feature maps of {info.count} teachers"
    if rows and bool((codes[1:] <= codes[:-1]).any()):
        return "its index is not sorted"
    return None


def load_or_rebuild(folder: Path, log) -> Optional[TeacherStore]:
    """A store that does not verify (a crash, a damaged disk) is kdray's own derived data: it is
    rebuilt, with a line saying so."""
    try:
        return load(folder)
    except StoreCorrupt as exc:
        log(f"{exc}; rebuilding it")
        return None


def list_stores(root: Path) -> list[dict]:
    """Meta of every readable store under ``root`` (for `kdray teachers show`)."""
    root = Path(root)
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            m = read_meta(d)
        except StoreCorrupt:
            continue
        if m and "digest" in m:
            out.append(dict(m, path=str(root / m["digest"])))
    return out


def outdated_stores(root: Path, key: dict) -> list[dict]:
    """Stores under ``root`` of an older format for the same teachers, data and precision: a new
    format is a new key (another folder), so a run says it rebuilds them rather than ignoring them
    silently."""
    same = ("teachers", "dataset", "train", "image_size", "precision")
    return [m for m in list_stores(root)
            if m["key"].get("format") != FORMAT and all(m["key"].get(f) == key.get(f) for f in same)]
