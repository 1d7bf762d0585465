"""The streaming path: a split too large to hold decoded is read, decoded and cut into its views by
Ray Data tasks spread over the cluster's CPUs, one epoch of one rank's shard at a time.

Each Train worker streams exactly the samples :func:`kdray.data.loader.rank_order` gives its rank
(the shard ``DistributedSampler`` and the in-memory loader give it), each seen as the view of
(seed, epoch, index), in the same order: a streamed run sees the batches an in-memory run sees.
What a worker holds is bounded by Ray Data's streaming executor (its backpressure keeps the blocks
in flight within the object store's budget, spilling beyond it), not by the set: one epoch's list
of this rank's locators, and a few batches in flight.

Why a dataset per epoch and rank rather than Ray Train's ``datasets=`` / ``get_dataset_shard``:
the view of a sample depends on the epoch, which a dataset handed to the trainer once cannot know
inside its map tasks; building the epoch's dataset in the worker passes it in, and keeps the shard
assignment independent of Ray's block placement, so teacher outputs stored by (sample, view) match.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kdray.core.raystart import start_ray
from kdray.data.bundle import log
from kdray.data.catalog import ImageReader, display
from kdray.data.loader import ShardLoader, view_images
from kdray.data.splits import Split
from kdray.data.views import ViewKeys

MAX_ROWS_PER_TASK = 128  # images one Ray Data task decodes at most: enough to amortise a task, few enough to spread


def _ray_data():
    """``ray.data``, with Ray running and Ray Data's console quiet (no progress bars, no lines per
    dataset: the run prints its own progress)."""
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # before the settings: each logs a warning
    start_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # order matters: the batches must be the rank's shard in its order (Ray Data may reorder
    # otherwise). The setting is the process's current DataContext, which a dataset copies when made.
    ctx.execution_options.preserve_order = True
    return ray.data


def _on_this_node() -> dict:
    """Ray remote args that run a task on this process's node when it can (soft affinity): a rank's
    images are decoded where it trains, so encoded bytes travel between nodes, decoded ones (6x to
    20x larger) do not. (Ray Data's own ``locality_with_output`` option is a no-op since 2.4x.)"""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)}


def decode_batch(batch: dict, reader: ImageReader, views, train: bool) -> dict:
    """A Ray Data task's work: fetch and decode ``batch["loc"]``, cut each sample's view."""
    x, ok = reader.decode(list(batch["loc"]))
    index, view = torch.tensor(batch["index"]), torch.tensor(batch["view"])  # Ray's arrays are read-only
    x = view_images(views, x, index, view, train)
    return {"x": x.numpy(), "ok": ok.numpy(), "index": batch["index"], "view": batch["view"],
            "loc": batch["loc"], "node": np.array([_node_id()] * len(index))}


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()[:12]


def _decode_slots(world_size: int) -> int:
    """How many decode tasks one rank keeps running: its share of the cluster's CPUs."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)) // max(world_size, 1))


def _epoch_dataset(records, index: torch.Tensor, view: torch.Tensor, fn_kwargs: dict, world_size: int,
                   block: int):
    """The Ray Dataset of one epoch of one rank: blocks of ``block`` locators in order (a block a
    batch, or an even share of one: batches are then whole blocks, not copied together)."""
    data = _ray_data()
    rows = [{"index": i, "view": v, "loc": records[i]} for i, v in zip(index.tolist(), view.tolist())]
    # from_items builds its blocks here; from_arrow would run a metadata task per table needing a CPU
    # that the Train workers hold (ray/data/read_api.py from_arrow_refs): it would wait for ever
    ds = data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / block)))
    # Decode tasks reserve no CPU: the Train workers hold the cluster's CPUs while they wait for
    # these very batches, so tasks asking for one would never be scheduled (Ray Train + Ray Data on
    # a full cluster deadlock). Their number is capped instead: the rank's share of the cluster's CPUs.
    return ds.map_batches(decode_batch, batch_size=None, batch_format="numpy", fn_kwargs=fn_kwargs,
                          num_cpus=0, concurrency=_decode_slots(world_size), **_on_this_node())


class StreamLoader(ShardLoader):
    """A split's batches streamed through Ray Data; the interface of
    :class:`kdray.data.loader.BatchLoader` (``set_epoch``, ``with_views``, iteration, ``len``).

    ``skipped`` counts the undecodable images dropped this epoch (``bad_images: skip``); the first
    is named in the log line at the epoch's end."""

    def __init__(self, split: Split, reader: ImageReader, batch_size: int, *, mean, std, views, device="cpu",
                 train: bool, seed=0, rank=0, world_size=1, channels_last=False, prefetch: int = 4):
        super().__init__(len(split.y), batch_size, mean=mean, std=std, views=views, device=device, train=train,
                         seed=seed, rank=rank, world_size=world_size, channels_last=channels_last)
        self.records, self.y, self.reader, self.prefetch = split.records, split.y, reader, prefetch
        self.skipped, self._said = 0, False

    def uint8_batches(self):
        """``(uint8 x, index, view)`` of each batch of the epoch, on the CPU, undecodable images dropped."""
        idx = self.indices()
        ds = _epoch_dataset(self.records, idx, self.view_ids(idx),
                            {"reader": self.reader, "views": self.views, "train": self.train}, self.world_size,
                            self._block_rows())
        self.skipped, first_bad, nodes, seen = 0, None, set(), 0
        for b in ds.iter_batches(batch_size=self.batch_size, batch_format="numpy", prefetch_batches=self.prefetch):
            ok = b["ok"]
            nodes.update(b["node"].tolist())
            seen += len(ok)
            if not ok.all():
                self.skipped += int((~ok).sum())
                first_bad = first_bad or display(str(b["loc"][~ok][0]))
                b = {k: b[k][ok] for k in ("x", "index", "view")}  # only then copied
            yield (torch.from_numpy(np.ascontiguousarray(b["x"])), torch.from_numpy(b["index"]),
                   torch.from_numpy(b["view"]))
        self._say_where(seen, nodes)
        if self.skipped:
            log(f"skipped {self.skipped} undecodable image(s) in this epoch (bad_images: skip; first: {first_bad})")

    def _block_rows(self) -> int:
        """Rows per Ray Data block: the batch, or the largest even share of it within MAX_ROWS_PER_TASK."""
        parts = math.ceil(self.batch_size / MAX_ROWS_PER_TASK)
        return math.ceil(self.batch_size / parts)

    def _say_where(self, seen: int, nodes: set) -> None:
        """Once per loader: which rank streamed how many images, on which node, decoded where."""
        if self._said:
            return
        self._said = True
        what = "train" if self.train else "eval"
        log(f"rank {self.rank}/{self.world_size} on node {_node_id()} streamed {seen} {what} images, "
            f"decoded on node(s) {', '.join(sorted(nodes))}")

    def with_views(self):
        for x, index, view in self.uint8_batches():
            if len(index) == 0:
                continue
            idx_dev, view_dev = index.to(self.device), view.to(self.device)
            xb = self.normalise(x.to(self.device, non_blocking=True))
            yield xb, self.y.index_select(0, index).to(self.device), ViewKeys(idx_dev, view_dev)
