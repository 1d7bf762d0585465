"""A loaded dataset (:class:`DataBundle`: three splits, classes, statistics, augmentation defaults)
and the image arithmetic every source shares: resizing a batch, fitting one image, per-channel
statistics; and the data stage's progress line on stderr."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdray.data.splits import Split

DEFAULT_IMAGE_SIZE = 32
VIEW_KINDS = ("auto", "pad_crop", "resized_crop")  # auto: pad_crop up to 64 px, resized_crop above
PAD_CROP_MAX_SIZE = 64
DATA_PATHS = ("auto", "memory", "stream")
BAD_IMAGE_POLICIES = ("fail", "skip")


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
    views: object  # ViewSpec (pad-and-crop) or ResizedCropViews: the training views and the eval transform
    path: str = "memory"  # "memory": splits hold decoded tensors; "stream": Ray Data decodes them per batch
    fingerprint: str = ""  # the source's files and the splits, where known without hashing pixels
    reader: object = None  # streamed: the ImageReader that fetches and decodes a split's records

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def crop_padding(self) -> int:
        return int(getattr(self.views, "crop_padding", 0))

    @property
    def hflip(self) -> bool:
        return bool(self.views.hflip)

    @property
    def streamed(self) -> bool:
        return self.path == "stream"


def resize_batch(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize uint8 [N,3,H,W] to [N,3,size,size] with antialiased bilinear (no-op when equal)."""
    if x.shape[-2:] == (size, size):
        return x.contiguous()
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, x.shape[0], chunk):
        part = F.interpolate(x[i : i + chunk].float(), size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False)
        out[i : i + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def resize_uint8(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [C,H,W] resized to [C,height,width], antialiased bilinear. On the CPU straight on the
    uint8 image (torch's vectorised uint8 kernel: about 4x faster than through float32, and what the
    streaming path's decode tasks run); elsewhere (no uint8 kernel on CUDA) through float32, rounded."""
    if img.device.type == "cpu":
        return F.interpolate(img[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]
    out = F.interpolate(img[None].float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def fit_image(img: torch.Tensor, size: int) -> torch.Tensor:
    """One uint8 [3,H,W] image to [3,size,size]: shorter side to ``size``, then centre crop."""
    h, w = img.shape[-2:]
    if (h, w) == (size, size):
        return img
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    return resize_uint8(img.contiguous(), nh, nw)[:, top : top + size, left : left + size].contiguous()


def channel_stats(x: torch.Tensor):
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


def log(msg: str) -> None:
    """One progress line of the data stage on stderr."""
    print(f"kdray.data: {msg}", file=sys.stderr, flush=True)
