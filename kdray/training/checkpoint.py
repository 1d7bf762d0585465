"""Atomic checkpoint files, always loaded with ``weights_only=True``, and a run's checkpoint folder:
finding the latest epoch, saving one and rotating old ones."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from kdray.core.errors import KdrayError

STUDENT_FORMAT = "kdray-student/1"
CKPT_FORMAT = "kdray-checkpoint/1"


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # in memory first: a full disk then fails as an OSError naming the file
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
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
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, i.e. running the file's code: never that
        raise KdrayError(f"{what} {path} was refused: it holds Python objects other than tensors and plain "
                         "values, and loading those could run code; kdray loads tensors only") from None
    except Exception as exc:  # corrupt, truncated or not a torch file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KdrayError(f"{what} {path} is corrupt or unreadable ({first[:160]})") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- a run's checkpoint folder: root/epoch_NNNN/{checkpoint.pt, student.pt} ----------------------
def epoch_dir(root: str | Path, global_epoch: int) -> Path:
    return Path(root) / f"epoch_{global_epoch:04d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest epoch folder under ``root`` that holds a complete training checkpoint."""
    root = Path(root)
    if not root.is_dir():
        return None
    for d in sorted(root.glob("epoch_*"), reverse=True):
        if (d / "checkpoint.pt").is_file():
            return d
    return None


def load_training_state(folder: str | Path) -> dict:
    """The training state saved in ``folder`` (weights_only), checked to be kdray's own."""
    state = safe_load(Path(folder) / "checkpoint.pt", "checkpoint")
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise KdrayError(f"{folder}: not a kdray checkpoint")
    return state


def save_epoch(root: str | Path, global_epoch: int, state: dict, student_record: dict, keep: int) -> Path:
    """Write one epoch's training state and deployable student, then keep only the newest ``keep``
    epoch folders (0: keep all until the run removes the root at its end)."""
    folder = epoch_dir(root, global_epoch)
    atomic_save({"format": CKPT_FORMAT, **state}, folder / "checkpoint.pt")
    atomic_save(student_record, folder / "student.pt")
    if keep > 0:
        for old in sorted(Path(root).glob("epoch_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return folder
