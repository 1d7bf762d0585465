"""Replayable views and the teacher-output store: a view is a pure function of (seed, epoch, sample
index); a run with the store gives the same losses and accuracies as one without (kd, avg_kd,
ekd with its feature term, feed); the store is keyed, verified, extended, budgeted, and reachable
from the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from conftest import small_cfg

from kdray.cli import main
from kdray.core.errors import KdrayError
from kdray.data.loader import BatchLoader
from kdray.data.sources import load_data
from kdray.data.splits import Split
from kdray.data.views import ViewSpec, crop_and_flip
from kdray.teachers.source import open_teacher_store
from kdray.teachers.store import STORES
from kdray.teachers.store_files import META_FILE, StoreCorrupt, list_stores, load
from kdray.training.fit import fit

QUIET = dict(log=lambda s: None)


# ------------------------------------------------------------------------------------------------
# replayable views
# ------------------------------------------------------------------------------------------------
def test_view_set_is_finite_and_decodes_to_crop_and_flip():
    spec = ViewSpec(4, True)
    assert spec.count == 162 and ViewSpec(4, False).count == 81 and not ViewSpec(0, False).augments
    x = torch.randint(0, 256, (162, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views = torch.arange(162)
    out = spec.apply(x, views)
    flip, rest = views % 2 == 1, views // 2
    assert torch.equal(out, crop_and_flip(x, 4, rest // 9, rest % 9, flip))
    assert len({tuple(spec.apply(x[:1].expand(162, -1, -1, -1), views)[i].flatten().tolist())
                for i in range(162)}) == 162  # every view of one image differs


def test_a_samples_view_depends_only_on_seed_epoch_and_index():
    spec = ViewSpec(2, True)
    idx = torch.arange(500)
    v = spec.view_ids(3, 7, idx)
    assert torch.equal(v, spec.view_ids(3, 7, idx.flip(0)).flip(0))  # not on order
    assert torch.equal(v[100:200], spec.view_ids(3, 7, idx[100:200]))  # nor on which others are asked
    assert not torch.equal(v, spec.view_ids(3, 8, idx)) and not torch.equal(v, spec.view_ids(4, 7, idx))
    counts = torch.bincount(spec.view_ids(0, 0, torch.arange(50_000)), minlength=spec.count).float()
    assert counts.min() > 0.7 * counts.mean()  # roughly uniform over the view set


def _split(n=60, size=8):
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return Split(x, torch.arange(n))


def _images_by_sample(loader):
    return {int(i): (xb[k], int(v)) for xb, _, keys in loader.with_views()
            for k, (i, v) in enumerate(zip(keys.index, keys.view))}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_loader_images_are_the_keyed_views_whatever_batch_size_and_rank(world):
    split = _split()
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, train=True, crop_padding=2, hflip=True, seed=5)
    ref = BatchLoader(split, 7, **kw)
    ref.set_epoch(3)
    want = _images_by_sample(ref)
    for rank in range(world):
        ld = BatchLoader(split, 4, rank=rank, world_size=world, **kw)
        ld.set_epoch(3)
        for i, (img, view) in _images_by_sample(ld).items():
            assert view == want[i][1] and torch.equal(img, want[i][0])
            expect = ld.normalise(ld.views.apply(split.x[i : i + 1], torch.tensor([view])))[0]
            assert torch.equal(img, expect)


# ------------------------------------------------------------------------------------------------
# the maths does not change
# ------------------------------------------------------------------------------------------------
CASES = {
    "kd": {},
    "avg_kd": {},
    "ekd": dict(branches=2, feat_weight=0.5),
    "feed": {},
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_a_run_with_the_store_equals_one_without(method, fake_teachers, tmp_path):
    """Same losses (every term), accuracies and final weights with and without the store
    (tolerance: 1e-6 relative on losses; fp32 on CPU gives identical numbers here, the tolerance
    allows for a BLAS that blocks a batch of 64 and one of 256 differently)."""
    cfg = small_cfg(method=method, teachers=str(fake_teachers), **CASES[method])
    live = fit(cfg, checkpoint_root=str(tmp_path / "live"), **QUIET)
    store = open_teacher_store(cfg, root=tmp_path / "stores", **QUIET)
    assert (store.feats is not None) == (method in ("ekd", "feed"))
    stored = fit(cfg, checkpoint_root=str(tmp_path / "stored"), teacher_store=store, **QUIET)
    for a, b in zip(live["history"], stored["history"]):
        keys = [k for k in a if k.startswith(("train_", "loss_", "val_", "test_"))]
        assert keys and all(b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9) for k in keys), method
    assert live["metrics"]["teacher_images"] > 0 and stored["metrics"]["teacher_images"] == 0
    for p, q in zip(live["student"].state_dict().values(), stored["student"].state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_views_missing_from_the_store_are_computed_live_and_exactly(fake_teachers, tmp_path):
    """A store built for seed 0 serving a seed-1 run: its missing views run through the teachers
    (only those), and the run equals a live one."""
    cfg = small_cfg(method="kd", teachers=str(fake_teachers))
    store = open_teacher_store(cfg, root=tmp_path / "s", **QUIET)
    other = cfg.replace(seed=1)
    live = fit(other, checkpoint_root=str(tmp_path / "a"), **QUIET)["history"]
    mixed = fit(other, checkpoint_root=str(tmp_path / "b"), teacher_store=store, **QUIET)
    for a, b in zip(live, mixed["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6) and b["val_acc"] == a["val_acc"]
    seen = 2 * len(load_data(cfg).train)  # two epochs of the train split
    assert 0 < mixed["metrics"]["teacher_images"] < seen


# ------------------------------------------------------------------------------------------------
# the store on disk: key, coverage, verification, budget
# ------------------------------------------------------------------------------------------------
def test_store_is_reused_extended_and_verified(fake_teachers, tmp_path):
    cfg = small_cfg(method="kd", teachers=str(fake_teachers))
    logs = []
    first = open_teacher_store(cfg, root=tmp_path, log=logs.append)
    folder = tmp_path / first.meta["digest"]
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["rows"] == first.rows and [s["file"] for s in meta["shards"]] == [p.name for p in _shards(folder)]
    again = open_teacher_store(cfg, root=tmp_path, log=logs.append)
    assert again.rows == first.rows and "covers the run" in logs[-1]
    longer = open_teacher_store(cfg.replace(epochs=4), root=tmp_path, log=logs.append)
    assert longer.rows > first.rows and longer.meta["digest"] == first.meta["digest"]
    assert len(_shards(folder)) == 2  # the new rows are a new shard: the first one is not rewritten
    kept = longer.lookup(first.codes)  # old rows kept, found beside the new ones
    assert bool((kept >= 0).all()) and torch.equal(longer.logits_of(kept), first.logits_of(torch.arange(first.rows)))
    assert torch.equal(load(folder).codes, longer.codes)
    # another data split is another key
    other = open_teacher_store(cfg.replace(train_fraction=0.5), root=tmp_path, **QUIET)
    assert other.meta["digest"] != first.meta["digest"] and len(list_stores(tmp_path)) == 2
    # a damaged file does not verify, and is rebuilt (kdray's own derived data) with a line saying so
    shard = _shards(folder)[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreCorrupt, match="does not verify"):
        load(folder)
    rebuilt = open_teacher_store(cfg.replace(epochs=4), root=tmp_path, log=logs.append)
    assert any("does not verify" in line and "rebuilding" in line for line in logs)
    assert load(folder).rows == rebuilt.rows == longer.rows and len(_shards(folder)) == 1  # old shards gone


def _shards(folder):
    return sorted(folder.glob("shard-*.pt"))


def test_a_damaged_meta_or_a_shard_of_another_layout_is_said_and_rebuilt(fake_teachers, tmp_path):
    """A truncated meta.json, and a file of another layout whose sha256 the meta names: each is one
    line naming the file (never a traceback or a silent rebuild), and the store is rebuilt right."""
    cfg = small_cfg(method="kd", teachers=str(fake_teachers))
    first = open_teacher_store(cfg, root=tmp_path, **QUIET)
    folder = tmp_path / first.meta["digest"]
    text = (folder / META_FILE).read_text()
    (folder / META_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(StoreCorrupt, match=r"meta.json is damaged \(not JSON"):
        load(folder)
    logs = []
    again = open_teacher_store(cfg, root=tmp_path, log=logs.append)
    assert any("meta.json is damaged" in line and "rebuilding it" in line for line in logs)
    assert torch.equal(again.logits_of(again.lookup(first.codes)), first.logits_of(torch.arange(first.rows)))
    # another layout under the right sha256: a tensors-only file that is not a shard of this store
    shard = _shards(folder)[0]
    torch.save({"index": torch.zeros(3, dtype=torch.int32), "logits": torch.zeros(3, 2, 10)}, shard)
    meta = json.loads((folder / META_FILE).read_text())
    meta["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(StoreCorrupt, match="does not verify: it is not a shard of this store"):
        load(folder)
    logs.clear()
    third = open_teacher_store(cfg, root=tmp_path, log=logs.append)
    assert any("not a shard of this store" in line and "rebuilding it" in line for line in logs)
    assert third.rows == first.rows


def test_a_store_for_other_data_is_not_used_and_the_run_says_so(fake_teachers, tmp_path):
    cfg = small_cfg(method="kd", teachers=str(fake_teachers))
    store = open_teacher_store(cfg, root=tmp_path, **QUIET)
    lines = []
    res = fit(cfg.replace(train_fraction=0.5), checkpoint_root=str(tmp_path / "r"), teacher_store=store,
              log=lines.append)
    assert any("teacher store not used (it was built for another train split)" in x for x in lines)
    assert res["metrics"]["teacher_images"] > 0


def test_extending_a_store_with_feature_maps_from_a_run_without_them(fake_teachers, tmp_path):
    """A feed store extended by a kd run with more epochs: the new rows have no feature maps, so
    the store keeps logits only, its rows aligned with its index, and still serves both runs."""
    feed = small_cfg(method="feed", teachers=str(fake_teachers))
    assert open_teacher_store(feed, root=tmp_path, **QUIET).feats is not None
    logs = []
    kd = open_teacher_store(feed.replace(method="kd", epochs=3), root=tmp_path, log=logs.append)
    assert kd.feats is None and len(kd.codes) == len(kd.parts["logits"]) == kd.rows
    assert any("logits only" in x for x in logs)
    res = fit(feed, checkpoint_root=str(tmp_path / "f"), teacher_store=kd, **QUIET)  # feature maps online
    assert res["metrics"]["teacher_images"] > 0


def test_budget_moves_feature_maps_online_and_refuses_logits_that_do_not_fit(fake_teachers, tmp_path):
    cfg = small_cfg(method="feed", teachers=str(fake_teachers), amp="off")  # the budget is sized for fp32 maps
    logs = []
    store = open_teacher_store(cfg, root=tmp_path, budget_gb=0.005, log=logs.append)
    assert store.feats is None and any("computed online" in line for line in logs)
    run_log = []
    res = fit(cfg, checkpoint_root=str(tmp_path / "r"), teacher_store=store, log=run_log.append)
    assert any("feature maps online" in line for line in run_log) and res["metrics"]["teacher_images"] > 0
    with pytest.raises(KdrayError, match="exceeds the budget"):
        open_teacher_store(cfg.replace(method="kd"), root=tmp_path / "tiny", budget_gb=1e-6, **QUIET)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def test_cli_builds_shows_and_trains_from_a_store(fake_teachers, tmp_path, capsys):
    teachers = tmp_path / "t"
    shutil.copytree(fake_teachers, teachers, ignore=shutil.ignore_patterns(STORES))
    data = ["--dataset", "fake", "--image-size", "16", "--device", "cpu", "--epochs", "2", "--batch-size", "64"]
    assert main(["teachers", "store", str(teachers), "--method", "kd", *data, "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["rows"] > 0 and meta["key"]["dataset"] == "fake" and not meta["feats"]
    assert main(["teachers", "show", str(teachers)]) == 0
    out = capsys.readouterr().out
    assert f"store {meta['digest']}" in out and "views" in out
    rc = main(["--workdir", str(tmp_path / "w"), "train", "--method", "kd", "--teachers", str(teachers), *data,
               "--teacher-store", "auto", "--no-track", "--json", "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out)["teacher_images"] == 0 and f"store {meta['digest']}" in err
    rc = main(["--workdir", str(tmp_path / "w"), "train", "--method", "kd", "--teachers", str(teachers), *data,
               "--teacher-store", "auto", "--teacher-store-budget", "0", "--no-track", "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err
    assert rc == 2 and "--teacher-store-budget 0 is out of range" in err and not (tmp_path / "r2").exists()
    # the two damaged stores of issue 24, through the CLI: one line each, and the run a whole store gives
    first = json.loads(out)
    folder = teachers / STORES / meta["digest"]
    text = (folder / META_FILE).read_text()
    (folder / META_FILE).write_text(text[: len(text) // 3])
    shard = _shards(folder)[0]
    for n, damage in enumerate(("truncated meta.json", "a file of another layout under the meta's sha256")):
        if n == 1:
            torch.save({"index": torch.zeros(3, dtype=torch.int32)}, shard)
            m = json.loads((folder / META_FILE).read_text())
            m["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
            (folder / META_FILE).write_text(json.dumps(m))
        rc = main(["--workdir", str(tmp_path / "w"), "train", "--method", "kd", "--teachers", str(teachers), *data,
                   "--teacher-store", "auto", "--no-track", "--json", "--out", str(tmp_path / f"d{n}")])
        out, err = capsys.readouterr()
        said = [line for line in err.splitlines() if "rebuilding it" in line]
        assert rc == 0 and len(said) == 1 and "Traceback" not in err, (damage, err)
        assert ("meta.json is damaged" if n == 0 else "is not a shard of this store") in said[0], damage
        got = json.loads(out)
        assert got["test_acc"] == first["test_acc"] and got["teacher_images"] == 0, damage
        shard = _shards(folder)[0]


def test_a_second_build_of_the_same_store_waits_for_the_first(fake_teachers, tmp_path):
    """Two builds of one store at once (two sweeps over one teacher set) would remove each other's
    new shards when saving: the second waits for the first's lock, says so, then adds its rows."""
    import threading
    import time

    from kdray.core.guards import held_exclusively

    cfg = small_cfg(method="kd", teachers=str(fake_teachers))
    first = open_teacher_store(cfg, root=tmp_path, **QUIET)
    folder = tmp_path / first.meta["digest"]
    lock = tmp_path / ".locks" / f"{folder.name}.lock"
    assert lock.is_file() and len(list_stores(tmp_path)) == 1  # the lock folder is no store
    logs, built = [], []
    second = threading.Thread(target=lambda: built.append(
        open_teacher_store(cfg.replace(epochs=4), root=tmp_path, log=logs.append)))
    with held_exclusively(lock, lambda: None):  # another process is building this store
        second.start()
        deadline = time.monotonic() + 60
        while not any("waiting for another kdray process building" in line for line in logs):
            assert time.monotonic() < deadline, logs
            time.sleep(0.05)
        time.sleep(0.3)
        assert not built and load(folder).rows == first.rows  # nothing computed while it waits
    second.join(120)
    assert built and load(folder).rows == built[0].rows > first.rows
