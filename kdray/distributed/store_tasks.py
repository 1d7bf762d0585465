"""The teacher store over Ray: its missing rows computed by a Ray Data batch-inference pipeline
spread over the cluster, and the finished store shared through Ray's object store so trials on
every node read the same arrays.

The pipeline: blocks of pair codes -> CPU tasks cutting each pair's uint8 view exactly as the train
loader does (:func:`kdray.data.access.train_view_images`: in-memory or streamed bundles alike) -> a
pool of actors, each holding the frozen ensemble on its device (one GPU per actor when the store's
precision is CUDA), that normalise the views and run the teachers. Cutting and inference overlap,
the images travel as uint8, and the rows come back in code order."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from kdray.core.errors import KdrayError
from kdray.data.access import train_view_images
from kdray.data.bundle import DataBundle
from kdray.data.splits import Split
from kdray.data.views import normalisation, to_float
from kdray.teachers.store import TeacherStore
from kdray.teachers.store_files import META_FILE, StoreCorrupt, load, stamps
from kdray.teachers.store_fill import Builder
from kdray.teachers.store_remote import mirror_root, pull, remote_folder

CODES_PER_BLOCK = 256  # pairs per Ray Data block: one image-cutting task, one actor batch


def cut_views(batch: dict, data: DataBundle) -> dict:
    """A Ray Data task's work: the uint8 training views of the batch's pair codes."""
    codes = torch.from_numpy(np.array(batch["code"], dtype=np.int64))  # Ray's arrays are read-only
    count = data.views.count
    x = train_view_images(data, codes // count, codes % count)
    return {"code": codes.numpy(), "image": x.numpy()}


class TeacherRows:
    """A Ray Data actor: the frozen ensemble on this actor's device; a batch of uint8 views ->
    its logits ``[B, K, C]`` and feature maps (``feat<i>``), in fp32 (exact for bf16 outputs; the
    store casts them back to its encoding)."""

    def __init__(self, ensemble, precision, feats: bool, mean, std):
        from kdray.core.device import Precision
        from kdray.teachers.ensemble import LiveTeacherOutputs
        from kdray.teachers.source import on_device

        cuda = precision.device.type == "cuda" and torch.cuda.is_available()
        self.here = Precision(torch.device("cuda" if cuda else "cpu"), precision.use_amp, precision.channels_last)
        self.source = LiveTeacherOutputs(on_device(ensemble, self.here), self.here.autocast, feats)
        self.scale, self.shift = normalisation(mean, std, self.here.device)

    def __call__(self, batch: dict) -> dict:
        x = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.here.device)
        out = self.source(to_float(x, self.scale, self.shift, self.here.channels_last))
        rows = {"code": batch["code"], "logits": out["logits"].transpose(0, 1).float().cpu().numpy()}
        rows.update({f"feat{i}": f.float().cpu().numpy() for i, f in enumerate(out["feats"])})
        return rows


def ray_data_builder(actors: Optional[int] = None, cpus: float = 1.0) -> Callable[..., Builder]:
    """A builder factory for :func:`kdray.teachers.source.open_teacher_store`: the missing rows by a
    Ray Data pipeline with ``actors`` inference actors (default: one per GPU of the cluster when
    the precision is CUDA, else the cluster's CPUs / ``cpus`` less one, left to the cutting tasks)."""

    def factory(ensemble, data: DataBundle, precision, feats: bool) -> Builder:
        def build(codes: torch.Tensor, progress) -> tuple:
            import ray

            gpu = precision.device.type == "cuda"
            n = actors or _actor_count(ray.cluster_resources(), gpu, cpus)
            slim = dataclasses.replace(data, val=_empty(data.val), test=_empty(data.test))  # train only
            ds = _pipeline(codes, slim, ensemble.cpu(), precision, feats, n, gpu, cpus)
            got = []
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                got.append({k: torch.from_numpy(np.array(v)) for k, v in batch.items()})
                progress(sum(len(b["code"]) for b in got), len(codes))
            return _in_code_order(got, codes)

        return build

    return factory


def _actor_count(resources: dict, gpu: bool, cpus: float) -> int:
    if gpu:
        return max(1, int(resources.get("GPU", 1)))
    return max(1, int(resources.get("CPU", 1) // cpus) - 1)


def _pipeline(codes: torch.Tensor, data: DataBundle, ensemble, precision, feats: bool, actors: int, gpu: bool,
              cpus: float):
    """The Ray Dataset of the rows of ``codes``: code blocks -> cut views -> teacher actors."""
    import logging

    import pyarrow as pa
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # the store prints its own progress
    ray.data.DataContext.get_current().enable_progress_bars = False
    tables = [pa.table({"code": codes[s : s + CODES_PER_BLOCK].numpy()})
              for s in range(0, len(codes), CODES_PER_BLOCK)]
    ds = ray.data.from_arrow(tables)
    ds = ds.map_batches(cut_views, batch_size=None, batch_format="numpy", fn_kwargs={"data": data})
    return ds.map_batches(TeacherRows, batch_size=CODES_PER_BLOCK, batch_format="numpy", concurrency=actors,
                          num_gpus=1 if gpu else 0, num_cpus=1 if gpu else cpus,
                          fn_constructor_args=(ensemble, precision, feats, data.mean, data.std))


def _in_code_order(got: list, codes: torch.Tensor) -> tuple:
    """The gathered batches as (logits [R,K,C], feature maps or None) in the order of ``codes``."""
    done = torch.cat([b["code"] for b in got])
    order = torch.argsort(done)
    pos = torch.searchsorted(done[order], codes)
    if len(done) != len(codes) or not torch.equal(done[order][pos], codes):
        raise RuntimeError(f"teacher store: the pipeline returned {len(done)} rows for {len(codes)} views")
    take = order[pos]
    logits = torch.cat([b["logits"] for b in got]).index_select(0, take)
    names = sorted((k for k in got[0] if k.startswith("feat")), key=lambda k: int(k[4:]))
    fmaps = [torch.cat([b[k] for b in got]).index_select(0, take) for k in names] or None
    return logits, fmaps


def _empty(split: Split) -> Split:
    return Split(split.x[:0] if split.x is not None else None, split.y[:0], [] if split.records is not None else None)


def share(store: Optional[TeacherStore]) -> Optional[dict]:
    """A handle trials open the store by (None stays None): its folder, with each shard's size and
    time as this process verified it, for processes that can read the folder (memory-mapped: a
    node's trials share its pages); a node that cannot pulls it from its URI into the node's mirror
    when it has one, else reads it from Ray's object store, where it is put when it is in memory
    only, or when the cluster has other nodes and the store no URI."""
    if store is None:
        return None
    import ray

    saved = store.folder is not None and all(s.file for s in store.shards)
    handle = {"folder": str(store.folder) if saved else None, "remote": store.remote,
              "stamps": stamps(store, store.folder) if saved else None, "ref": None}
    if not saved or (store.remote is None and sum(1 for n in ray.nodes() if n.get("Alive")) > 1):
        handle["ref"] = ray.put(store.to_arrays())
    return handle


def fetch(handle: Optional[dict]) -> Optional[TeacherStore]:
    """The store behind :func:`share`'s handle: mapped from its folder where this node reads it,
    from this node's mirror of its URI, else from Ray's object store."""
    if handle is None:
        return None
    folder = Path(handle["folder"]) if handle["folder"] else None
    if folder is not None and (folder / META_FILE).is_file():
        try:
            return load(folder, verified=handle["stamps"])
        except StoreCorrupt:
            if handle["ref"] is None and handle["remote"] is None:
                raise
    if handle["remote"] is not None:
        uri, digest = handle["remote"]
        mirror = mirror_root(uri) / digest
        pull(remote_folder(uri, digest), mirror)
        return load(mirror)
    import ray

    if handle["ref"] is not None:
        return TeacherStore.from_arrays(ray.get(handle["ref"]))
    raise KdrayError(f"teacher store {folder} cannot be read on node {ray.util.get_node_ip_address()}: "
                     "put --teacher-store on a filesystem every node mounts, or at a URI")
