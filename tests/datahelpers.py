"""Helpers for the data tests: tiny image trees and the offline CIFAR-10 JPEG copy."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_JPEG = SHARED / "datasets" / "cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_image(path: Path, seed: int, size=(20, 20), mode: str = "RGB") -> None:
    """Write a random image (format from the suffix) with PIL."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def write_tree(root: Path, classes=("cat", "dog", "emu"), per_class: int = 6, seed: int = 0) -> Path:
    """A class-per-folder tree mixing PNG and JPEG, odd sizes, grayscale and RGBA images."""
    for ci, name in enumerate(classes):
        for i in range(per_class):
            k = seed * 1000 + ci * 100 + i
            suffix = ".png" if i % 2 else ".jpg"
            size = (20, 20) if i % 3 else (30, 24)
            mode = "RGBA" if (i == 1 and suffix == ".png") else ("L" if i == 4 else "RGB")
            write_image(root / name / f"img{i:03d}{suffix}", k, size, mode)
    (root / classes[0] / "notes.txt").write_text("not an image")
    return root


def extract_cifar_subset(dest: Path, per_class: int = 20) -> Path:
    """Extract the first ``per_class`` images of each class and split from the shared tarball."""
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR_JPEG, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in ("train", "test"):
                continue
            key = (parts[0], parts[1])
            if counts.get(key, 0) >= per_class or not parts[2].endswith(".jpg"):
                continue
            counts[key] = counts.get(key, 0) + 1
            out = dest / parts[0] / parts[1] / parts[2]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())
    return dest
