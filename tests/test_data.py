"""Tests for kdray.data: datasets, splits, augmentation and the batch loader."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from datahelpers import CIFAR10_CLASSES, CIFAR_JPEG, extract_cifar_subset, write_image, write_tree  # noqa: E402

import kdray.data.imagefolder as imagefolder  # noqa: E402
from kdray.core.errors import KdrayError  # noqa: E402
from kdray.data.bundle import DataBundle
from kdray.data.loader import BatchLoader
from kdray.data.sources import DATASETS, load_data
from kdray.data.splits import Split, split_indices  # noqa: E402
from kdray.data.views import crop_and_flip
from kdray.training.config import RunConfig  # noqa: E402


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data(RunConfig(dataset="digits"))


def counts(y: torch.Tensor, n: int = 10) -> torch.Tensor:
    return torch.bincount(y, minlength=n)


# --------------------------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_classes(digits):
    assert digits.name == "digits" and digits.num_classes == 10
    assert digits.classes == [str(i) for i in range(10)]
    for split in (digits.train, digits.val, digits.test):
        assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64
        assert split.x.shape[1:] == (3, 32, 32) and split.x.shape[0] == split.y.shape[0]
        assert split.x.is_contiguous() and split.x.device.type == "cpu"
        assert set(split.y.tolist()) == set(range(10))
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert len(digits.test) == pytest.approx(0.2 * 1797, abs=10)
    assert len(digits.val) == pytest.approx(0.1 * 0.8 * 1797, abs=10)
    assert digits.image_size == 32 and digits.crop_padding == 4 and digits.hflip is False
    assert all(0 < m < 1 for m in digits.mean) and all(0 < s < 1 for s in digits.std)
    assert torch.equal(digits.train.x[:, 0], digits.train.x[:, 2])  # grey replicated


def test_digits_pixel_values_at_native_size():
    from sklearn.datasets import load_digits

    b = load_data(RunConfig(dataset="digits", image_size=8))
    raw = torch.from_numpy(load_digits().images)
    assert b.train.x.shape[1:] == (3, 8, 8)
    allowed = set(torch.round(torch.arange(17) * 255 / 16).long().tolist())
    assert set(b.train.x.unique().tolist()) <= allowed
    assert b.train.x.max() == 255
    # the multiset of images is preserved (compare sorted per-image sums)
    all_x = torch.cat([b.train.x, b.val.x, b.test.x])[:, 0].double()
    expect = torch.round(raw * 255 / 16)
    assert torch.equal(all_x.sum((1, 2)).sort().values, expect.sum((1, 2)).sort().values)


def test_split_indices_disjoint_stratified_and_seeded(digits):
    y = torch.cat([digits.train.y, digits.val.y, digits.test.y])  # any labels will do
    idx = split_indices(y, val_fraction=0.1, train_fraction=1.0, data_seed=0, test_fraction=0.2)
    sets = {k: set(v.tolist()) for k, v in idx.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert sets["train"] | sets["val"] | sets["test"] == set(range(len(y)))
    per_class = counts(y)
    assert torch.all((counts(y[idx["test"]]) - 0.2 * per_class).abs() <= 1)
    assert torch.all((counts(y[idx["val"]]) - 0.1 * (per_class - counts(y[idx["test"]]))).abs() <= 1)

    other = split_indices(y, val_fraction=0.1, train_fraction=1.0, data_seed=1, test_fraction=0.2)
    assert torch.equal(other["test"], idx["test"])  # test never depends on data_seed
    assert not torch.equal(other["val"], idx["val"])
    again = split_indices(y, val_fraction=0.1, train_fraction=1.0, data_seed=0, test_fraction=0.2)
    assert all(torch.equal(again[k], idx[k]) for k in idx)

    small = split_indices(y, val_fraction=0.1, train_fraction=0.25, data_seed=0, test_fraction=0.2)
    assert torch.equal(small["val"], idx["val"]) and torch.equal(small["test"], idx["test"])
    assert set(small["train"].tolist()) <= sets["train"]
    full = counts(y[idx["train"]])
    assert torch.all((counts(y[small["train"]]) - 0.25 * full).abs() <= 1)
    tiny = split_indices(y, val_fraction=0.1, train_fraction=0.001, data_seed=0, test_fraction=0.2)
    assert counts(y[tiny["train"]]).tolist() == [1] * 10
    assert set(tiny["train"].tolist()) <= set(small["train"].tolist())  # nested subsets


def test_load_data_train_fraction_and_determinism(digits):
    b = load_data(RunConfig(dataset="digits", train_fraction=0.1))
    assert torch.equal(b.val.x, digits.val.x) and torch.equal(b.test.y, digits.test.y)
    assert len(b.train) == pytest.approx(0.1 * len(digits.train), abs=10)
    assert counts(b.train.y).min() >= 1
    again = load_data(RunConfig(dataset="digits", train_fraction=0.1))
    assert torch.equal(again.train.x, b.train.x) and torch.equal(again.train.y, b.train.y)
    assert again.mean == b.mean and again.std == b.std
    reseeded = load_data(RunConfig(dataset="digits", data_seed=3))
    assert torch.equal(reseeded.test.x, digits.test.x)
    assert not torch.equal(reseeded.val.y, digits.val.y) or not torch.equal(reseeded.val.x, digits.val.x)


def test_train_stats_match_split(digits):
    x = digits.train.x.double() / 255
    assert digits.mean == pytest.approx(tuple(x.mean((0, 2, 3)).tolist()), abs=1e-9)
    assert digits.std == pytest.approx(tuple(x.std((0, 2, 3), unbiased=False).tolist()), abs=1e-9)


def test_fake_and_options():
    b = load_data(RunConfig(dataset="fake", image_size=16, crop_padding=1, hflip=True))
    assert b.num_classes == 10 and len(b.test) == 200 and len(b.train) + len(b.val) == 600
    assert b.train.x.shape[1:] == (3, 16, 16) and b.crop_padding == 1 and b.hflip is True
    assert torch.equal(load_data(RunConfig(dataset="fake", image_size=16)).test.x, b.test.x)
    # a class signal: nearest class-mean classifier beats chance by far
    means = torch.stack([b.train.x[b.train.y == c].float().mean(0) for c in range(10)])
    d = ((b.test.x.float()[:, None] - means[None]) ** 2).sum((2, 3, 4))
    assert (d.argmin(1) == b.test.y).float().mean() > 0.5


def test_unknown_dataset():
    with pytest.raises(KdrayError, match="unknown dataset 'mnist'; allowed: " + ", ".join(DATASETS)):
        load_data(RunConfig(dataset="mnist"))


# --------------------------------------------------------------------------------------------- augmentation


def _ramp(b=64, h=8, w=8):
    base = torch.arange(3 * h * w, dtype=torch.uint8).view(1, 3, h, w) % 251 + 1  # no zeros
    return base.expand(b, -1, -1, -1).contiguous()


def test_crop_and_flip_noop_and_shapes():
    x, b = _ramp(), 64
    zero = torch.zeros(b, dtype=torch.long)
    assert torch.equal(crop_and_flip(x, 0, zero, zero, None), x)
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 5, (b,), generator=g), torch.randint(0, 5, (b,), generator=g)
    out = crop_and_flip(x, 2, dy, dx, torch.rand(b, generator=g) < 0.5)
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.is_contiguous()


def test_crop_is_zero_padded_window():
    x, p = _ramp(b=25), 2
    offsets = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
    dy, dx = (torch.tensor(v) for v in zip(*offsets))
    out = crop_and_flip(x, p, dy, dx, None)
    canvas = torch.zeros(3, 8 + 2 * p, 8 + 2 * p, dtype=torch.uint8)
    canvas[:, p:-p, p:-p] = x[0]
    for img, (oy, ox) in zip(out, offsets):
        assert torch.equal(img, canvas[:, oy : oy + 8, ox : ox + 8]), "each output is its window of the padded image"
    assert (out == 0).any()  # padding shows up as zeros
    assert torch.equal(out[offsets.index((p, p))], x[0])  # the centre window is the image


def test_flip_mirrors():
    x = _ramp()
    flip = torch.arange(64) % 2 == 1
    zero = torch.zeros(64, dtype=torch.long)
    out = crop_and_flip(x, 0, zero, zero, flip)
    assert all(torch.equal(o, x[0].flip(-1) if f else x[0]) for o, f in zip(out, flip))


# --------------------------------------------------------------------------------------------- batch loader


def _indexed_split(n=101, size=4):
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Split(x, torch.arange(n))  # y identifies the sample


def _run(loader):
    return [(xb.clone(), yb.clone()) for xb, yb in loader]


def test_loader_train_sharding_covers_epoch():
    split = _indexed_split()
    loaders = [BatchLoader(split, 8, mean=(0.5,) * 3, std=(0.25,) * 3, train=True, rank=r, world_size=2, seed=3)
               for r in range(2)]
    assert [ld.num_samples for ld in loaders] == [51, 51] and [len(ld) for ld in loaders] == [7, 7]
    seen = []
    for ld in loaders:
        batches = _run(ld)
        assert len(batches) == len(ld) and [len(b[1]) for b in batches] == [8] * 6 + [3]
        seen += torch.cat([b[1] for b in batches]).tolist()
    assert set(seen) == set(range(101)) and len(seen) == 102
    assert loaders[0].indices().tolist() + loaders[1].indices().tolist() != list(range(102))


def test_loader_eval_exact_once_and_normalised():
    split = _indexed_split()
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    ys = []
    for r in range(3):
        ld = BatchLoader(split, 16, mean=mean, std=std, train=False, rank=r, world_size=3, crop_padding=4, hflip=True)
        for xb, yb in ld:
            assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and xb.shape[1:] == (3, 4, 4)
            m, sd = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
            expect = (split.x[yb].float() / 255 - m) / sd
            torch.testing.assert_close(xb, expect)  # no augmentation in eval
            ys += yb.tolist()
    assert sorted(ys) == list(range(101))


def test_loader_determinism_epochs_seeds_channels_last():
    split = _indexed_split(n=40, size=8)
    kw = dict(mean=(0.5,) * 3, std=(0.5,) * 3, train=True, crop_padding=2, hflip=True)
    a, b = BatchLoader(split, 16, seed=1, **kw), BatchLoader(split, 16, seed=1, **kw)
    ra, rb = _run(a), _run(b)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(ra, rb))
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(ra, _run(a)))  # same epoch: same batches
    a.set_epoch(1)
    assert not torch.equal(torch.cat([y for _, y in _run(a)]), torch.cat([y for _, y in ra]))
    c = BatchLoader(split, 16, seed=2, **kw)
    assert not torch.equal(torch.cat([y for _, y in _run(c)]), torch.cat([y for _, y in ra]))
    cl = BatchLoader(split, 16, seed=1, channels_last=True, **kw)
    out = _run(cl)
    assert out[0][0].is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(out, ra))
    assert [len(y) for _, y in out] == [16, 16, 8]


# --------------------------------------------------------------------------------------------- imagefolder


def _cfg(root, **kw):
    return RunConfig(dataset="imagefolder", data_dir=str(root), image_size=16, **kw)


def test_imagefolder_single_tree_and_cache(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "tree")
    b = load_data(_cfg(root))
    assert b.classes == ["cat", "dog", "emu"] and b.hflip is True and b.crop_padding == 2
    assert len(b.train) + len(b.val) + len(b.test) == 18 and counts(b.test.y, 3).tolist() == [1, 1, 1]
    assert b.train.x.shape[1:] == (3, 16, 16) and b.train.x.dtype == torch.uint8
    cache = list((root / ".kdray-cache").glob("imagefolder-*.pt"))
    assert len(cache) == 1

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(imagefolder, "_decode_files", boom)
    again = load_data(_cfg(root))
    assert torch.equal(again.train.x, b.train.x) and torch.equal(again.test.y, b.test.y)

    cache[0].write_bytes(b"not a torch file")  # corrupt cache: rebuilt, never fatal
    monkeypatch.undo()
    rebuilt = load_data(_cfg(root))
    assert torch.equal(rebuilt.train.x, b.train.x)
    monkeypatch.setattr(imagefolder, "_decode_files", boom)
    load_data(_cfg(root))  # the rebuilt cache is valid again
    assert not list((root / ".kdray-cache").glob("*.tmp"))

    write_image(root / "dog" / "extra.png", 99)  # a changed tree invalidates the key
    with pytest.raises(AssertionError, match="decoded again"):
        load_data(_cfg(root))
    monkeypatch.undo()
    assert len(load_data(_cfg(root)).classes) == 3
    fresh = list((root / ".kdray-cache").glob("imagefolder-*.pt"))
    assert len(fresh) == 1 and fresh != cache  # the stale cache was replaced, not kept beside it


def test_imagefolder_cache_falls_back_to_home(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "tree", per_class=3)
    (root / ".kdray-cache").write_text("a file, so no cache directory can be made here")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    first = load_data(_cfg(root))
    assert len(list((tmp_path / "home" / ".cache" / "kdray" / "imagefolder").glob("imagefolder-*.pt"))) == 1
    monkeypatch.setattr(imagefolder, "_decode_files", lambda *a, **k: pytest.fail("decoded again"))
    assert torch.equal(load_data(_cfg(root)).train.x, first.train.x)


def test_imagefolder_train_test_layout(tmp_path):
    root = tmp_path / "split"
    write_tree(root / "train", per_class=5)
    write_tree(root / "test", per_class=2, seed=1)
    b = load_data(_cfg(root, val_fraction=0.2))
    assert b.classes == ["cat", "dog", "emu"]
    assert counts(b.test.y, 3).tolist() == [2, 2, 2] and counts(b.val.y, 3).tolist() == [1, 1, 1]
    assert len(b.train) == 12


def test_imagefolder_errors(tmp_path):
    with pytest.raises(KdrayError, match="data-dir is required"):
        load_data(RunConfig(dataset="imagefolder"))
    with pytest.raises(KdrayError, match="does not exist"):
        load_data(_cfg(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdrayError, match="no class folders"):
        load_data(_cfg(tmp_path / "empty"))
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "b").mkdir()
    (tmp_path / "noimg" / "a" / "x.txt").write_text("x")
    with pytest.raises(KdrayError, match="no images found"):
        load_data(_cfg(tmp_path / "noimg"))
    write_tree(tmp_path / "mm" / "train", classes=("a", "b"), per_class=2)
    write_tree(tmp_path / "mm" / "test", classes=("a", "c"), per_class=2)
    with pytest.raises(KdrayError, match=r"test classes differ.*only in train: \['b'\]; only in test: \['c'\]"):
        load_data(_cfg(tmp_path / "mm"))
    bad = write_tree(tmp_path / "bad", classes=("a", "b"), per_class=2)
    (bad / "a" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(KdrayError, match="cannot decode image .*broken.png"):
        load_data(_cfg(bad))


# --------------------------------------------------------------------------------------------- cifar


def test_cifar10_missing_download_fails_with_hint(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)  # offline everywhere, even on CI with internet
    with pytest.raises(KdrayError) as err:
        load_data(RunConfig(dataset="cifar10", data_dir=str(tmp_path), download=True))
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg and "download failed" in msg
    assert "cifar-10-batches-py" in msg and "--dataset imagefolder" in msg
    assert socket.getdefaulttimeout() is None  # restored
    with pytest.raises(KdrayError, match="download is off.*cifar-100-python"):
        load_data(RunConfig(dataset="cifar100", data_dir=str(tmp_path / "none"), download=False))


@pytest.mark.skipif(not CIFAR_JPEG.is_file(), reason=f"offline CIFAR-10 JPEG copy not found at {CIFAR_JPEG}")
def test_cifar10_jpeg_copy_via_imagefolder(tmp_path):
    root = extract_cifar_subset(tmp_path / "cifar", per_class=20)
    b = load_data(RunConfig(dataset="imagefolder", data_dir=str(root)))
    assert b.classes == CIFAR10_CLASSES and b.num_classes == 10
    assert counts(b.test.y).tolist() == [20] * 10 and len(b.train) + len(b.val) == 200
    assert counts(b.val.y).tolist() == [2] * 10
    assert b.train.x.shape[1:] == (3, 32, 32) and b.hflip is True
    assert 0.35 < b.mean[0] < 0.6 and 0.15 < b.std[0] < 0.35
