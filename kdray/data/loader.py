"""The batch loader: a whole split held on the training device, shuffled, sharded across DDP ranks
like ``DistributedSampler``, each sample seen as its replayable view, normalised on the way out."""

from __future__ import annotations

import math

import torch

from kdray.core.errors import KdrayError
from kdray.data.splits import Split, seeded_generator
from kdray.data.views import ViewKeys, ViewSpec, normalisation, to_float


def shard_size(n: int, train: bool, rank: int, world_size: int) -> int:
    """How many samples rank ``rank`` sees per epoch (training pads every rank to the same count)."""
    return math.ceil(n / world_size) if train else len(range(rank, n, world_size))


def rank_order(n: int, train: bool, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s sample indices in batch order, as ``DistributedSampler`` gives them: training
    takes a permutation seeded by (seed, epoch), the same on every rank, padded to a multiple of
    ``world_size`` by repeating its start, then every ``world_size``-th; eval takes r, r+world, ..."""
    if not train:
        return torch.arange(rank, n, world_size)
    perm = torch.randperm(n, generator=seeded_generator("shuffle", seed, epoch))
    total = shard_size(n, True, rank, world_size) * world_size
    if total > n:
        perm = perm.repeat(math.ceil(total / n))[:total]
    return perm[rank:total:world_size]


def check_shard(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise KdrayError(f"batch_size={batch_size!r} is out of range; allowed: >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size} is not a valid shard")


def view_images(views, x: torch.Tensor, index: torch.Tensor, view: torch.Tensor, train: bool) -> torch.Tensor:
    """Stored uint8 images ``x`` of samples ``index`` as a model sees them: each as its training
    view ``view`` (where the views augment), else the evaluation image."""
    if train and views.augments:
        return views.apply(x, view, index)
    return views.eval(x)


class ShardLoader:
    """What every loader of a split shares: this rank's shard of each epoch (:func:`rank_order`),
    each sample's view id, batch count and normalisation. A subclass yields the batches
    (:meth:`with_views`). Call :meth:`set_epoch` before each epoch."""

    def __init__(self, n: int, batch_size: int, *, mean, std, views, device, train: bool, seed: int, rank: int,
                 world_size: int, channels_last: bool):
        check_shard(batch_size, rank, world_size)
        self.n, self.batch_size, self.train, self.seed = int(n), int(batch_size), bool(train), int(seed)
        self.views = views
        self.rank, self.world_size = int(rank), int(world_size)
        self.device, self.channels_last = torch.device(device), bool(channels_last)
        self.epoch = 0
        self.num_samples = shard_size(self.n, self.train, self.rank, self.world_size)
        self._scale, self._shift = normalisation(mean, std, self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle and augmentation stream of ``epoch`` (training mode)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in batch order (CPU int64)."""
        return rank_order(self.n, self.train, self.seed, self.epoch, self.rank, self.world_size)

    def view_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """The view each of samples ``idx`` is seen as this epoch (all 0 when nothing augments)."""
        if self.train and self.views.augments:
            return self.views.view_ids(self.seed, self.epoch, idx)
        return torch.zeros_like(idx)

    def normalise(self, xb: torch.Tensor) -> torch.Tensor:
        return to_float(xb, self._scale, self._shift, self.channels_last)

    def with_views(self):
        raise NotImplementedError

    def __iter__(self):
        for x, y, _ in self.with_views():
            yield x, y


class BatchLoader(ShardLoader):
    """Batches from a whole split held on ``device``; DistributedSampler-style sharding.

    Training: :func:`rank_order` of the epoch; each sample is seen as
    the view :meth:`ViewSpec.view_ids` gives it (a pure function of seed, epoch and sample index).
    Eval: no shuffle, no augmentation, no duplicates: rank r takes samples r, r+world_size, ...
    Iterating yields ``(x float32 normalised [B,3,H,W], y int64)`` on ``device``; :meth:`with_views`
    adds each batch's :class:`ViewKeys`. The last batch may be smaller.
    """

    def __init__(self, split: Split, batch_size: int, *, mean, std, device="cpu", train: bool,
                 crop_padding=0, hflip=False, views=None, seed=0, rank=0, world_size=1, channels_last=False):
        views = views if views is not None else ViewSpec(int(crop_padding), bool(hflip))
        super().__init__(len(split.y), batch_size, mean=mean, std=std, views=views, device=device, train=train,
                         seed=seed, rank=rank, world_size=world_size, channels_last=channels_last)
        self.x = split.x.to(self.device)
        self.y = split.y.to(self.device)

    def with_views(self):
        """``(x, y, ViewKeys)`` for each batch of the epoch (views all 0 when nothing augments)."""
        idx = self.indices()
        idx_dev, views_dev = idx.to(self.device), self.view_ids(idx).to(self.device)
        for start in range(0, len(idx), self.batch_size):
            b, v = idx_dev[start : start + self.batch_size], views_dev[start : start + self.batch_size]
            xb = view_images(self.views, self.x.index_select(0, b), b, v, self.train)
            yield self.normalise(xb), self.y.index_select(0, b), ViewKeys(b, v)
