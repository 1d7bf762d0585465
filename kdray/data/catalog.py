"""Image sets as records, before any pixel is decoded: a :class:`Catalog` lists every sample's
locator (a file, or a member of a WebDataset-style tar shard) and label, local or at any URI pyarrow
reads (``s3://``, ``gs://``, ``hdfs://``); an :class:`ImageReader` fetches and decodes a batch of
locators at the stored size. Both the in-memory path (decode all once) and the streaming path
(Ray Data decodes per batch) read through the same reader, so their pixels are the same bytes.

Tar shards follow WebDataset's layout: ``KEY.jpg`` (or another image extension) beside ``KEY.cls``
(the class index as text), shards ``*.tar`` in one folder (or its ``train/`` and ``test/``), class
names in an optional ``classes.txt``. A locator of a tar member is ``shard|offset|size``: one ranged
read, no unpacking.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from kdray.core.errors import KdrayError
from kdray.core.io import first_line
from kdray.data.bundle import fit_image
from kdray.data.imagefolder import IMG_EXTENSIONS, decode_image_bytes


def is_uri(path: str) -> bool:
    return "://" in str(path)


def filesystem(path: str, what: str = "data"):
    """(pyarrow filesystem, path inside it) for a local path or a URI; one line (naming ``what``)
    when unreachable."""
    from pyarrow import fs as pafs

    try:
        if is_uri(path):
            return pafs.FileSystem.from_uri(str(path))
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(str(path)))
    except Exception as exc:
        raise KdrayError(f"{what}: cannot reach {path} ({first_line(exc, 200)}); check the URI and its credentials") \
            from None


@dataclass
class Catalog:
    """Every sample of a set, undecoded: ``locators[i]`` holds sample i, labelled ``labels[i]``;
    ``test_*`` is the official test part where the set has one."""

    kind: str  # "folder" or "tar"
    root: str
    classes: list
    locators: list
    labels: torch.Tensor
    test_locators: Optional[list] = None
    test_labels: Optional[torch.Tensor] = None
    fingerprint: str = ""
    encoded_bytes: int = 0

    def __len__(self) -> int:
        return len(self.locators) + len(self.test_locators or [])

    def decoded_bytes(self, side: int) -> int:
        """What the whole set takes decoded at ``side`` px (uint8 RGB)."""
        return len(self) * 3 * side * side


# ---------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------
def _remote_tree(root: str) -> tuple:
    """(classes, [(path, label, size, mtime)]) of a class-per-folder tree at a URI."""
    from pyarrow import fs as pafs

    fs, base = filesystem(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except Exception as exc:
        raise KdrayError(f"data: cannot list {root} ({first_line(exc, 200)})") from None
    files = sorted((i.path, i.size or 0, int(i.mtime_ns or 0)) for i in infos if i.type == pafs.FileType.File)
    rel = [(p, os.path.relpath(p, base).split("/"), n, t) for p, n, t in files]
    images = [(p, parts[0], n, t) for p, parts, n, t in rel
              if len(parts) >= 2 and not any(s.startswith(".") for s in parts) and p.lower().endswith(IMG_EXTENSIONS)]
    classes = sorted({c for _, c, _, _ in images})
    if len(classes) < 2:
        raise KdrayError(f"imagefolder: found {len(classes)} class folder(s) with images at {root}; need at least 2")
    label = {c: i for i, c in enumerate(classes)}
    uri_head = str(root).split("://", 1)[0] + "://"
    return classes, [(uri_head + p, label[c], n, t) for p, c, n, t in images]


def _fingerprint(kind: str, root: str, records: list) -> str:
    h = hashlib.sha256(f"{kind}|{root}".encode())
    for path, label, size, mtime in records:
        h.update(f"{path}\0{label}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:24]


def folder_catalog(root: str) -> Catalog:
    """The catalog of a class-per-folder tree (or its ``train/`` and ``test/`` halves)."""
    if is_uri(root):
        classes, files = _remote_tree(root)
        parts = {"train": (classes, files)}
    else:
        from kdray.data.imagefolder import tree_parts

        parts = tree_parts(root)
        classes = parts["train"][0]
    train, test = parts["train"][1], parts.get("test", (None, None))[1]
    records = train + (test or [])
    return Catalog("folder", str(root), list(classes), [f[0] for f in train],
                   torch.tensor([f[1] for f in train], dtype=torch.long),
                   [f[0] for f in test] if test else None,
                   torch.tensor([f[1] for f in test], dtype=torch.long) if test else None,
                   _fingerprint("folder", str(root), records), sum(f[2] for f in records))


# ---------------------------------------------------------------------------------------------
# WebDataset-style tar shards
# ---------------------------------------------------------------------------------------------
def _shard_members(fs, path: str) -> list:
    """[(key, image member's locator, label)] of one tar shard, in the shard's order."""
    images, labels = {}, {}
    with fs.open_input_file(path) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        for m in tar:
            if not m.isfile() or "." not in os.path.basename(m.name):
                continue
            key, ext = m.name.rsplit(".", 1)
            if ("." + ext.lower()) in IMG_EXTENSIONS:
                images[key] = f"{path}|{m.offset_data}|{m.size}"
            elif ext.lower() == "cls":
                labels[key] = tar.extractfile(m).read().decode().strip()
    if not images:
        raise KdrayError(f"webdataset: shard {path} holds no images (expected KEY.jpg or KEY.png beside KEY.cls)")
    missing = [k for k in images if k not in labels]
    if missing:
        raise KdrayError(f"webdataset: {len(missing)} image(s) in shard {path} have no KEY.cls label "
                         f"(first: {missing[0]})")
    try:
        return [(k, loc, int(labels[k])) for k, loc in images.items()]
    except ValueError:
        raise KdrayError(f"webdataset: a .cls label in shard {path} is not a class index") from None


def _shards(fs, folder: str, where: str) -> list:
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    shards = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".tar"))
    if not shards:
        raise KdrayError(f"webdataset: no .tar shards in {where} {folder}")
    return [(s, fs.get_file_info(s)) for s in shards]


def _tar_part(fs, folder: str, where: str) -> tuple:
    """(locators, labels, fingerprint records) of the shards in one folder."""
    locators, labels, records = [], [], []
    for path, info in _shards(fs, folder, where):
        members = _shard_members(fs, path)
        locators += [loc for _, loc, _ in members]
        labels += [lab for _, _, lab in members]
        records.append((path, len(members), info.size or 0, int(info.mtime_ns or 0)))
    return locators, labels, records


def _class_names(fs, folder: str, labels: list) -> list:
    try:
        with fs.open_input_file(f"{folder}/classes.txt") as fh:
            names = [line.strip() for line in fh.read().decode().splitlines() if line.strip()]
    except (FileNotFoundError, OSError):
        names = [str(i) for i in range(max(labels) + 1)]
    if max(labels) >= len(names) or min(labels) < 0:
        raise KdrayError(f"webdataset: labels run from {min(labels)} to {max(labels)} but {folder}/classes.txt "
                         f"names {len(names)} classes")
    return names


def tar_catalog(root: str) -> Catalog:
    """The catalog of WebDataset-style shards: ``root/*.tar``, or ``root/train/*.tar`` + ``root/test/*.tar``."""
    from pyarrow import fs as pafs

    fs, base = filesystem(root)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise KdrayError(f"webdataset: {root} is not a folder of .tar shards")
    split = fs.get_file_info(f"{base}/train").type == pafs.FileType.Directory
    train = _tar_part(fs, f"{base}/train" if split else base, "train folder" if split else "data dir")
    test = _tar_part(fs, f"{base}/test", "test folder") if split else None
    classes = _class_names(fs, base, train[1] + (test[1] if test else []))
    head = str(root).split("://", 1)[0] + "://" if is_uri(root) else ""
    fix = (lambda locs: [head + loc for loc in locs]) if head else (lambda locs: locs)
    records = train[2] + (test[2] if test else [])
    return Catalog("tar", str(root), classes, fix(train[0]), torch.tensor(train[1], dtype=torch.long),
                   fix(test[0]) if test else None, torch.tensor(test[1], dtype=torch.long) if test else None,
                   _fingerprint("tar", str(root), records), sum(r[2] for r in records))


# ---------------------------------------------------------------------------------------------
# reading and decoding records
# ---------------------------------------------------------------------------------------------
def _read_tar_member(locator: str, handles: dict) -> bytes:
    path, offset, size = locator.rsplit("|", 2)
    if path not in handles:
        fs, inner = filesystem(path)
        handles[path] = fs.open_input_file(inner)
    fh = handles[path]
    fh.seek(int(offset))
    return fh.read(int(size))


def _read_file(locator: str) -> bytes:
    if is_uri(locator):
        fs, inner = filesystem(locator)
        with fs.open_input_file(inner) as fh:
            return fh.read()
    with open(locator, "rb") as fh:
        return fh.read()


class UndecodableImage(KdrayError):
    pass


@dataclass(frozen=True)
class ImageReader:
    """Fetches and decodes records to uint8 [3, side, side] (shorter side resized to ``side``, then
    centre cropped). ``bad_images``: "fail" raises on an undecodable image (naming it); "skip" marks
    it so the caller drops and counts it. Picklable: Ray Data tasks carry it."""

    kind: str
    side: int
    bad_images: str = "fail"

    def fetch(self, locators) -> list:
        if self.kind != "tar":
            return [_read_file(loc) for loc in locators]
        handles: dict = {}
        try:
            return [_read_tar_member(loc, handles) for loc in locators]
        finally:
            for fh in handles.values():
                fh.close()

    def decode(self, locators) -> tuple:
        """(uint8 [n,3,side,side], bool [n] decodable) of ``locators``."""
        locators = [str(loc) for loc in locators]
        out = torch.zeros((len(locators), 3, self.side, self.side), dtype=torch.uint8)
        ok = torch.ones(len(locators), dtype=torch.bool)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for i, (loc, raw) in enumerate(zip(locators, self.fetch(locators))):
                try:
                    out[i] = fit_image(decode_image_bytes(raw), self.side)
                except Exception as exc:
                    if self.bad_images == "fail":
                        raise UndecodableImage(f"data: cannot decode image {display(loc)} ({first_line(exc, 160)}); "
                                               "fix or remove it, or pass --bad-images skip") from None
                    ok[i] = False
        return out, ok


def display(locator: str) -> str:
    """A locator as a person reads it: ``shard.tar[offset]`` for a tar member."""
    if locator.count("|") == 2:
        path, offset, _ = locator.rsplit("|", 2)
        return f"{path}[{offset}]"
    return locator
