"""Datasets decoded once into uint8 tensors, seeded stratified splits, and a tensor batch loader.

Every dataset becomes ``uint8 [N,3,S,S]`` tensors at load time (no per-sample PIL in the hot
loop). :class:`BatchLoader` keeps a whole split on the training device and does random crop and
flip as batch tensor ops, sharded across DDP ranks like ``DistributedSampler``.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from kdray.core.errors import KdrayError, choice_error

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "fake")
DEFAULT_IMAGE_SIZE = 32
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
TEST_FRACTION = 0.2  # held-out test share for datasets without an official test split
_TEST_SPLIT_SEED = 20240601  # fixed forever: the test split never changes
_CACHE_VERSION = 1
_DOWNLOAD_SOCKET_TIMEOUT = 60.0  # seconds per socket operation while torchvision downloads


@dataclass
class Split:
    """One split: ``x`` uint8 [N,3,H,W] (CPU, contiguous) and ``y`` int64 [N]."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class DataBundle:
    """A loaded dataset: three splits, class names, train-split statistics and augmentation defaults."""

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    mean: tuple[float, float, float]  # per channel, [0,1] pixel units, from the train split
    std: tuple[float, float, float]
    image_size: int
    crop_padding: int
    hflip: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------------------------------
# seeding and splits


def _seed(*parts) -> int:
    """A 63-bit seed mixed from ints/strings (stable across processes and platforms)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def _stratified_take(y: torch.Tensor, fraction: float, gen: torch.Generator, *, keep_one: bool):
    """Per class, a seeded permutation split into (taken, rest) index tensors into ``y``.

    A class of n samples gives ``round(fraction * n)`` to ``taken``, clamped so that both parts
    keep at least one sample when n >= 2 (``keep_one``: the rest keeps one) or, without it, so
    that ``taken`` has at least one.
    """
    taken, rest = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n = len(idx)
        k = int(round(fraction * n))
        if keep_one:
            k = min(max(k, 1 if n >= 2 else 0), n - 1)
        else:
            k = min(max(k, 1), n)
        taken.append(idx[:k])
        rest.append(idx[k:])
    cat = lambda parts: torch.sort(torch.cat(parts)).values if parts else torch.zeros(0, dtype=torch.long)
    return cat(taken), cat(rest)


def split_indices(
    y: torch.Tensor,
    *,
    val_fraction: float,
    train_fraction: float = 1.0,
    data_seed: int = 0,
    test_fraction: Optional[float] = None,
) -> dict[str, torch.Tensor]:
    """Sorted int64 indices into ``y`` for ``train``, ``val`` and (with ``test_fraction``) ``test``.

    Test is a fixed-seed stratified share (never depends on ``data_seed``); validation is a
    ``data_seed``-seeded stratified share of the rest; ``train_fraction`` then takes a seeded
    stratified subset of what remains (at least one per class). Validation does not depend on
    ``train_fraction``, and smaller fractions give nested subsets.
    """
    y = torch.as_tensor(y, dtype=torch.long).cpu()
    out = {}
    pool = torch.arange(len(y))
    if test_fraction is not None:
        test, pool = _stratified_take(y, test_fraction, _generator("test", _TEST_SPLIT_SEED), keep_one=True)
        out["test"] = test
    val, rest = _stratified_take(y[pool], val_fraction, _generator("val", int(data_seed)), keep_one=True)
    out["val"] = pool[val]
    rest = pool[rest]
    if train_fraction < 1.0:
        sub, _ = _stratified_take(y[rest], train_fraction, _generator("train", int(data_seed)), keep_one=False)
        rest = rest[sub]
    out["train"] = rest
    return out


# ---------------------------------------------------------------------------------------------
# image helpers


def _resize_batch(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize uint8 [N,3,H,W] to [N,3,size,size] with antialiased bilinear (no-op when equal)."""
    if x.shape[-2:] == (size, size):
        return x.contiguous()
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, x.shape[0], chunk):
        part = F.interpolate(x[i : i + chunk].float(), size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False)
        out[i : i + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _fit_image(img: torch.Tensor, size: int) -> torch.Tensor:
    """One uint8 [3,H,W] image to [3,size,size]: shorter side to ``size``, then centre crop."""
    h, w = img.shape[-2:]
    if (h, w) == (size, size):
        return img
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    out = out[:, top : top + size, left : left + size]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _channel_stats(x: torch.Tensor):
    """Per-channel mean and std of uint8 [N,3,H,W] in [0,1] units (exact, via histograms)."""
    if x.shape[0] == 0:
        return (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    values = torch.arange(256, dtype=torch.float64)
    mean, std = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        m = float((hist * values).sum() / hist.sum())
        var = float((hist * (values - m).square()).sum() / hist.sum())
        mean.append(m / 255)
        std.append(max(math.sqrt(var), 1e-3 * 255) / 255)
    return tuple(mean), tuple(std)


def _log(msg: str) -> None:
    print(f"kdray.data: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# datasets: each returns (classes, train_x, train_y, test_x | None, test_y | None)


def _load_digits(cfg, size):
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.from_numpy(d.images).double().mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8)
    x = img[:, None].expand(-1, 3, -1, -1)
    y = torch.from_numpy(d.target).long()
    return [str(i) for i in range(10)], _resize_batch(x, size), y, None, None


def _load_fake(cfg, size, n_train=600, n_test=200, num_classes=10):
    g = _generator("fake", 0)
    colours = torch.rand(num_classes, 3, 1, 1, generator=g) * 2 - 1
    patterns = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g) * 2 - 1, size=(size, size),
                             mode="bilinear", align_corners=False)
    protos = 0.5 * colours + 0.5 * patterns

    def make(n):
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = 128 + 70 * protos[y] + 40 * torch.randn(n, 3, size, size, generator=g)
        return x.round().clamp(0, 255).to(torch.uint8), y.long()

    tx, ty = make(n_train)
    vx, vy = make(n_test)
    return [f"class{i}" for i in range(num_classes)], tx, ty, vx, vy


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _load_cifar(cfg, size, name):
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    root = Path(getattr(cfg, "data_dir", None) or "~/.cache/kdray/data").expanduser()
    download = bool(getattr(cfg, "download", True))
    hint = (f"put the '{label} python version' ({folder}/, from {cls.url}) there or pass --data-dir, "
            "or use --dataset imagefolder --data-dir TREE")
    old_timeout = socket.getdefaulttimeout()
    try:
        if download and old_timeout is None:
            socket.setdefaulttimeout(_DOWNLOAD_SOCKET_TIMEOUT)  # a stalled connection fails instead of hanging
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except Exception as exc:
        if download:
            raise KdrayError(f"{name}: dataset not found under {root} and download failed "
                             f"({_one_line(exc)}); {hint}") from None
        raise KdrayError(f"{name}: dataset not found under {root} (download is off); {hint}, "
                         "or turn download on") from None
    finally:
        socket.setdefaulttimeout(old_timeout)

    def tensors(ds):
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
        return _resize_batch(x, size), torch.as_tensor(ds.targets, dtype=torch.long)

    tx, ty = tensors(train)
    vx, vy = tensors(test)
    return list(train.classes), tx, ty, vx, vy


# ---------------------------------------------------------------------------------------------
# imagefolder


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


def _decode_one(path: str, raw: bytes, tv) -> torch.Tensor:
    """Decode one file's bytes to uint8 [3,H,W] RGB: torchvision.io first, PIL as the fallback."""
    if tv is not None and raw:
        try:
            return tv[1](_as_tensor(raw), mode=tv[0].RGB)
        except Exception:
            pass
    try:
        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as im:
            arr = np.array(im.convert("RGB"))
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    except Exception as exc:
        raise KdrayError(f"imagefolder: cannot decode image {path} ({_one_line(exc)})") from None


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
    return [_fit_image(_decode_one(path, raw, tv) if img is None else img, size)
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
                _log(f"decoded {done}/{n} images ({time.perf_counter() - t0:.1f}s)")
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
            _log(f"ignoring stale or malformed cache {f}; rebuilding")
        except Exception as exc:
            _log(f"ignoring unreadable cache {f} ({_one_line(exc)}); rebuilding")
    return None


def _remove_if_present(path: str) -> None:
    """Best-effort delete: a leftover temp file must not turn a failed write into a crash."""
    if os.path.exists(path):
        try:
            os.remove(path)
        except OSError:
            pass


def _save_atomically(obj, target: Path) -> None:
    """``torch.save`` into a temp file beside ``target``, then rename it over ``target``.

    Readers (other ranks, other runs) never see a half-written cache; on failure the temp file is
    removed and the error re-raised.
    """
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except Exception:
        _remove_if_present(tmp)
        raise


def _remove_older_caches(d: Path, name: str) -> None:
    """Delete the other caches of this tree and size in ``d``: their content key is out of date."""
    for old in d.glob(name.rsplit("-", 1)[0] + "-*.pt"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _write_cache(root: Path, name: str, obj) -> Optional[Path]:
    for d in _cache_dirs(root):
        try:
            d.mkdir(parents=True, exist_ok=True)
            _save_atomically(obj, d / name)
            _remove_older_caches(d, name)
            return d / name
        except Exception:
            pass  # not writable here: try the next cache directory
    _log(f"could not write a decode cache for {root} (no writable cache directory)")
    return None


def _load_imagefolder(cfg, size):
    data_dir = getattr(cfg, "data_dir", None)
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

    root_id = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    name = f"imagefolder-{root_id}-{size}px-{_cache_key(root, parts, size)}.pt"
    obj = _read_cache(root, name, parts, size)
    if obj is None:
        total = sum(len(f) for _, f in parts.values())
        _log(f"decoding {total} images from {root} at {size}px (cached for next time)")
        obj = {"version": _CACHE_VERSION}
        for part, (cls_names, files) in parts.items():
            obj[f"{part}_classes"] = cls_names
            obj[f"{part}_x"] = _decode_files([f[0] for f in files], size)
            obj[f"{part}_y"] = torch.tensor([f[1] for f in files], dtype=torch.long)
        _write_cache(root, name, obj)
    if "test" in parts:
        return classes, obj["train_x"], obj["train_y"], obj["test_x"], obj["test_y"]
    return classes, obj["train_x"], obj["train_y"], None, None


# ---------------------------------------------------------------------------------------------
# entry point


def default_crop_padding(image_size: int) -> int:
    """Random-crop padding used when the config leaves it unset: 4 px at 32 px."""
    return max(0, round(image_size / 8))


def _check_load_options(val_fraction: float, train_fraction: float, size: int) -> None:
    """Reject out-of-range options before any (possibly slow) dataset loading."""
    if not 0 < val_fraction < 1:
        raise KdrayError(f"val_fraction={val_fraction!r} is out of range; allowed: 0 < val_fraction < 1")
    if not 0 < train_fraction <= 1:
        raise KdrayError(f"train_fraction={train_fraction!r} is out of range; allowed: 0 < train_fraction <= 1")
    if size < 8:
        raise KdrayError(f"image_size={size!r} is out of range; allowed: >= 8")


def _load_source(cfg, name: str, size: int):
    """The named dataset's loader: (classes, train_x, train_y, test_x | None, test_y | None)."""
    if name == "digits":
        return _load_digits(cfg, size)
    if name == "fake":
        return _load_fake(cfg, size)
    if name == "imagefolder":
        return _load_imagefolder(cfg, size)
    return _load_cifar(cfg, size, name)


def load_data(cfg) -> DataBundle:
    """Load ``cfg.dataset`` as uint8 tensors, split train/val/test and compute train statistics."""
    name = getattr(cfg, "dataset", "digits")
    if name not in DATASETS:
        raise choice_error("dataset", name, DATASETS)
    size = int(getattr(cfg, "image_size", None) or DEFAULT_IMAGE_SIZE)
    val_fraction = float(getattr(cfg, "val_fraction", 0.1))
    train_fraction = float(getattr(cfg, "train_fraction", 1.0))
    _check_load_options(val_fraction, train_fraction, size)
    classes, x, y, test_x, test_y = _load_source(cfg, name, size)

    idx = split_indices(y, val_fraction=val_fraction, train_fraction=train_fraction,
                        data_seed=int(getattr(cfg, "data_seed", 0) or 0),
                        test_fraction=TEST_FRACTION if test_x is None else None)
    if test_x is None:
        test_x, test_y = x[idx["test"]], y[idx["test"]]
    split = lambda i: Split(x[i].contiguous(), y[i].contiguous())
    train = split(idx["train"])
    mean, std = _channel_stats(train.x)
    crop = getattr(cfg, "crop_padding", None)
    hflip = getattr(cfg, "hflip", None)
    return DataBundle(
        name=name,
        classes=list(classes),
        train=train,
        val=split(idx["val"]),
        test=Split(test_x.contiguous(), test_y.long().contiguous()),
        mean=mean,
        std=std,
        image_size=size,
        crop_padding=default_crop_padding(size) if crop is None else int(crop),
        hflip=(name not in ("digits", "fake")) if hflip is None else bool(hflip),
    )


# ---------------------------------------------------------------------------------------------
# augmentation and batching


def crop_and_flip(x: torch.Tensor, crop_padding: int, dy: torch.Tensor, dx: torch.Tensor,
                  flip: Optional[torch.Tensor]) -> torch.Tensor:
    """Window (dy, dx) of each zero-padded uint8 image, mirrored where ``flip``: one gather over the
    whole batch on ``x``'s device. Returns a new contiguous [B,C,H,W] tensor."""
    p = int(crop_padding)
    b, c, h, w = x.shape
    dev = x.device
    if p > 0:
        x = F.pad(x, (p, p, p, p))
    cols = torch.arange(w, device=dev).expand(b, w)
    if flip is not None:
        cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)
    rows = dy.to(dev)[:, None] + torch.arange(h, device=dev)
    cols = dx.to(dev)[:, None] + cols
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return x[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def augment_batch(
    x: torch.Tensor, crop_padding: int, hflip: bool, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """Random crop (zero padding ``crop_padding``) and random horizontal flip of a uint8 batch,
    offsets and flips drawn from ``generator`` (``x`` itself when both augmentations are off)."""
    p = int(crop_padding)
    if p <= 0 and not hflip:
        return x
    b = x.shape[0]
    gdev = generator.device if generator is not None else x.device
    dy = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=gdev)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=gdev)
    flip = (torch.rand(b, generator=generator, device=gdev) < 0.5) if hflip else None
    return crop_and_flip(x, p, dy, dx, flip)


@dataclass(frozen=True)
class ViewSpec:
    """The finite set of training views: every crop offset of a ``crop_padding``-padded image, each
    mirrored or not (``(2p+1)^2 x 2`` views; 162 at p = 4). View ``v`` is ``flip = v % 2`` (with
    flips), then row offset and column offset of the remaining index."""

    crop_padding: int
    hflip: bool

    @property
    def count(self) -> int:
        return (2 * self.crop_padding + 1) ** 2 * (2 if self.hflip else 1)

    @property
    def augments(self) -> bool:
        return self.count > 1

    def to_dict(self) -> dict:
        return {"crop_padding": self.crop_padding, "hflip": self.hflip}

    def view_ids(self, seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
        """The view of each sample ``index`` in ``epoch``: a pure function of (seed, epoch, sample
        index), independent of batch size, rank, worker count and shuffle order, so a teacher's
        output for it can be recomputed or looked up anywhere."""
        x = index.to(torch.int64) + _seed("view", seed, epoch) % (1 << 31)
        for _ in range(2):  # a 32-bit integer mixer; products stay below 2^62, no int64 overflow
            x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
        x = (x >> 16) ^ x
        return x % self.count

    def apply(self, x: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """The uint8 batch ``x`` (sample b seen as view ``views[b]``)."""
        if not self.augments:
            return x
        flip = None
        if self.hflip:
            flip, views = views % 2 == 1, views // 2
        side = 2 * self.crop_padding + 1
        return crop_and_flip(x, self.crop_padding, views // side, views % side, flip)


def normalisation(mean, std, device="cpu") -> tuple:
    """(scale, shift) turning uint8 pixels into normalised floats: ``x * scale - shift``."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * std_t), mean_t / std_t


def to_float(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A uint8 batch as the normalised float32 batch every model of a run sees."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt).float().mul_(scale).sub_(shift)


@dataclass(frozen=True)
class ViewKeys:
    """Which sample of the train split (``index``) each row of a batch is, seen as which view."""

    index: torch.Tensor
    view: torch.Tensor


class BatchLoader:
    """Batches from a whole split held on ``device``; DistributedSampler-style sharding.

    Training: a permutation seeded by (seed, epoch), identical on every rank, padded to a multiple
    of ``world_size`` by repeating its start, then ``perm[rank::world_size]``; each sample is seen as
    the view :meth:`ViewSpec.view_ids` gives it (a pure function of seed, epoch and sample index).
    Call :meth:`set_epoch` before each epoch. Eval: no shuffle, no augmentation, no duplicates: rank
    r takes samples r, r+world_size, ... Iterating yields ``(x float32 normalised [B,3,H,W], y
    int64)`` on ``device``; :meth:`with_views` adds each batch's :class:`ViewKeys`. The last batch
    may be smaller.
    """

    def __init__(self, split: Split, batch_size: int, *, mean, std, device="cpu", train: bool,
                 crop_padding=0, hflip=False, seed=0, rank=0, world_size=1, channels_last=False):
        if batch_size < 1:
            raise KdrayError(f"batch_size={batch_size!r} is out of range; allowed: >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size} is not a valid shard")
        self.device = torch.device(device)
        self.x = split.x.to(self.device)
        self.y = split.y.to(self.device)
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.views = ViewSpec(int(crop_padding), bool(hflip))
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.channels_last = bool(channels_last)
        self.epoch = 0
        n = len(self.y)
        self.num_samples = math.ceil(n / self.world_size) if self.train else len(range(self.rank, n, self.world_size))
        self._scale, self._shift = normalisation(mean, std, self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle and augmentation stream of ``epoch`` (training mode)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in batch order (CPU int64)."""
        n = len(self.y)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        perm = torch.randperm(n, generator=_generator("shuffle", self.seed, self.epoch))
        total = self.num_samples * self.world_size
        if total > n:
            perm = perm.repeat(math.ceil(total / n))[:total]
        return perm[self.rank : total : self.world_size]

    def normalise(self, xb: torch.Tensor) -> torch.Tensor:
        return to_float(xb, self._scale, self._shift, self.channels_last)

    def with_views(self):
        """``(x, y, ViewKeys)`` for each batch of the epoch (views all 0 when nothing augments)."""
        idx = self.indices()
        augment = self.train and self.views.augments
        views = self.views.view_ids(self.seed, self.epoch, idx) if augment else torch.zeros_like(idx)
        idx_dev, views_dev = idx.to(self.device), views.to(self.device)
        for start in range(0, len(idx), self.batch_size):
            b, v = idx_dev[start : start + self.batch_size], views_dev[start : start + self.batch_size]
            xb = self.x.index_select(0, b)
            if augment:
                xb = self.views.apply(xb, v)
            yield self.normalise(xb), self.y.index_select(0, b), ViewKeys(b, v)

    def __iter__(self):
        for x, y, _ in self.with_views():
            yield x, y
