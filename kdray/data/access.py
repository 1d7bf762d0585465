"""How a catalogued image set (an image folder, WebDataset tar shards) reaches the loaders: held
decoded in memory, or streamed through Ray Data. ``data_path: auto`` holds it in memory when the
whole set decoded at its stored size fits ``in_memory_limit_gb`` (default 4 GB; per worker, since
every worker holds its copy) and streams it otherwise; ``memory`` or ``stream`` force the choice.
Both paths split the same records the same way and normalise with the same statistics (from the
same seeded sample of at most ``STATS_SAMPLE`` train images), so they give the same batches."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from kdray.core.errors import KdrayError
from kdray.core.io import atomic_write
from kdray.data.bundle import DataBundle, channel_stats, log
from kdray.data.catalog import Catalog, ImageReader, display, folder_catalog, tar_catalog
from kdray.data.splits import TEST_FRACTION, Split, seeded_generator, split_indices

STATS_SAMPLE = 2048  # train images the per-channel statistics are measured on
DECODE_CHUNK = 512
STATS_CACHE = Path("~/.cache/kdray/stats")


def _data_dir(cfg, name: str) -> str:
    data_dir = getattr(cfg, "data_dir", None)
    if not data_dir:
        what = "a tree DIR/<class>/<image>" if name == "imagefolder" else "a folder of .tar shards"
        raise KdrayError(f"{name}: --data-dir is required: {what} (a local path or a URI such as s3://bucket/set)")
    return str(data_dir)


#: the sources kdray can stream: name -> catalog of ``cfg.data_dir``
CATALOGS = {
    "imagefolder": lambda cfg: folder_catalog(_data_dir(cfg, "imagefolder")),
    "webdataset": lambda cfg: tar_catalog(_data_dir(cfg, "webdataset")),
}


def _gb(n: float) -> str:
    return f"{n / 1024**3:.2f} GB"


def choose_path(cfg, catalog: Catalog, side: int) -> str:
    """"memory" or "stream" for ``catalog`` decoded at ``side`` px, said on the log."""
    forced = getattr(cfg, "data_path", "auto")
    decoded = catalog.decoded_bytes(side)
    limit = float(getattr(cfg, "in_memory_limit_gb", 4.0))
    if forced in ("memory", "stream"):
        log(f"data path: {forced} (forced by data_path; {len(catalog)} images, {_gb(decoded)} decoded at {side}px)")
        return forced
    path = "memory" if decoded <= limit * 1024**3 else "stream"
    sign = "<=" if path == "memory" else ">"
    log(f"data path: {path} ({len(catalog)} images decoded at {side}px = {_gb(decoded)} {sign} in_memory_limit_gb "
        f"{limit:g}; data_path memory|stream forces a path)")
    return path


def stats_rows(n: int) -> torch.Tensor:
    """The train samples the statistics are measured on: a seeded sorted sample of at most STATS_SAMPLE."""
    if n <= STATS_SAMPLE:
        return torch.arange(n)
    return torch.sort(torch.randperm(n, generator=seeded_generator("stats", 0))[:STATS_SAMPLE]).values


def stats_sample_of(x: torch.Tensor) -> tuple:
    return channel_stats(x.index_select(0, stats_rows(len(x))))


def bundle_fingerprint(catalog: Catalog, idx: dict, side: int) -> str:
    """The set's files and this run's train split: what a stored teacher output's row depends on."""
    h = hashlib.sha256(f"{catalog.fingerprint}|{side}".encode())
    h.update(idx["train"].numpy().tobytes())
    return h.hexdigest()[:32]


def decode_records(reader: ImageReader, locators: list, what: str) -> tuple:
    """(uint8 [n,3,side,side], bool [n] decodable) of ``locators``, with progress and an ETA."""
    n = len(locators)
    out = torch.empty((n, 3, reader.side, reader.side), dtype=torch.uint8)
    ok = torch.ones(n, dtype=torch.bool)
    t0, next_report = time.perf_counter(), 5000
    for s in range(0, n, DECODE_CHUNK):
        out[s : s + DECODE_CHUNK], ok[s : s + DECODE_CHUNK] = reader.decode(locators[s : s + DECODE_CHUNK])
        done = min(s + DECODE_CHUNK, n)
        if n >= 5000 and (done >= next_report or done == n):
            rate = done / max(time.perf_counter() - t0, 1e-9)
            log(f"decoded {done}/{n} {what} images, ETA {(n - done) / rate:.0f} s")
            next_report = done + 5000
    return out, ok


def _keep_decodable(x, y, ok, locators, what: str):
    if bool(ok.all()):
        return x, y
    bad = torch.nonzero(~ok).flatten()
    log(f"skipped {len(bad)} undecodable {what} image(s) (bad_images: skip; first: {display(locators[int(bad[0])])})")
    return x[ok], y[ok]


def decode_catalog(catalog: Catalog, reader: ImageReader) -> tuple:
    """(classes, x, y, test_x | None, test_y | None): the whole catalog decoded at ``reader.side``."""
    x, ok = decode_records(reader, catalog.locators, "train")
    x, y = _keep_decodable(x, catalog.labels, ok, catalog.locators, "train")
    if catalog.test_locators is None:
        return catalog.classes, x, y, None, None
    tx, tok = decode_records(reader, catalog.test_locators, "test")
    tx, ty = _keep_decodable(tx, catalog.test_labels, tok, catalog.test_locators, "test")
    return catalog.classes, x, y, tx, ty


def _records(locators: list, rows: torch.Tensor) -> list:
    return [locators[i] for i in rows.tolist()]


def streamed_bundle(cfg, name: str, catalog: Catalog, views, size: int, val_fraction: float,
                    train_fraction: float) -> DataBundle:
    """The bundle of a streamed set: labels and locators per split, statistics from a decoded sample."""
    side = views.base_size or size
    reader = ImageReader(catalog.kind, side, getattr(cfg, "bad_images", "fail"))
    has_test = catalog.test_locators is not None
    idx = split_indices(catalog.labels, val_fraction=val_fraction, train_fraction=train_fraction,
                        data_seed=int(getattr(cfg, "data_seed", 0) or 0),
                        test_fraction=None if has_test else TEST_FRACTION)
    split = lambda rows: Split(None, catalog.labels[rows].contiguous(), _records(catalog.locators, rows))
    if has_test:
        test = Split(None, catalog.test_labels.contiguous(), list(catalog.test_locators))
    else:
        test = split(idx["test"])
    train = split(idx["train"])
    fingerprint = bundle_fingerprint(catalog, idx, side)
    mean, std = cached_stats(fingerprint, lambda: _decoded_stats(reader, train))
    return DataBundle(name=name, classes=list(catalog.classes), train=train, val=split(idx["val"]), test=test,
                      mean=mean, std=std, image_size=size, views=views, path="stream",
                      fingerprint=fingerprint, reader=reader)


def _decoded_stats(reader: ImageReader, train: Split) -> tuple:
    x, ok = reader.decode(_records(train.records, stats_rows(len(train))))
    return channel_stats(x[ok])


def cached_stats(fingerprint: str, compute) -> tuple:
    """(mean, std) of a streamed train split: measured once per machine (decoding STATS_SAMPLE
    images takes seconds at 224 px, in every worker of every trial) and kept in
    ``~/.cache/kdray/stats/<fingerprint>.json`` (the fingerprint names the files, split and size)."""
    file = STATS_CACHE.expanduser() / f"{fingerprint}.json"
    try:
        got = json.loads(file.read_text())
        return tuple(float(v) for v in got["mean"]), tuple(float(v) for v in got["std"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    mean, std = compute()
    try:
        atomic_write(file, json.dumps({"mean": list(mean), "std": list(std)}))
    except OSError:
        pass  # a read-only home: measured again next time
    return mean, std


def train_view_images(data: DataBundle, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """uint8 training views ``view`` of train samples ``index``, exactly as the train loader cuts
    them, whichever path the bundle takes (a streamed bundle's images are fetched and decoded here)."""
    from kdray.data.loader import view_images

    if data.streamed:
        x, _ = data.reader.decode(_records(data.train.records, index))
    else:
        x = data.train.x.index_select(0, index)
    return view_images(data.views, x, index, view, True)


def loader_for(data: DataBundle, part: str, batch_size: int, *, train: bool = False, **shard):
    """The loader of split ``part`` ("train", "val", "test") of ``data``: from memory or streamed,
    with the bundle's views (training views, or the evaluation crop) and statistics. ``shard``:
    device, seed, rank, world_size, channels_last."""
    from kdray.data.loader import BatchLoader

    split = getattr(data, part)
    common = dict(mean=data.mean, std=data.std, views=data.views, train=train, **shard)
    if data.streamed:
        from kdray.data.stream import StreamLoader

        return StreamLoader(split, data.reader, batch_size, **common)
    return BatchLoader(split, batch_size, **common)


def eval_images(data: DataBundle, part: str, batch_size: int):
    """``(uint8 images as evaluated, labels)`` of split ``part`` in order, in batches, in this process
    (a streamed split is fetched and decoded here: no Ray needed; undecodable images are dropped
    under ``bad_images: skip``)."""
    split = getattr(data, part)
    for s in range(0, len(split), batch_size):
        y = split.y[s : s + batch_size]
        if data.streamed:
            x, ok = data.reader.decode(split.records[s : s + batch_size])
            x, y = x[ok], y[ok]
        else:
            x = split.x[s : s + batch_size]
        yield data.views.eval(x), y
