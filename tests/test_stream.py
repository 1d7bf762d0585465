"""The streaming data path (Ray Data) against the in-memory one: the same splits, statistics and
views bit for bit, at any world size; WebDataset tar shards; ImageNet-style views; bad input."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from datahelpers import write_tree

from kdray.core.errors import KdrayError
from kdray.data.resized_crop import ResizedCropViews, base_size_for
from kdray.data.sources import load_data
from kdray.training.config import RunConfig, from_dict


def tree_cfg(root, **kw) -> RunConfig:
    base = dict(dataset="imagefolder", data_dir=str(root), image_size=72, val_fraction=0.2, view_count=8)
    return from_dict({**base, **kw})


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("tree") / "t", per_class=10)


def _uint8_epoch(loader, epoch):
    loader.set_epoch(epoch)
    if hasattr(loader, "uint8_batches"):
        return [(x, i, v) for x, i, v in loader.uint8_batches()]
    from kdray.data.loader import view_images

    idx = loader.indices()
    views = loader.views.view_ids(loader.seed, epoch, idx) if loader.train else torch.zeros_like(idx)
    out = []
    for s in range(0, len(idx), loader.batch_size):
        b, v = idx[s : s + loader.batch_size], views[s : s + loader.batch_size]
        out.append((view_images(loader.views, loader.x.index_select(0, b), b, v, loader.train), b, v))
    return out


def test_resized_crop_views_are_a_finite_replayable_set():
    views = ResizedCropViews(64, count=5, scale=(0.2, 1.0), ratio=(0.5, 2.0))
    idx = torch.arange(400)
    ids = views.view_ids(3, 7, idx)
    assert ids.min() >= 0 and ids.max() < 5 and torch.equal(ids, views.view_ids(3, 7, idx.flip(0)).flip(0))
    boxes = views.boxes(idx.repeat_interleave(5), torch.arange(5).repeat(400))
    side = base_size_for(64)
    top, left, h, w, flip = boxes.T
    assert side == 73 and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= side).all() and (left + w <= side).all()
    area = (h * w).double() / side**2
    assert area.min() >= 0.15 and area.max() <= 1.0 and 0.3 < flip.double().mean() < 0.7
    assert len({tuple(b) for b in boxes.tolist()}) > 1800  # distinct crops per (sample, view)
    x = torch.randint(0, 256, (3, 3, side, side), dtype=torch.uint8)
    out = views.apply(x, torch.tensor([0, 1, 2]), torch.tensor([4, 5, 6]))
    assert out.shape == (3, 3, 64, 64) and out.dtype == torch.uint8
    assert torch.equal(views.eval(x), x[..., 4:68, 4:68])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_streamed_views_equal_the_in_memory_ones_at_any_world_size(tree, world, local_ray):
    from kdray.core.device import Precision
    from kdray.training.prepare import make_loaders

    mem = load_data(tree_cfg(tree, data_path="memory"))
    stream = load_data(tree_cfg(tree, data_path="stream"))
    assert stream.streamed and not mem.streamed and isinstance(mem.views, ResizedCropViews)
    assert stream.mean == mem.mean and stream.std == mem.std and stream.fingerprint == mem.fingerprint
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(stream, part).y, getattr(mem, part).y)
    cfg = tree_cfg(tree, batch_size=6 * world, eval_batch_size=5)
    prec = Precision(torch.device("cpu"), False, False)
    for rank in range(world):
        a, b = make_loaders(cfg, mem, prec, rank, world), make_loaders(cfg, stream, prec, rank, world)
        for ld_a, ld_b, epoch in ((a.train, b.train, 0), (a.train, b.train, 3), (a.val, b.val, 0)):
            got, want = _uint8_epoch(ld_b, epoch), _uint8_epoch(ld_a, epoch)
            assert len(got) == len(want)
            for (xg, ig, vg), (xw, iw, vw) in zip(got, want):
                assert torch.equal(ig, iw) and torch.equal(vg, vw) and torch.equal(xg, xw)
        xs = [x for x, _ in b.train]
        assert xs[0].dtype == torch.float32 and xs[0].shape[-1] == 72


def write_shards(folder: Path, tree: Path, per_shard: int = 7) -> list:
    """WebDataset-style shards of ``tree``'s images (KEY.ext + KEY.cls), and classes.txt."""
    classes = sorted(p.name for p in tree.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((tree / name).iterdir())
             if f.suffix in (".jpg", ".png")]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("\n".join(classes) + "\n")
    for s in range(0, len(files), per_shard):
        with tarfile.open(folder / f"shard-{s // per_shard:05d}.tar", "w") as tar:
            for k, (f, c) in enumerate(files[s : s + per_shard]):
                key = f"s{s + k:06d}"
                tar.add(f, arcname=key + f.suffix)
                data = str(c).encode()
                info = tarfile.TarInfo(key + ".cls")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return files


def test_webdataset_shards_stream_and_load_the_same_images(tree, tmp_path, local_ray):
    files = write_shards(tmp_path / "shards", tree)
    mem = load_data(tree_cfg(tmp_path / "shards", dataset="webdataset", data_path="memory"))
    stream = load_data(tree_cfg(tmp_path / "shards", dataset="webdataset", data_path="stream"))
    assert mem.classes == ["cat", "dog", "emu"] and len(mem.train) + len(mem.val) + len(mem.test) == len(files)
    assert torch.equal(mem.train.y, stream.train.y) and stream.mean == mem.mean
    from kdray.data.stream import StreamLoader

    ld = StreamLoader(stream.test, stream.reader, 4, mean=stream.mean, std=stream.std, views=stream.views, train=False)
    got = torch.cat([x for x, _, _ in ld.uint8_batches()])
    assert torch.equal(got, stream.views.eval(mem.test.x))


def test_bad_inputs_get_one_line(tree, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with tarfile.open(empty / "a.tar", "w") as tar:
        info = tarfile.TarInfo("x.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"0"))
    with pytest.raises(KdrayError, match="holds no images"):
        load_data(tree_cfg(empty, dataset="webdataset"))
    with pytest.raises(KdrayError, match="no .tar shards"):
        load_data(tree_cfg(tmp_path, dataset="webdataset"))
    with pytest.raises(KdrayError, match="view_count"):
        tree_cfg(tree, view_count=0)
    with pytest.raises(KdrayError, match="cannot reach|cannot list"):
        load_data(tree_cfg("nosuchscheme://bucket/set"))


def test_an_undecodable_image_fails_or_is_skipped_and_counted(tmp_path, local_ray, capsys):
    root = write_tree(tmp_path / "t", per_class=8)
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(KdrayError, match="cannot decode image .*broken.jpg"):
        load_data(tree_cfg(root, data_path="memory", bad_images="fail"))
    data = load_data(tree_cfg(root, data_path="stream", bad_images="skip", val_fraction=0.5))
    from kdray.data.stream import StreamLoader

    seen = 0
    for split in (data.train, data.val, data.test):
        ld = StreamLoader(split, data.reader, 4, mean=data.mean, std=data.std, views=data.views, train=False)
        seen += sum(len(i) for _, i, _ in ld.uint8_batches())
    assert seen == 3 * 8  # the broken image dropped
    assert "skipped 1 undecodable image" in capsys.readouterr().err


def test_a_streamed_sets_statistics_are_measured_once_per_machine(tree, tmp_path, monkeypatch):
    """Every worker of every trial builds the bundle: the statistics' decoded sample is read once,
    then from the cache, giving the same values (a store's key holds them)."""
    import kdray.data.access as access
    from kdray.data.catalog import ImageReader

    monkeypatch.setattr(access, "STATS_CACHE", tmp_path / "stats")
    decoded = []
    real = ImageReader.decode
    monkeypatch.setattr(ImageReader, "decode", lambda self, locs: decoded.append(len(locs)) or real(self, locs))
    first = load_data(tree_cfg(tree, data_path="stream"))
    assert decoded and len(list((tmp_path / "stats").glob("*.json"))) == 1
    decoded.clear()
    again = load_data(tree_cfg(tree, data_path="stream"))
    assert decoded == [] and (again.mean, again.std) == (first.mean, first.std)
    other = load_data(tree_cfg(tree, data_path="stream", train_fraction=0.5))  # another split: measured
    assert decoded and len(list((tmp_path / "stats").glob("*.json"))) == 2 and other.fingerprint != first.fingerprint


def test_auto_path_follows_the_decoded_size_and_says_why(tree, capsys):
    load_data(tree_cfg(tree, in_memory_limit_gb=1.0))
    assert "data path: memory" in capsys.readouterr().err
    small = load_data(tree_cfg(tree, in_memory_limit_gb=1e-6))
    err = capsys.readouterr().err
    assert small.streamed and "data path: stream" in err and "in_memory_limit_gb" in err


def test_a_streamed_run_equals_the_in_memory_one_and_a_ray_data_built_store_equals_live_teachers(
        tree, tmp_path, local_ray):
    """kd on the tree: streamed and in memory, the same run to the last bit; the store's rows built
    by Ray Data batch inference (views cut from the streamed images in Ray Data tasks, teachers in
    an actor pool) give the run the live teachers give (fp32 exact logits; the teachers ran on
    batches of 256 there and of 8 live, which moves a logit by ~1e-7, the small kd term by ~3e-6
    relative in epoch 1 and the weights apart a little more by epoch 2: 1e-4 relative), and the
    stored run runs no teacher."""
    from kdray.distributed.store_tasks import ray_data_builder
    from kdray.teachers.source import open_teacher_store
    from kdray.teachers.store_codec import LogitEncoding
    from kdray.training.fit import fit
    from kdray.training.teacher_set import train_teachers

    teachers = tmp_path / "teachers"
    train_teachers(tree_cfg(tree, epochs=1, batch_size=8, amp="off"), ["resnet8"], 1, teachers, log=lambda s: None)
    cfg = tree_cfg(tree, data_path="stream", method="kd", teachers=str(teachers), epochs=2, batch_size=8, amp="off")
    quiet = dict(log=lambda s: None)
    live = fit(cfg, checkpoint_root=str(tmp_path / "live"), **quiet)
    in_memory = fit(cfg.replace(data_path="memory"), checkpoint_root=str(tmp_path / "memory"), **quiet)
    keys = [k for k in live["history"][0] if k.startswith(("train_", "loss_", "val_", "test_"))]
    assert keys and [[h[k] for k in keys] for h in live["history"]] == [[h[k] for k in keys]
                                                                       for h in in_memory["history"]]
    store = open_teacher_store(cfg, root=tmp_path / "stores", builder=ray_data_builder(),
                               encoding=LogitEncoding("fp32"), **quiet)
    stored = fit(cfg, checkpoint_root=str(tmp_path / "stored"), teacher_store=store, **quiet)
    for a, b in zip(live["history"], stored["history"]):
        assert all(b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-9) for k in keys), [(k, a[k], b[k]) for k in keys]
    assert live["metrics"]["teacher_images"] > 0 and stored["metrics"]["teacher_images"] == 0


# last in this module: it shuts down the module's local Ray (the tests after it would find none)
def test_a_two_node_streaming_run_reads_each_rank_shard_on_its_own_node(tree, tmp_path, capfd, monkeypatch):
    """Head and worker node with 1 CPU each, two 1-CPU Train workers: one per node, each streaming
    its own shard (DistributedSampler's), decoded on its own node."""
    import re
    import time

    import ray
    from ray.cluster_utils import Cluster

    from kdray.cli import main
    from kdray.distributed.local_ray import free_port

    if ray.is_initialized():
        ray.shutdown()
    # Ray folds the two ranks' similar lines into one ("repeated 2x across cluster") and prints the
    # rest late: this test reads each rank's own line
    monkeypatch.setattr("ray._private.ray_logging.RAY_DEDUP_LOGS", False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                            "dashboard_port": free_port()})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        rc = main(["train", "--dataset", "imagefolder", "--data-dir", str(tree), "--image-size", "72",
                   "--data-path", "stream", "--method", "ce", "--student", "resnet8", "--epochs", "1",
                   "--workers", "2", "--batch-size", "8", "--no-track", "--workdir", str(tmp_path / "w"),
                   "--address", cluster.address])
        err = capfd.readouterr().err
        assert rc == 0, err[-3000:]
        pattern = r"rank (\d)/2 on node \w+ streamed \d+ train"
        for _ in range(30):  # the workers' lines reach this console through Ray's log monitor, late
            if len(set(re.findall(pattern, err))) == 2:
                break
            time.sleep(0.5)
            err += capfd.readouterr().err
        lines = re.findall(r"rank (\d)/2 on node (\w+) streamed (\d+) train images, decoded on node\(s\) ([\w, ]+)",
                           err)
        by_rank = {int(r): (node, int(n), set(d.split(", "))) for r, node, n, d in lines}
        assert set(by_rank) == {0, 1}, err[-3000:]
        assert by_rank[0][0] != by_rank[1][0]  # one worker per node
        half = -(-len(load_data(tree_cfg(tree, val_fraction=0.1)).train) // 2)
        for node, n, decoded in by_rank.values():
            assert n == half and decoded == {node}, err[-3000:]  # its half, decoded where it is read
        alive = {n["NodeID"][:12] for n in ray.nodes() if n["Alive"]}
        assert {by_rank[0][0], by_rank[1][0]} == alive
    finally:
        ray.shutdown()
        cluster.shutdown()
