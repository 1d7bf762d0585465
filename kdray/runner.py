"""One training run end to end: in this process, or on Ray Train workers when workers > 1,
tracked as one MLflow run unless tracking is off."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from .checkpoint import safe_load


def run_training(cfg, *, out: Path, run_name: str, tracking: Optional[dict] = None, log=print, address=None,
                 gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, max_failures: int = 0) -> dict:
    """``tracking``: ``{"uri": ..., "experiment": ..., "workdir": ...}`` or None for no MLflow."""
    if cfg.workers > 1 and cfg.sync_bn and cfg.device == "cpu":  # known before Ray starts
        from .engine import SYNC_BN_NEEDS_CUDA
        from .errors import KdrayError

        raise KdrayError(SYNC_BN_NEEDS_CUDA)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    track = None
    if tracking:
        from . import tracking as tr
        from .distill import get_method

        exp_id = tr.experiment_id(tracking["uri"], tracking["experiment"], tracking.get("workdir"))
        run_id = tr.start_run(tracking["uri"], exp_id, run_name=run_name, cfg=cfg, kind="train",
                              extra_tags=tr.versions())
        track = {"uri": tracking["uri"], "run_id": run_id, "experiment_id": exp_id}
        log(f"tracking: MLflow run {run_id} in experiment {tracking['experiment']!r} at {tracking['uri']}")
    try:
        if cfg.workers > 1:
            from .scale import fit_distributed

            res = fit_distributed(cfg, workers=cfg.workers, out=out, address=address, gpus_per_worker=gpus_per_worker,
                                  cpus_per_worker=cpus_per_worker, name=run_name, tracking=track,
                                  max_failures=max_failures)
            latest = Path(res["checkpoint_dir"])
            result = {"metrics": safe_load(latest / "student.pt", "student")["metrics"]}
            result["metrics"].update({k: v for k, v in res["metrics"].items() if isinstance(v, (int, float))})
        else:
            from .engine import fit

            reporter = None
            if track:
                total = cfg.epochs * len(get_method(cfg.method).generations(cfg))
                reporter = tr.RunLogger(track["uri"], run_id, total, teachers=cfg.teachers).epoch
            result = fit(cfg, log=log, checkpoint_root=cfg.checkpoint_dir, reporter=reporter)
            latest = sorted(Path(cfg.checkpoint_dir).glob("epoch_*"))[-1]
    except BaseException as exc:
        if track:
            reason = f"{type(exc).__name__}: {str(exc).strip()[:400]}"
            tr.finish_run(track["uri"], track["run_id"], "failed", reason)
        raise
    student_path = out / "student.pt"
    shutil.copyfile(latest / "student.pt", student_path)
    result["student_path"] = str(student_path)
    if track:
        result["run_id"] = track["run_id"]
        m = tr.client(track["uri"]).get_run(track["run_id"]).data.metrics
        if "latency_ms" in m:
            result["metrics"]["latency_ms"] = m["latency_ms"]
    return result
