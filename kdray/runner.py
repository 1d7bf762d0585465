"""One training run end to end: in this process, or on Ray Train workers when workers > 1."""

from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import safe_load


def run_training(cfg, *, out: Path, run_name: str, tracking=None, log=print, address=None,
                 gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.workers > 1:
        from .scale import fit_distributed

        res = fit_distributed(cfg, workers=cfg.workers, out=out, address=address,
                              gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, name=run_name)
        latest = Path(res["checkpoint_dir"])
        result = {"metrics": safe_load(latest / "student.pt", "student")["metrics"]}
        result["metrics"].update({k: v for k, v in res["metrics"].items() if isinstance(v, (int, float))})
    else:
        from .engine import fit

        result = fit(cfg, log=log, checkpoint_root=cfg.checkpoint_dir)
        latest = sorted(Path(cfg.checkpoint_dir).glob("epoch_*"))[-1]
    student_path = out / "student.pt"
    shutil.copyfile(latest / "student.pt", student_path)
    result["student_path"] = str(student_path)
    return result
