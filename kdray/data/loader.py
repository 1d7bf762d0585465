"""The batch loader: a whole split held on the training device, shuffled, sharded across DDP ranks
like ``DistributedSampler``, each sample seen as its replayable view, normalised on the way out."""

from __future__ import annotations

import math

import torch

from kdray.core.errors import KdrayError
from kdray.data.splits import Split, seeded_generator
from kdray.data.views import ViewKeys, ViewSpec, normalisation, to_float


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
        perm = torch.randperm(n, generator=seeded_generator("shuffle", self.seed, self.epoch))
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
