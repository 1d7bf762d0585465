"""The ``imagefolder`` source: a class-per-folder image tree (or its train/ and test/ halves)
decoded once into uint8 tensors at one size, and cached beside the tree (or in ~/.cache) under a
key of every file's path, size and mtime, so a changed tree is decoded again."""

from __future__ import annotations

import hashlib
import io
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from kdray.core.errors import KdrayError
from kdray.core.io import atomic_write, first_line
from kdray.data.bundle import fit_image, log

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


_CACHE_VERSION = 2  # 2: images fitted by the uint8 resize (kdray.data.bundle.resize_uint8)


def _is_image_name(filename: str) -> bool:
    """A visible file with one of the image extensions (case-insensitive)."""
    return not filename.startswith(".") and filename.lower().endswith(IMG_EXTENSIONS)


def _class_images(folder: Path, label: int) -> list[tuple[str, int, int, int]]:
    """[(path, label, size, mtime_ns)] for the images anywhere under one class folder.

    Directories and files are visited in sorted order and hidden ones skipped, so the list (and
    with it the cache key and the sample order) does not depend on the filesystem's order.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # in place: steers os.walk
        for fn in sorted(filter(_is_image_name, filenames)):
            path = os.path.join(dirpath, fn)
            st = os.stat(path)
            found.append((path, label, st.st_size, st.st_mtime_ns))
    return found


def _scan_tree(root: Path, where: str):
    """Class names and [(path, label, size, mtime_ns)] for a class-per-folder tree."""
    if not root.is_dir():
        raise KdrayError(f"imagefolder: {where} {root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise KdrayError(f"imagefolder: no class folders in {root}; expected {root}/<class>/<image> "
                         f"(or {root}/train/<class>/... and {root}/test/<class>/...)")
    files, empty = [], []
    for label, cname in enumerate(classes):
        found = _class_images(root / cname, label)
        if not found:
            empty.append(cname)
        files.extend(found)
    if not files:
        raise KdrayError(f"imagefolder: no images found under {root} "
                         f"(looked for {', '.join(IMG_EXTENSIONS)} in {len(classes)} class folders)")
    if empty:
        raise KdrayError(f"imagefolder: class folder(s) with no images under {root}: {', '.join(empty)}")
    return classes, files


def _tv_decoders():
    """torchvision.io's (ImageReadMode, decode_image, decode_jpeg), or None where unavailable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchvision.io import ImageReadMode, decode_image, decode_jpeg
        return ImageReadMode, decode_image, decode_jpeg
    except Exception:  # torchvision.io decoding is deprecated since 0.29 (moving to torchcodec)
        return None


def _as_tensor(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def decode_image_bytes(raw: bytes, tv="load") -> torch.Tensor:
    """One encoded image to uint8 [3,H,W] RGB: torchvision.io first, PIL as the fallback; raises
    when neither can decode it."""
    tv = _tv_decoders() if tv == "load" else tv
    if tv is not None and raw:
        try:
            return tv[1](_as_tensor(raw), mode=tv[0].RGB)
        except Exception:
            pass
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as im:
        arr = np.array(im.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _decode_one(path: str, raw: bytes, tv) -> torch.Tensor:
    """Decode one file's bytes to uint8 [3,H,W] RGB, or a KdrayError naming the file."""
    try:
        return decode_image_bytes(raw, tv)
    except Exception as exc:
        raise KdrayError(f"imagefolder: cannot decode image {path} ({first_line(exc, 200)})") from None


def _read_files(paths: list[str]) -> list[bytes]:
    """The whole contents of each file, in order."""
    raws = []
    for p in paths:
        with open(p, "rb") as fh:
            raws.append(fh.read())
    return raws


def _decode_jpeg_batch(paths: list[str], raws: list[bytes], tv) -> list[Optional[torch.Tensor]]:
    """One batched torchvision decode of the non-empty JPEGs among ``paths``.

    Returns an entry per path: the decoded uint8 [3,H,W] image, or None where the file is left
    for :func:`_decode_one` (not a JPEG, empty, no torchvision.io, or the batch call failed: one
    bad file fails the whole batch, and then every file of the chunk is decoded one by one).
    """
    imgs: list[Optional[torch.Tensor]] = [None] * len(paths)
    jpeg = [i for i, p in enumerate(paths) if p.lower().endswith((".jpg", ".jpeg")) and raws[i]]
    if tv is None or not jpeg:
        return imgs
    try:
        decoded = tv[2]([_as_tensor(raws[i]) for i in jpeg], mode=tv[0].RGB)
        for i, img in zip(jpeg, decoded):
            imgs[i] = img
    except Exception:
        pass  # one bad file: the caller decodes this chunk one by one
    return imgs


def _decode_chunk(paths: list[str], size: int, tv) -> list[torch.Tensor]:
    """Read and decode a chunk of files to uint8 [3,size,size] each (JPEGs batched where possible)."""
    raws = _read_files(paths)
    imgs = _decode_jpeg_batch(paths, raws, tv)
    return [fit_image(_decode_one(path, raw, tv) if img is None else img, size)
            for path, raw, img in zip(paths, raws, imgs)]


def _decode_files(paths: list[str], size: int, chunk: int = 2048) -> torch.Tensor:
    """Decode image files into uint8 [N,3,size,size]; JPEGs in batches, progress on stderr."""
    tv = _tv_decoders()
    n = len(paths)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    t0, next_report = time.perf_counter(), 5000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for start in range(0, n, chunk):
            part = paths[start : start + chunk]
            torch.stack(_decode_chunk(part, size, tv), out=out[start : start + len(part)])
            done = start + len(part)
            if n >= 5000 and (done >= next_report or done == n):
                log(f"decoded {done}/{n} images ({time.perf_counter() - t0:.1f}s)")
                next_report = done + 5000
    return out


def _cache_dirs(root: Path) -> list[Path]:
    return [root / ".kdray-cache", Path("~/.cache/kdray/imagefolder").expanduser()]


def _cache_key(root: Path, parts: dict, size: int) -> str:
    h = hashlib.sha256()
    count = total = newest = 0
    for part, (classes, files) in sorted(parts.items()):
        h.update(f"{part}\0{classes}\0".encode())
        for path, label, nbytes, mtime in files:
            h.update(f"{os.path.relpath(path, root)}\0{label}\0{nbytes}\0{mtime}\n".encode())
            count, total, newest = count + 1, total + nbytes, max(newest, mtime)
    h.update(f"{root}|{count}|{total}|{newest}|{size}|v{_CACHE_VERSION}".encode())
    return h.hexdigest()[:24]


def _valid_cache(obj, parts, size) -> bool:
    if not isinstance(obj, dict) or obj.get("version") != _CACHE_VERSION:
        return False
    for part, (classes, files) in parts.items():
        x, y = obj.get(f"{part}_x"), obj.get(f"{part}_y")
        if obj.get(f"{part}_classes") != classes or not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            return False
        if x.dtype != torch.uint8 or tuple(x.shape) != (len(files), 3, size, size) or tuple(y.shape) != (len(files),):
            return False
    return True


def _read_cache(root: Path, name: str, parts, size):
    for d in _cache_dirs(root):
        f = d / name
        if not f.is_file():
            continue
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
            if _valid_cache(obj, parts, size):
                return obj
            log(f"ignoring stale or malformed cache {f}; rebuilding")
        except Exception as exc:
            log(f"ignoring unreadable cache {f} ({first_line(exc, 200)}); rebuilding")
    return None


def _remove_older_caches(d: Path, name: str) -> None:
    """Delete the other caches of this tree and size in ``d``: their content key is out of date."""
    for old in d.glob(name.rsplit("-", 1)[0] + "-*.pt"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _write_cache(root: Path, name: str, obj) -> Optional[Path]:
    for d in _cache_dirs(root):
        try:
            d.mkdir(parents=True, exist_ok=True)
            # readers (other ranks, other runs) never see a half-written cache
            atomic_write(d / name, lambda fh: torch.save(obj, fh), mode=0o644)
            _remove_older_caches(d, name)
            return d / name
        except Exception:
            pass  # not writable here: try the next cache directory
    log(f"could not write a decode cache for {root} (no writable cache directory)")
    return None


def tree_parts(data_dir) -> dict:
    """{"train": (classes, files)[, "test": (classes, files)]} of a class-per-folder tree, its
    ``train/`` and ``test/`` halves checked to name the same classes; files are (path, label,
    size, mtime_ns) in a stable order."""
    if not data_dir:
        raise KdrayError("imagefolder: --data-dir is required: a tree DIR/<class>/<image> "
                         "or DIR/train/<class>/... plus DIR/test/<class>/...")
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise KdrayError(f"imagefolder: data dir {root} does not exist or is not a directory")
    if (root / "train").is_dir() and (root / "test").is_dir():
        parts = {"train": _scan_tree(root / "train", "train dir"), "test": _scan_tree(root / "test", "test dir")}
        if parts["test"][0] != parts["train"][0]:
            tr, te = set(parts["train"][0]), set(parts["test"][0])
            raise KdrayError(f"imagefolder: test classes differ from train classes in {root}: "
                             f"only in train: {sorted(tr - te) or '-'}; only in test: {sorted(te - tr) or '-'}")
    else:
        parts = {"train": _scan_tree(root, "data dir")}
    classes = parts["train"][0]
    if len(classes) < 2:
        raise KdrayError(f"imagefolder: found only one class folder ({classes[0]}) in {root}; need at least 2")
    return parts


def load_imagefolder(cfg, size):
    """The tree at ``cfg.data_dir`` decoded at ``size`` (from the decode cache where it is current)."""
    parts = tree_parts(getattr(cfg, "data_dir", None))
    root = Path(cfg.data_dir).expanduser().resolve()
    classes = parts["train"][0]
    root_id = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    name = f"imagefolder-{root_id}-{size}px-{_cache_key(root, parts, size)}.pt"
    obj = _read_cache(root, name, parts, size)
    if obj is None:
        total = sum(len(f) for _, f in parts.values())
        log(f"decoding {total} images from {root} at {size}px (cached for next time)")
        obj = {"version": _CACHE_VERSION}
        for part, (cls_names, files) in parts.items():
            obj[f"{part}_classes"] = cls_names
            obj[f"{part}_x"] = _decode_files([f[0] for f in files], size)
            obj[f"{part}_y"] = torch.tensor([f[1] for f in files], dtype=torch.long)
        _write_cache(root, name, obj)
    if "test" in parts:
        return classes, obj["train_x"], obj["train_y"], obj["test_x"], obj["test_y"]
    return classes, obj["train_x"], obj["train_y"], None, None
