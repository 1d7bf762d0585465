"""ImageNet-style replayable views: RandomResizedCrop (area ``scale`` and aspect ``ratio`` ranges) plus
horizontal flip for training, resize + centre crop for evaluation.

Every image is stored once at ``base_size`` (its shorter side resized to ``base_size``, then centre
cropped square: ``base_size = round(image_size / 0.875)``, the 256 -> 224 of ImageNet evaluation).
Sample ``i`` owns a finite set of ``count`` views (as FKD keeps a fixed set of crops per image);
view ``v`` is a crop box and a flip bit that are a pure function of (i, v) and the range settings,
drawn by an integer hash, so a teacher output stored for (i, v) is the output for that exact crop
on any machine, rank or shard. Which view a sample is seen as in an epoch is
:func:`kdray.data.views.view_ids` of (seed, epoch, i).

Unlike torchvision's ``RandomResizedCrop`` (ten rejection-sampling attempts, then a centre crop),
a box too large for the image is clamped to it: one draw, no retries, the same box everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from kdray.data.bundle import resize_uint8
from kdray.data.views import mix32, view_ids

EVAL_CROP_FRACTION = 0.875  # the centre crop's share of the stored side (224 of 256)
DEFAULT_VIEW_COUNT = 256
DEFAULT_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults
DEFAULT_RATIO = (3 / 4, 4 / 3)


def base_size_for(image_size: int) -> int:
    """The side images are stored at for ``image_size`` inputs (256 for 224)."""
    return int(round(image_size / EVAL_CROP_FRACTION))


def _uniform(index: torch.Tensor, views: torch.Tensor, salt: int) -> torch.Tensor:
    """A float64 in [0, 1) per (index, view), a pure function of both and ``salt``."""
    x = mix32(index.to(torch.int64) * 0x9E3779B1 + salt)
    x = mix32(x ^ views.to(torch.int64) * 0x85EBCA77)
    return x.double() / 2.0**32


@dataclass(frozen=True)
class ResizedCropViews:
    """``count`` RandomResizedCrop views per sample, cut from images stored at :attr:`base_size`
    and resized to ``image_size``; ``hflip`` mirrors about half of them."""

    image_size: int
    count: int = DEFAULT_VIEW_COUNT
    scale: tuple = DEFAULT_SCALE
    ratio: tuple = DEFAULT_RATIO
    hflip: bool = True

    def __post_init__(self):
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        object.__setattr__(self, "ratio", tuple(float(r) for r in self.ratio))

    @property
    def base_size(self) -> int:
        return base_size_for(self.image_size)

    @property
    def augments(self) -> bool:
        return True

    def to_dict(self) -> dict:
        return {"kind": "resized_crop", "count": self.count, "scale": list(self.scale),
                "ratio": list(self.ratio), "hflip": self.hflip, "base_size": self.base_size}

    def view_ids(self, seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
        return view_ids(self.count, seed, epoch, index)

    def boxes(self, index: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """int64 [B, 5]: (top, left, height, width, flip) of view ``views[b]`` of sample ``index[b]``
        on the ``base_size`` square."""
        index, views = index.cpu(), views.cpu()
        side = self.base_size
        lo, hi = self.scale
        area = side * side * (lo + (hi - lo) * _uniform(index, views, 1))
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * _uniform(index, views, 2))
        w = torch.sqrt(area * aspect).round().clamp(1, side).long()
        h = torch.sqrt(area / aspect).round().clamp(1, side).long()
        top = (_uniform(index, views, 3) * (side - h + 1)).floor().long()
        left = (_uniform(index, views, 4) * (side - w + 1)).floor().long()
        flip = (mix32(index.to(torch.int64) * 31 + views.to(torch.int64) * 0x27D4EB2F) & 1) if self.hflip \
            else torch.zeros_like(top)
        return torch.stack([top, left, h, w, flip], 1)

    def apply(self, x: torch.Tensor, views: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """uint8 [B,3,image_size,image_size]: view ``views[b]`` of sample ``index[b]``, cut from the
        stored uint8 [B,3,base,base] batch ``x`` (one antialiased bilinear resize per image)."""
        if index is None:
            raise ValueError("resized-crop views depend on the sample: pass its index")
        out = torch.empty((x.shape[0], x.shape[1], self.image_size, self.image_size), dtype=torch.uint8,
                          device=x.device)
        for b, (top, left, h, w, flip) in enumerate(self.boxes(index, views).tolist()):
            crop = x[b, :, top : top + h, left : left + w]
            if flip:
                crop = crop.flip(-1)
            out[b] = resize_uint8(crop.contiguous(), self.image_size, self.image_size)
        return out

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation image: the centre ``image_size`` square of the stored image."""
        top = (x.shape[-1] - self.image_size) // 2
        return x[..., top : top + self.image_size, top : top + self.image_size].contiguous()
