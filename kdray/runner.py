"""One training run end to end: in this process or on Ray Train workers, tracked or not."""

from __future__ import annotations

import shutil
from pathlib import Path

from .engine import fit


def run_training(cfg, *, out: Path, run_name: str, tracking=None, log=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = fit(cfg, log=log, checkpoint_root=cfg.checkpoint_dir)
    latest = sorted(Path(cfg.checkpoint_dir).glob("epoch_*"))[-1]
    student_path = out / "student.pt"
    shutil.copyfile(latest / "student.pt", student_path)
    result["student_path"] = str(student_path)
    return result
