"""Image sets in: each source declared in one registry (name -> loader and default flip), decoded once
into ``uint8 [N,3,S,S]`` tensors, split train/val/test and summed up as a :class:`DataBundle`.

A loader takes ``(cfg, size)`` and returns ``(classes, train_x, train_y, test_x | None, test_y |
None)``; without an official test split, :func:`load_data` holds out a fixed stratified share.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from kdray.core.errors import KdrayError, choice_error
from kdray.core.io import first_line
from kdray.data.access import (
    CATALOGS,
    bundle_fingerprint,
    choose_path,
    decode_catalog,
    stats_sample_of,
    streamed_bundle,
)
from kdray.data.bundle import DEFAULT_IMAGE_SIZE, PAD_CROP_MAX_SIZE, DataBundle, channel_stats, resize_batch
from kdray.data.catalog import ImageReader
from kdray.data.imagefolder import load_imagefolder
from kdray.data.resized_crop import DEFAULT_RATIO, DEFAULT_SCALE, DEFAULT_VIEW_COUNT, ResizedCropViews
from kdray.data.splits import TEST_FRACTION, Split, seeded_generator, split_indices
from kdray.data.views import ViewSpec, default_crop_padding

_DOWNLOAD_SOCKET_TIMEOUT = 60.0  # seconds per socket operation while torchvision downloads


class Source(NamedTuple):
    """A registered dataset: its loader and whether its images may be mirrored (the hflip default)."""

    load: Callable
    hflip: bool


#: every dataset by name, in the order they are listed to users
SOURCES: dict[str, Source] = {}


def source(name: str, *, hflip: bool = True):
    """Decorator: register the loader it decorates as dataset ``name``."""
    def register(load: Callable) -> Callable:
        if name in SOURCES:
            raise ValueError(f"dataset {name!r} registered twice")
        SOURCES[name] = Source(load, hflip)
        return load

    return register


# ---------------------------------------------------------------------------------------------
# the sources
# ---------------------------------------------------------------------------------------------
@source("digits", hflip=False)
def _load_digits(cfg, size):
    """scikit-learn's 8x8 digits (embedded: nothing to download), grey as RGB."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.from_numpy(d.images).double().mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8)
    x = img[:, None].expand(-1, 3, -1, -1)
    y = torch.from_numpy(d.target).long()
    return [str(i) for i in range(10)], resize_batch(x, size), y, None, None


def _load_cifar(cfg, size, name):
    """CIFAR-10 or CIFAR-100 through torchvision: found under the data dir, else downloaded (unless off)."""
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
                             f"({first_line(exc, 200)}); {hint}") from None
        raise KdrayError(f"{name}: dataset not found under {root} (download is off); {hint}, "
                         "or turn download on") from None
    finally:
        socket.setdefaulttimeout(old_timeout)

    def tensors(ds):
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
        return resize_batch(x, size), torch.as_tensor(ds.targets, dtype=torch.long)

    tx, ty = tensors(train)
    vx, vy = tensors(test)
    return list(train.classes), tx, ty, vx, vy


@source("cifar10")
def _load_cifar10(cfg, size):
    return _load_cifar(cfg, size, "cifar10")


@source("cifar100")
def _load_cifar100(cfg, size):
    return _load_cifar(cfg, size, "cifar100")


source("imagefolder")(load_imagefolder)


@source("webdataset")
def _load_webdataset(cfg, size):
    """WebDataset-style tar shards (KEY.jpg + KEY.cls) at ``cfg.data_dir`` (decoded through the catalog)."""
    raise AssertionError("webdataset is read through its catalog")  # load_data never calls this


@source("fake", hflip=False)
def _load_fake(cfg, size, n_train=600, n_test=200, num_classes=10):
    """Synthetic images: a colour and a coarse pattern per class plus noise (seeded, no files)."""
    g = seeded_generator("fake", 0)
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


#: the registered datasets' names
DATASETS = tuple(SOURCES)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def _check_load_options(val_fraction: float, train_fraction: float, size: int) -> None:
    """Reject out-of-range options before any (possibly slow) dataset loading."""
    if not 0 < val_fraction < 1:
        raise KdrayError(f"val_fraction={val_fraction!r} is out of range; allowed: 0 < val_fraction < 1")
    if not 0 < train_fraction <= 1:
        raise KdrayError(f"train_fraction={train_fraction!r} is out of range; allowed: 0 < train_fraction <= 1")
    if size < 8:
        raise KdrayError(f"image_size={size!r} is out of range; allowed: >= 8")


def make_views(cfg, size: int, hflip_default: bool):
    """The training views of ``cfg`` at ``size`` px: pad-and-crop up to 64 px (CIFAR-size), else
    RandomResizedCrop (``views: auto``), or the kind ``cfg.views`` names."""
    hflip = getattr(cfg, "hflip", None)
    hflip = hflip_default if hflip is None else bool(hflip)
    kind = getattr(cfg, "views", "auto")
    if kind == "auto":
        kind = "pad_crop" if size <= PAD_CROP_MAX_SIZE else "resized_crop"
    if kind == "resized_crop":
        count = int(getattr(cfg, "view_count", DEFAULT_VIEW_COUNT))
        if count < 1:
            raise KdrayError(f"view_count={count!r} is out of range; allowed: >= 1")
        return ResizedCropViews(size, count, tuple(getattr(cfg, "crop_scale", DEFAULT_SCALE)),
                                tuple(getattr(cfg, "crop_ratio", DEFAULT_RATIO)), hflip)
    crop = getattr(cfg, "crop_padding", None)
    return ViewSpec(default_crop_padding(size) if crop is None else int(crop), hflip)


def _tensors_of(cfg, name: str, side: int, catalog):
    """(classes, x, y, test_x, test_y) decoded at ``side``: a catalog through its reader (image
    folders through their decode cache), any other source through its loader."""
    if catalog is None or name == "imagefolder":
        return SOURCES[name].load(cfg, side)
    return decode_catalog(catalog, ImageReader(catalog.kind, side, getattr(cfg, "bad_images", "fail")))


def load_data(cfg) -> DataBundle:
    """Load ``cfg.dataset``: split train/val/test, compute train statistics, and hold the splits
    decoded in memory or stream them (:func:`kdray.data.access.choose_path`)."""
    name = getattr(cfg, "dataset", "digits")
    if name not in SOURCES:
        raise choice_error("dataset", name, tuple(SOURCES))
    size = int(getattr(cfg, "image_size", None) or DEFAULT_IMAGE_SIZE)
    val_fraction = float(getattr(cfg, "val_fraction", 0.1))
    train_fraction = float(getattr(cfg, "train_fraction", 1.0))
    _check_load_options(val_fraction, train_fraction, size)
    views = make_views(cfg, size, SOURCES[name].hflip)
    side = views.base_size or size
    catalog = CATALOGS[name](cfg) if name in CATALOGS else None
    path = choose_path(cfg, catalog, side) if catalog is not None else "memory"
    if path == "stream":
        return streamed_bundle(cfg, name, catalog, views, size, val_fraction, train_fraction)
    classes, x, y, test_x, test_y = _tensors_of(cfg, name, side, catalog)
    idx = split_indices(y, val_fraction=val_fraction, train_fraction=train_fraction,
                        data_seed=int(getattr(cfg, "data_seed", 0) or 0),
                        test_fraction=TEST_FRACTION if test_x is None else None)
    if test_x is None:
        test_x, test_y = x[idx["test"]], y[idx["test"]]
    split = lambda i: Split(x[i].contiguous(), y[i].contiguous())
    train = split(idx["train"])
    mean, std = stats_sample_of(train.x) if catalog is not None else channel_stats(train.x)
    return DataBundle(
        name=name, classes=list(classes), train=train, val=split(idx["val"]),
        test=Split(test_x.contiguous(), test_y.long().contiguous()), mean=mean, std=std, image_size=size,
        views=views, fingerprint=bundle_fingerprint(catalog, idx, side) if catalog is not None else "",
    )
