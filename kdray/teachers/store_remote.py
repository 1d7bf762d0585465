"""A teacher store whose folder is a URI (``--teacher-store s3://bucket/stores``, ``gs://``,
``hdfs://``, ``file://``: anything pyarrow's filesystems read). Shards are memory-mapped, which needs
local files, so each node keeps a mirror of the stores it reads under :func:`mirror_root`: a run
pulls what the URI holds into its node's mirror before opening it, and pushes each shard it saves
(then the meta, last, so a reader of the URI sees the old store or the new one). Shard files are
named by their content, so a file of the same name is the same file on both sides; every pulled
shard is verified against the meta's sha256 when the store is opened."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from kdray.core.errors import KdrayError
from kdray.core.io import atomic_write, first_line
from kdray.data.catalog import filesystem, is_uri
from kdray.teachers.store import TeacherStore
from kdray.teachers.store_files import META_FILE, StoreCorrupt

MIRROR_ENV = "KDRAY_STORE_MIRROR"
CHUNK = 8 << 20


def mirror_root(uri: str) -> Path:
    """This node's folder for the stores under ``uri`` (``$KDRAY_STORE_MIRROR`` or
    ``~/.cache/kdray/stores``, one subfolder per URI)."""
    base = Path(os.environ.get(MIRROR_ENV) or "~/.cache/kdray/stores").expanduser()
    return base / hashlib.blake2b(uri.rstrip("/").encode(), digest_size=8).hexdigest()


def remote_folder(root: str, digest: str) -> str:
    return f"{root.rstrip('/')}/{digest}"


def _fs(uri: str):
    return filesystem(uri, what="teacher store")


def pull(uri: str, folder: Path) -> int:
    """The store at ``uri`` copied into ``folder`` (shards the folder lacks, then the meta); the
    count of shards fetched; 0 when ``uri`` holds no store yet."""
    fs, base = _fs(uri)
    try:
        meta_bytes = _read(fs, f"{base}/{META_FILE}")
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise KdrayError(f"teacher store: cannot read {uri} ({first_line(exc, 200)}); check the URI and its "
                         "credentials") from None
    try:
        names = [str(e["file"]) for e in json.loads(meta_bytes)["shards"]]
    except (ValueError, KeyError, TypeError):
        raise StoreCorrupt(f"teacher store: {uri}/{META_FILE} is damaged (not a store's meta)") from None
    folder.mkdir(parents=True, exist_ok=True)
    fetched = 0
    for name in names:
        if "/" in name or not name.startswith("shard-"):
            raise StoreCorrupt(f"teacher store: {uri}/{META_FILE} names {name!r}, not a shard file")
        if not (folder / name).is_file():
            _copy_down(fs, f"{base}/{name}", folder / name, uri)
            fetched += 1
    atomic_write(folder / META_FILE, meta_bytes)
    return fetched


def push(store: TeacherStore, folder: Path, uri: str) -> None:
    """``store``'s shard files the URI lacks uploaded, then its meta, then shard files it no longer
    names removed there."""
    from pyarrow import fs as pafs

    fs, base = _fs(uri)
    try:
        fs.create_dir(base, recursive=True)
        there = {i.base_name for i in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))}
        named = {s.file for s in store.shards}
        for name in sorted(named - there):
            _copy_up(fs, folder / name, f"{base}/{name}")
        _copy_up(fs, folder / META_FILE, f"{base}/{META_FILE}")
        for name in there:
            if name.startswith("shard-") and name not in named:
                fs.delete_file(f"{base}/{name}")
    except OSError as exc:
        raise KdrayError(f"teacher store: cannot write {uri} ({first_line(exc, 200)}); check the URI and its "
                         "credentials, or pass --teacher-store DIR for a local folder") from None


def _read(fs, path: str) -> bytes:
    info = fs.get_file_info(path)
    from pyarrow import fs as pafs

    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def _copy_down(fs, src: str, dest: Path, uri: str) -> None:
    def write(out) -> None:
        with fs.open_input_stream(src) as fh:
            while chunk := fh.read(CHUNK):
                out.write(chunk)

    try:
        atomic_write(dest, write)
    except FileNotFoundError:
        raise StoreCorrupt(f"teacher store: {src} is missing (named in {uri}/{META_FILE})") from None


def _copy_up(fs, src: Path, dest: str) -> None:
    with open(src, "rb") as fh, fs.open_output_stream(dest) as out:
        while chunk := fh.read(CHUNK):
            out.write(chunk)


def store_root(root) -> tuple[Optional[Path], Optional[str]]:
    """``--teacher-store``'s root as (local folder, URI): a URI is read through its node mirror."""
    if root is None:
        return None, None
    if is_uri(root):
        return mirror_root(str(root)), str(root)
    return Path(root), None
