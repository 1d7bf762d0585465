"""Replayable training views: the finite set of crop offsets and flips (:class:`ViewSpec`), each
sample's view a pure function of (seed, epoch, index) so a teacher's output for it can be stored
and looked up; the crop-and-flip gather that makes them; and uint8 -> normalised float."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kdray.data.splits import mixed_seed


def default_crop_padding(image_size: int) -> int:
    """Random-crop padding used when the config leaves it unset: 4 px at 32 px."""
    return max(0, round(image_size / 8))


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


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors (products stay below 2^62: no int64 overflow)."""
    x = x & 0xFFFFFFFF
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


def view_ids(count: int, seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """The view (of ``count``) each sample ``index`` is seen as in ``epoch``: a pure function of
    (seed, epoch, sample index), independent of batch size, rank, worker count, shard assignment and
    shuffle order, so a teacher's output for it can be recomputed or looked up anywhere."""
    x = index.to(torch.int64) + mixed_seed("view", seed, epoch) % (1 << 31)
    return mix32(x) % count


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

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation image: the stored image itself."""
        return x

    @property
    def base_size(self) -> Optional[int]:
        """Side of the stored images these views are cut from (None: the input size itself)."""
        return None

    def view_ids(self, seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
        """The view of each sample ``index`` in ``epoch`` (see :func:`view_ids`)."""
        return view_ids(self.count, seed, epoch, index)

    def apply(self, x: torch.Tensor, views: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The uint8 batch ``x`` (sample b seen as view ``views[b]``; ``index`` is not needed:
        every sample has the same set of crop offsets)."""
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
