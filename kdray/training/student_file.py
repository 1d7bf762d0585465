"""The deployable student file (``student.pt``): a self-describing record loadable with
``weights_only=True``, its check, and its inverse. Written each epoch by :mod:`kdray.training.fit`;
read by ``kdray.load_student`` and by deploy (export, the champion model, latency)."""

from __future__ import annotations

from typing import Optional

from torch import nn

from kdray.core.device import EVAL_PRECISION
from kdray.core.errors import KdrayError
from kdray.models import build_student


def student_record(student: nn.Module, cfg, data, metrics: dict, *, multi_branch: bool,
                   evaluated_on: Optional[str] = None) -> dict:
    """Everything needed to rebuild and use ``student``: architecture, classes, preprocessing,
    the run config and its final metrics, and the weights (plain tensors only). ``evaluated_on``:
    the device type the metrics' accuracies were measured on; with it the record says so in
    ``evaluation`` together with their precision (fp32 whatever ``amp``; records written before
    have no ``evaluation`` and may hold accuracies measured under bf16 autocast)."""
    evaluation = {} if evaluated_on is None else {"evaluation": {"device": evaluated_on, "precision": EVAL_PRECISION}}
    return {
        "format": STUDENT_FORMAT,
        "arch": cfg.student,
        "num_classes": data.num_classes,
        "multi_branch": bool(getattr(student, "num_branches", 1) > 1 or multi_branch),
        "branches": int(getattr(student, "num_branches", 1)),
        "split_stage": int(getattr(student, "split_stage", cfg.split_stage)),
        "classes": list(data.classes),
        "mean": list(data.mean),
        "std": list(data.std),
        "image_size": int(data.image_size),
        "dataset": cfg.dataset,
        "method": cfg.method,
        "config": cfg.to_dict(),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "state_dict": {k: v.detach().cpu() for k, v in student.state_dict().items()},
        **evaluation,
    }


def rebuild_student(record: dict) -> nn.Module:
    """Inverse of :func:`student_record`: the student module with its weights, in eval mode."""
    student = build_student(
        record["arch"], record["num_classes"], branches=record["branches"],
        split_stage=record["split_stage"], multi_branch=record["multi_branch"],
    )
    student.load_state_dict(record["state_dict"])
    return student.eval()


#: the keys every ``student.pt`` record holds
_RECORD_KEYS = ("arch", "num_classes", "multi_branch", "branches", "split_stage", "classes", "mean", "std",
                "image_size", "config", "metrics", "state_dict")


def check_record(record, where: str = "student record") -> dict:
    """``record`` if it is a kdray ``student.pt`` dict, else a KdrayError naming what is missing."""
    if not isinstance(record, dict):
        raise KdrayError(f"{where}: not a kdray student (expected a dict, got {type(record).__name__})")
    if record.get("format") not in (None, STUDENT_FORMAT):
        raise KdrayError(f"{where}: format {record.get('format')!r} is not {STUDENT_FORMAT!r}")
    missing = [k for k in _RECORD_KEYS if k not in record]
    if missing:
        raise KdrayError(f"{where}: not a kdray student (missing {', '.join(missing)})")
    return record


STUDENT_FORMAT = "kdray-student/1"
