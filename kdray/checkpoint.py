"""Atomic checkpoint files, always loaded with ``weights_only=True``."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from .errors import KdrayError

STUDENT_FORMAT = "kdray-student/1"
CKPT_FORMAT = "kdray-checkpoint/1"


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def safe_load(path: str | Path, what: str = "checkpoint"):
    path = Path(path)
    if not path.is_file():
        raise KdrayError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or not a torch file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KdrayError(f"{what} {path} is corrupt or unreadable ({first[:160]})") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
