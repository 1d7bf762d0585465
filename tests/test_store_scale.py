"""A teacher store that scales: a sparse index (sorted pair codes, binary search, nothing dense in
samples x views), logit encodings with stated and measured error bounds and sizes, and the Ray
Data builder giving the rows the in-process build gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import error_line, run_cli, small_cfg

from kdray.core.errors import KdrayError
from kdray.data.sources import load_data
from kdray.data.views import ViewSpec
from kdray.distill.base import TeacherInfo
from kdray.teachers.ensemble import LiveTeacherOutputs
from kdray.teachers.source import StoredTeacherOutputs, open_teacher_store
from kdray.teachers.store import FORMAT, MAX_SHARDS, TeacherStore, empty_store
from kdray.teachers.store_codec import DEFAULT_TOPK, LogitCodec, LogitEncoding, bytes_per_row
from kdray.teachers.store_files import META_FILE, load, save
from kdray.teachers.store_fill import compute_rows
from kdray.training.fit import fit

QUIET = dict(log=lambda s: None)


def _logits(rows: int, teachers: int, classes: int, peak: float = 8.0, spread: float = 2.0, seed: int = 0):
    """Trained-classifier-like logits: a gaussian spread and one peaked class per row and teacher."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, teachers, classes, generator=g) * spread
    y = torch.randint(0, classes, (rows, teachers), generator=g)
    return z.scatter_add_(-1, y.unsqueeze(-1), torch.full((rows, teachers, 1), float(peak)))


def _store(codec: LogitCodec, samples: int, views: int, teachers: int = 2) -> TeacherStore:
    key = {"format": FORMAT, "dataset": "synthetic", "logits": codec.key()}
    return empty_store(key, TeacherInfo(teachers, (4,) * teachers), samples, _Views(views), False)


class _Views:
    def __init__(self, count):
        self.count = count


# ------------------------------------------------------------------------------------------------
# the sparse index
# ------------------------------------------------------------------------------------------------
def test_sparse_index_finds_rows_merges_additions_and_allocates_nothing_dense():
    samples, views = 10**9, 162  # an index dense in samples x views would take 650 GB
    store = _store(LogitCodec("fp32", 5), samples, views)
    first = torch.tensor([7, 3 * views + 5, 10**11, 12])
    z1 = _logits(4, 2, 5)
    store.add(first, z1, None)
    second = torch.tensor([4, 10**11 + 1, 2])  # interleaved with the stored codes
    z2 = _logits(3, 2, 5, seed=1)
    store.add(second, z2, None)
    assert torch.equal(store.codes, torch.sort(torch.cat([first, second])).values) and store.rows == 7
    for codes, z in ((first, z1), (second, z2)):
        assert torch.equal(store.logits_of(store.lookup(codes)), z)
    asked = torch.tensor([2, 5, 12, 10**11 + 2])
    assert store.lookup(asked).tolist()[1::2] == [-1, -1] and store.missing(asked).tolist() == [5, 10**11 + 2]
    assert store.covers(first) and not store.covers(asked)
    assert store.coverage() == f"7/{samples * views} views (0.0%)" and store.nbytes == 7 * (8 + 2 * 5 * 4)
    with pytest.raises(ValueError, match="already stored"):
        store.add(torch.tensor([12]), _logits(1, 2, 5), None)
    assert _store(LogitCodec("fp32", 5), 3, 2).missing(torch.tensor([0, 5])).tolist() == [0, 5]  # empty store


@pytest.mark.parametrize("encoding", ["bf16", "topk"])
def test_store_round_trips_through_disk_and_ray_arrays(encoding, tmp_path):
    store = _store(LogitCodec(encoding, 50, 4 if encoding == "topk" else 0), 100, 3)
    codes = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:40]
    store.add(codes, _logits(40, 2, 50), None)
    save(store, tmp_path, 0.1)
    back = load(tmp_path)
    shared = TeacherStore.from_arrays(store.to_arrays())
    rows = torch.arange(store.rows)
    for other in (back, shared):
        assert torch.equal(other.codes, store.codes) and (other.samples, other.view_count) == (100, 3)
        assert torch.equal(other.logits_of(rows), store.logits_of(rows))
    assert json.loads((tmp_path / META_FILE).read_text())["views"] == 300


# ------------------------------------------------------------------------------------------------
# shards: memory-mapped, few, and what a stopped build keeps
# ------------------------------------------------------------------------------------------------
def test_saved_shards_are_memory_mapped_compacted_and_unnamed_files_removed(tmp_path):
    store = _store(LogitCodec("fp16", 10), 1000, 4)
    codes = torch.randperm(4000, generator=torch.Generator().manual_seed(1))[:600]
    z = _logits(600, 2, 10)
    for part in range(30):  # 30 extensions of 20 rows: never more than MAX_SHARDS shards
        store.add(codes[part * 20 : (part + 1) * 20], z[part * 20 : (part + 1) * 20], None)
        store.compact()
        save(store, tmp_path, 0.0)
        assert len(store.shards) <= MAX_SHARDS
    files = sorted(p.name for p in tmp_path.glob("shard-*.pt"))
    assert files == sorted(s.file for s in store.shards)  # merged shards' files are gone
    (tmp_path / "shard-0000000000000000.pt").write_bytes(b"half a write")  # a write the meta never named
    back = load(tmp_path)
    torch.testing.assert_close(back.logits_of(back.lookup(codes)).float(), z.half().float(), rtol=0, atol=0)
    mapped = Path("/proc/self/maps").read_text()
    assert all(str(tmp_path / f) in mapped for f in files)  # read through the page cache, not copied in
    back.add(torch.tensor([4001]), _logits(1, 2, 10), None)
    save(back, tmp_path, 0.0)
    assert not (tmp_path / "shard-0000000000000000.pt").exists() and load(tmp_path).rows == 601


def test_a_build_stopped_half_way_keeps_its_saved_shards(fake_teachers, tmp_path, monkeypatch):
    import kdray.teachers.store_fill as fill

    cfg = small_cfg(method="kd", teachers=str(fake_teachers), amp="off")
    want = open_teacher_store(cfg, root=tmp_path / "whole", **QUIET)
    monkeypatch.setattr(fill, "BUILD_CHUNK_BYTES", 4 * 2 * 10 * (want.rows // 3 + 1))  # three chunks

    def stopping_builder(ensemble, data, precision, feats):
        calls = []

        def build(codes, progress):
            calls.append(len(codes))
            if len(calls) == 2:
                raise KeyboardInterrupt  # Ctrl-C during the second chunk
            return compute_rows(LiveTeacherOutputs(ensemble, precision.autocast, feats), data, data.views, codes, False)
        return build

    with pytest.raises(KeyboardInterrupt):
        open_teacher_store(cfg, root=tmp_path / "s", builder=stopping_builder, **QUIET)
    folder = tmp_path / "s" / want.meta["digest"]
    kept = load(folder)
    assert 0 < kept.rows < want.rows and len(kept.shards) == 1
    logs = []
    done = open_teacher_store(cfg, root=tmp_path / "s", log=logs.append)
    assert any(f"computing {want.rows - kept.rows} views" in line for line in logs)  # only what was missing
    assert torch.equal(done.logits_of(done.lookup(want.codes)), want.logits_of(torch.arange(want.rows)))


def test_a_store_at_a_uri_is_written_there_and_read_through_each_nodes_mirror(fake_teachers, tmp_path, monkeypatch):
    """``--teacher-store file://...`` (the code path of s3://, gs://, hdfs://): shards and meta land at
    the URI, a node without the driver's folder pulls them into its own mirror, a fresh mirror reads
    the URI's store without computing, an extension pushes one new shard, a bad URI is one line."""
    from kdray.distributed.store_tasks import fetch, share

    monkeypatch.setenv("KDRAY_STORE_MIRROR", str(tmp_path / "mirror-a"))
    uri = f"file://{tmp_path}/bucket/stores"
    cfg = small_cfg(method="kd", teachers=str(fake_teachers))
    built = open_teacher_store(cfg, root=uri, **QUIET)
    remote = tmp_path / "bucket" / "stores" / built.meta["digest"]
    assert sorted(p.name for p in remote.iterdir()) == sorted([META_FILE] + [s.file for s in built.shards])
    assert str(built.folder).startswith(str(tmp_path / "mirror-a"))
    monkeypatch.setenv("KDRAY_STORE_MIRROR", str(tmp_path / "mirror-b"))  # another node
    there = fetch(dict(share(built), folder=str(tmp_path / "not-on-this-node")))
    assert str(there.folder).startswith(str(tmp_path / "mirror-b"))
    assert torch.equal(there.logits_of(there.lookup(built.codes)), built.logits_of(torch.arange(built.rows)))
    monkeypatch.setenv("KDRAY_STORE_MIRROR", str(tmp_path / "mirror-c"))
    logs = []
    again = open_teacher_store(cfg, root=uri, log=logs.append)
    assert any("fetched 1 shard(s)" in line for line in logs) and "covers the run" in logs[-1]
    assert again.rows == built.rows
    open_teacher_store(cfg.replace(epochs=4), root=uri, **QUIET)
    assert len(list(remote.glob("shard-*.pt"))) == 2
    with pytest.raises(KdrayError, match="teacher store: cannot reach nosuch://x/stores"):
        open_teacher_store(cfg, root="nosuch://x/stores", **QUIET)


# ------------------------------------------------------------------------------------------------
# encodings: error bounds, shapes, sizes
# ------------------------------------------------------------------------------------------------
#: the largest relative error of softmax(z/T) measured on _logits(2000, 2, 100) (max |z| = 15: fp16 5.7e-3 and
#: 9.2e-4, bf16 4.7e-2 and 7.5e-3 at T = 1 and 4), x ~1.1
MEASURED_BOUND = {("fp16", 1): 6.2e-3, ("fp16", 4): 1.0e-3, ("bf16", 1): 5.2e-2, ("bf16", 4): 8.3e-3}
UNIT_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8}


@pytest.mark.parametrize("name,T", sorted(MEASURED_BOUND))
def test_exact_encodings_move_softmax_within_their_stated_bound(name, T):
    z = _logits(2000, 2, 100)
    codec = LogitCodec(name, 100)
    parts = codec.encode(z)
    back = codec.decode(parts, torch.arange(len(z)))
    assert back.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[name] and back.shape == z.shape
    p, q = torch.softmax(z / T, -1), torch.softmax(back.float() / T, -1)
    rel = float(((q - p).abs() / p).max())
    stated = float(torch.expm1(2 * z.abs().max() * UNIT_ROUNDOFF[name] / T))  # the docstring's bound
    assert rel <= MEASURED_BOUND[(name, T)] and rel <= stated, (name, T, rel)
    fp32 = LogitCodec("fp32", 100)
    assert torch.equal(fp32.decode(fp32.encode(z), torch.arange(len(z))), z)  # fp32: the values themselves


@pytest.mark.parametrize("classes,k", [(100, 10), (1000, DEFAULT_TOPK), (100, 1)])
def test_topk_keeps_the_top_k_probabilities_and_is_close_for_peaked_logits(classes, k):
    z = _logits(1000, 2, classes, peak=12.0, spread=1.0)  # a confident teacher: top-1 p ~ 0.98-0.998
    codec = LogitCodec("topk", classes, k)
    back = codec.decode(codec.encode(z), torch.arange(len(z)))
    assert back.shape == z.shape and back.dtype == torch.float32
    p, q = torch.softmax(z, -1), torch.softmax(back, -1)
    top, idx = p.topk(k, -1)
    logp_bound = top.log().abs() * 2.0**-11 * 1.05 + 5e-6  # fp16 log-probabilities (+ fp32 softmax noise)
    assert bool(((q.gather(-1, idx) - top).abs() / top <= logp_bound).all())
    torch.testing.assert_close(q.sum(-1), torch.ones(q.shape[:-1]))
    rest = torch.ones_like(p, dtype=torch.bool).scatter_(-1, idx, False)  # the tail: evenly spread
    tail = q[rest].view(*q.shape[:-1], classes - k)
    torch.testing.assert_close(tail, tail[..., :1].expand_as(tail))
    kl = (p * (p.log() - q.log())).sum(-1)
    assert float(kl.mean()) < (1e-3 if classes == 100 else 1e-2) and float(kl.max()) < 0.2


def test_topk_guards_a_top_k_that_holds_all_the_mass():
    z = torch.full((1, 1, 20), -60.0)
    z[0, 0, 0] = 40.0  # p_top = 1 to fp32: the remaining mass is 0, clamped to a tiny floor
    codec = LogitCodec("topk", 20, 2)
    back = codec.decode(codec.encode(z), torch.tensor([0]))
    assert torch.isfinite(back).all() and float(torch.softmax(back, -1)[0, 0, 0]) == pytest.approx(1.0)


#: bytes per stored (sample, view) and teacher; each row adds 8 for its code in the index
PER_TEACHER = {("fp32", 10): 40, ("fp32", 100): 400, ("fp32", 1000): 4000, ("fp16", 10): 20, ("fp16", 100): 200,
               ("fp16", 1000): 2000, ("bf16", 1000): 2000, ("topk", 100): 44, ("topk", 1000): 44}


def test_bytes_per_row_are_as_stated_and_what_a_store_takes(capsys):
    lines = ["encoding   K  C=10   C=100  C=1000"]
    for name in ("fp32", "fp16", "bf16", "topk"):
        sizes = []
        for classes in (10, 100, 1000):
            k = min(DEFAULT_TOPK, classes - 1) if name == "topk" else 0
            store = _store(LogitCodec(name, classes, k), 100, 10, teachers=3)
            store.add(torch.arange(7) * 3, _logits(7, 3, classes), None)
            assert store.nbytes == 7 * bytes_per_row(name, 3, classes, k)
            if (name, classes) in PER_TEACHER:
                assert bytes_per_row(name, 3, classes, k) == 8 + 3 * PER_TEACHER[(name, classes)]
            sizes.append(bytes_per_row(name, 1, classes, k))
        lines.append(f"{name:9s}  1  " + "  ".join(f"{s:5d}" for s in sizes))
    with capsys.disabled():
        print("\nbytes per (sample, view), one teacher, index included (topk: k=min(10, C-1)):\n" + "\n".join(lines))
    assert bytes_per_row("topk", 1, 40000, 10) == 8 + 10 * 2 + 10 * 4 + 4  # int32 class indices beyond 32767


def test_encoding_is_resolved_and_bad_options_are_one_line():
    assert LogitEncoding().resolve(10, torch.bfloat16) == LogitCodec("bf16", 10)
    assert LogitEncoding().resolve(100, torch.float32) == LogitCodec("fp32", 100)
    assert LogitEncoding().resolve(1000, torch.float32) == LogitCodec("topk", 1000, DEFAULT_TOPK)
    assert LogitEncoding("topk", 3).resolve(10, torch.float32).k == 3
    with pytest.raises(KdrayError, match=r"^--teacher-store-topk 0 is out of range; allowed: 1 \.\. classes - 1$"):
        LogitEncoding("topk", 0).check()
    with pytest.raises(KdrayError, match=r"^--teacher-store-topk 10 is out of range for 10 classes; allowed: 1 \.\. 9"):
        LogitEncoding("topk").resolve(10, torch.float32)
    with pytest.raises(KdrayError, match="not an encoding; allowed: auto, fp32, fp16, bf16, topk"):
        LogitEncoding("int8").check()


def test_cli_refuses_a_bad_topk_before_anything_is_created(fake_teachers, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--workdir", tmp_path / "w", "train", "--method", "kd", "--teachers", fake_teachers,
                           "--dataset", "fake", "--image-size", "16", "--device", "cpu", "--teacher-store", "auto",
                           "--teacher-store-topk", "0", "--no-track", "--out", tmp_path / "r")
    assert code == 2 and "--teacher-store-topk 0 is out of range" in error_line(err) and not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------
# runs with encoded stores
# ------------------------------------------------------------------------------------------------
def test_a_kd_run_with_an_fp32_store_equals_a_live_run(fake_teachers, tmp_path):
    cfg = small_cfg(method="kd", teachers=str(fake_teachers))
    store = open_teacher_store(cfg, root=tmp_path / "s", encoding=LogitEncoding("fp32"), **QUIET)
    assert store.key["logits"]["encoding"] == "fp32"
    live = fit(cfg, checkpoint_root=str(tmp_path / "a"), **QUIET)
    stored = fit(cfg, checkpoint_root=str(tmp_path / "b"), teacher_store=store, **QUIET)
    assert stored["metrics"]["teacher_images"] == 0
    for a, b in zip(live["history"], stored["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6) and b["val_acc"] == a["val_acc"]


def test_a_kd_run_with_a_topk_store_completes_with_the_live_top_k(fake_teachers, tmp_path):
    cfg = small_cfg(method="kd", teachers=str(fake_teachers))
    logs = []
    store = open_teacher_store(cfg, root=tmp_path / "s", encoding=LogitEncoding("topk", 3), log=logs.append)
    assert store.key["logits"] == {"encoding": "topk", "classes": 10, "k": 3} and "top-3 logits" in store.describe()
    res = fit(cfg, checkpoint_root=str(tmp_path / "r"), teacher_store=store, **QUIET)
    assert res["metrics"]["teacher_images"] == 0 and all(torch.isfinite(torch.tensor(h["train_loss"]))
                                                         for h in res["history"])
    # the targets the run trained on: the store's outputs, whose top-3 probabilities are the live ones
    live = _live_rows(cfg, store.codes[:200])
    keys = _Keys(store.codes[:200] // store.view_count, store.codes[:200] % store.view_count)
    served = StoredTeacherOutputs(store, "cpu", False, live=lambda: None)(torch.empty(200), keys)["logits"]
    p, q = torch.softmax(live.transpose(0, 1).float(), -1), torch.softmax(served, -1)
    top, idx = p.topk(3, -1)
    torch.testing.assert_close(q.gather(-1, idx), top, rtol=5e-3, atol=1e-6)


class _Keys:
    def __init__(self, index, view):
        self.index, self.view = index, view


def _live_rows(cfg, codes):
    from kdray.core.device import Precision, pick_device
    from kdray.teachers.ensemble import LiveTeacherOutputs, load_teachers

    data = load_data(cfg)
    precision = Precision.for_config(cfg, pick_device(cfg))
    source = LiveTeacherOutputs(load_teachers(cfg.teachers, data.classes), precision.autocast, False)
    return compute_rows(source, data, data.views, codes, precision.channels_last)[0]


def test_ray_data_builder_gives_the_rows_of_the_in_process_build(fake_teachers, tmp_path, local_ray):
    """Logits and feature maps (feed) computed by the Ray Data pipeline equal those computed here."""
    from kdray.distributed.store_tasks import ray_data_builder

    cfg = small_cfg(method="feed", teachers=str(fake_teachers), amp="off")
    here = open_teacher_store(cfg, root=tmp_path / "here", **QUIET)
    lines = []
    there = open_teacher_store(cfg, root=tmp_path / "ray", builder=ray_data_builder(), log=lines.append)
    assert torch.equal(here.codes, there.codes) and there.feats is not None
    torch.testing.assert_close(there.parts["logits"], here.parts["logits"], rtol=1e-5, atol=1e-5)
    for a, b in zip(there.feats, here.feats):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert any("100%" in line for line in lines)  # progress reached the end


# ------------------------------------------------------------------------------------------------
# older stores, and how `kdray teachers show` words a store
# ------------------------------------------------------------------------------------------------
def test_a_format_1_store_is_rebuilt_with_a_line_saying_so(fake_teachers, tmp_path):
    cfg = small_cfg(method="kd", teachers=str(fake_teachers))
    store = open_teacher_store(cfg, root=tmp_path, **QUIET)
    old_key = {k: v for k, v in store.key.items() if k != "logits"} | {"format": 1}
    (tmp_path / "0ld").mkdir()
    (tmp_path / "0ld" / META_FILE).write_text(json.dumps({"key": old_key, "digest": "0ld", "bytes": 10}))
    (tmp_path / store.meta["digest"] / META_FILE).unlink()  # the new one is gone: it is built again
    logs = []
    open_teacher_store(cfg, root=tmp_path, log=logs.append)
    assert any("0ld is in format 1" in line and "building a new store" in line for line in logs)


def test_store_line_words_both_view_kinds_and_the_encoding():
    from kdray.cli.teachers import store_line

    base = {"digest": "abc", "rows": 5, "views": 10, "feats": False, "bytes": 2 * 1024**2, "build_s": 1.0}
    key = {"format": FORMAT, "dataset": "imagenet", "image_size": 224, "train": "f" * 20,
           "precision": {"bf16": True}, "logits": LogitCodec("topk", 1000, 10).key(),
           "views": {"kind": "resized_crop", "count": 8, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3],
                     "hflip": True, "base_size": 256}}
    line = store_line({**base, "key": key})
    assert "views 8 resized crops of 256px (scale 0.08-1, ratio 0.75-1.33, flip)" in line and "top-10 logits" in line
    crop = store_line({**base, "key": {**key, "views": ViewSpec(4, True).to_dict(),
                                        "logits": LogitCodec("fp16", 10).key()}})
    assert "views crop 4, flip" in crop and "logits fp16" in crop and "5/10 views (50.0%)" in crop
    assert "outdated" in store_line({**base, "key": {"format": 1}})
