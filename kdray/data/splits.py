"""Train/val/test splits: the :class:`Split` tensors, seeded stratified index splits (the test
split fixed forever, validation and train subsets by ``data_seed``), and the stable seeds and
generators every replayable random choice of the data stage is drawn from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch

TEST_FRACTION = 0.2  # held-out test share for datasets without an official test split


_TEST_SPLIT_SEED = 20240601  # fixed forever: the test split never changes


@dataclass
class Split:
    """One split: ``x`` uint8 [N,3,H,W] (CPU, contiguous) and ``y`` int64 [N]; a streamed split has
    no ``x`` but ``records``, each sample's locator (see :mod:`kdray.data.catalog`)."""

    x: Optional[torch.Tensor]
    y: torch.Tensor
    records: Optional[list] = None

    def __len__(self) -> int:
        return int(self.y.shape[0])


def mixed_seed(*parts) -> int:
    """A 63-bit seed mixed from ints/strings (stable across processes and platforms)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_generator(*parts) -> torch.Generator:
    """A CPU generator seeded with :func:`mixed_seed` of ``parts``."""
    return torch.Generator().manual_seed(mixed_seed(*parts))


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
        test, pool = _stratified_take(y, test_fraction, seeded_generator("test", _TEST_SPLIT_SEED), keep_one=True)
        out["test"] = test
    val, rest = _stratified_take(y[pool], val_fraction, seeded_generator("val", int(data_seed)), keep_one=True)
    out["val"] = pool[val]
    rest = pool[rest]
    if train_fraction < 1.0:
        sub, _ = _stratified_take(y[rest], train_fraction, seeded_generator("train", int(data_seed)), keep_one=False)
        rest = rest[sub]
    out["train"] = rest
    return out
