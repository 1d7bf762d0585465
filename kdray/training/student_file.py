"""The deployable student file (``student.pt``): a self-describing record loadable with
``weights_only=True``, and its inverse. Below the engine: the engine writes it, export, the
registry and latency measurement read it."""

from __future__ import annotations

from torch import nn

from kdray.models import build_student
from kdray.training.checkpoint import STUDENT_FORMAT


def student_record(student: nn.Module, cfg, data, metrics: dict, *, multi_branch: bool) -> dict:
    """Everything needed to rebuild and use ``student``: architecture, classes, preprocessing,
    the run config and its final metrics, and the weights (plain tensors only)."""
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
    }


def rebuild_student(record: dict) -> nn.Module:
    """Inverse of :func:`student_record`: the student module with its weights, in eval mode."""
    student = build_student(
        record["arch"], record["num_classes"], branches=record["branches"],
        split_stage=record["split_stage"], multi_branch=record["multi_branch"],
    )
    student.load_state_dict(record["state_dict"])
    return student.eval()
