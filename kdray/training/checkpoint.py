"""A run's checkpoint folder: finding the latest epoch, saving one (atomically, loaded back with
``weights_only=True``) and rotating old ones; the formats of the files in it."""

from __future__ import annotations

import shutil
from pathlib import Path

from kdray.core.errors import KdrayError
from kdray.core.io import atomic_save, safe_load

CKPT_FORMAT = "kdray-checkpoint/1"


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
    """Write one epoch's deployable student, then its training state (last: a folder with a
    ``checkpoint.pt`` is complete, so a disk that fills between the two leaves a folder that
    :func:`latest_checkpoint` passes over), then keep only the newest ``keep`` epoch folders (0:
    keep all until the run removes the root at its end)."""
    folder = epoch_dir(root, global_epoch)
    atomic_save(student_record, folder / "student.pt")
    atomic_save({"format": CKPT_FORMAT, **state}, folder / "checkpoint.pt")
    if keep > 0:
        for old in sorted(Path(root).glob("epoch_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return folder
