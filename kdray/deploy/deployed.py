"""What a student record deploys as: the branch chosen (``best``, ``all`` or a number) and the
deploy module built from it (:class:`Deployed`: the data set's normalisation
inside, then the whole student or one branch)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from kdray.core.errors import KdrayError
from kdray.core.io import first_line
from kdray.training.student_file import check_record

#: "best", "all" or a branch number (the CLI's strings such as "2" too: see :func:`parse_branch`)
Branch = Union[str, int]


class Deployed(nn.Module):
    """[0, 1] images -> the student's logits, normalising inside exactly like ``BatchLoader``."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        # the same float32 expressions as BatchLoader: (x*255) * scale - shift is then bit-identical
        # to the loader's uint8 * scale - shift, since (u/255)*255 == u exactly for every uint8 u
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", mean_t / std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.mul(255.0).mul(self.scale).sub(self.shift))


def num_branches(record: dict) -> int:
    """Branches a deployer can choose from: B for a multi-branch student, 1 otherwise."""
    return max(1, int(record.get("branches", 1))) if record.get("multi_branch") else 1


def branch_accuracies(record: dict) -> tuple[list[Optional[float]], str]:
    """Per-branch logged accuracy and the split it came from: ``val`` (so that picking the best
    branch does not peek at the test split), else ``test``."""
    m = record.get("metrics", {})
    n = num_branches(record)
    for split in ("val", "test"):
        keys = [f"{split}_acc_b{i}" for i in range(n)]
        if all(k in m for k in keys):
            return [float(m[k]) for k in keys], split
        if n == 1 and f"{split}_acc" in m:  # one branch: evaluate logs no per-branch keys
            return [float(m[f"{split}_acc"])], split
    return [None] * n, "none"


def parse_branch(branch: Branch) -> Branch:
    """``"best"``, ``"all"`` or a branch number (CLI strings such as ``"2"`` become ints)."""
    if isinstance(branch, bool):
        raise KdrayError(f"branch {branch!r} is not allowed; allowed: best, all or a branch number")
    if isinstance(branch, int):
        return branch
    s = str(branch).strip().lower()
    if s in ("best", "all"):
        return s
    try:
        return int(s)
    except ValueError:
        raise KdrayError(f"branch {branch!r} is not allowed; allowed: best, all or a branch number") from None


def resolve_branch(record: dict, branch: Branch) -> Optional[int]:
    """``None`` for the whole student (EKD: the ensemble of all branches), else a branch index.

    ``best`` picks the multi-branch student's branch with the highest logged ``val_acc_b{i}``
    (the test split never chooses; ``test_acc_b{i}`` only when the val ones are missing; ties: the
    lowest index); for a single
    student it means the student itself. A single student allows best, all and 0 only.
    """
    branch = parse_branch(branch)
    multi = bool(record.get("multi_branch"))
    n = num_branches(record)
    if branch == "all":
        return None
    if branch == "best":
        if not multi:
            return None
        accs, split = branch_accuracies(record)
        if split == "none":
            raise KdrayError("--branch best: the student has no logged per-branch accuracy "
                             f"(test_acc_b*/val_acc_b*); choose --branch all or 0..{n - 1}")
        return max(range(n), key=lambda i: (accs[i], -i))
    if not 0 <= branch < n:
        allowed = f"0..{n - 1}" if n > 1 else "0"
        kind = f"a {n}-branch student" if multi else "a single-branch student"
        raise KdrayError(f"branch {branch} does not exist in {kind}; allowed: best, all or {allowed}")
    return branch if multi else None


def logged_accuracy(record: dict, branch: Optional[int]) -> Optional[float]:
    """The accuracy the run logged for what gets exported (ensemble/single: test_acc)."""
    m = record.get("metrics", {})
    key = "test_acc" if branch is None or num_branches(record) == 1 else f"test_acc_b{branch}"
    return float(m[key]) if key in m else None


def deploy_module(record: dict, branch: Branch = "all") -> nn.Module:
    """The deploy module for ``record`` ([0, 1] images -> logits), on CPU in eval mode.

    Built from the student weights only: ``rebuild_student`` loads ``record["state_dict"]``
    strictly, so a record carrying anything else (say FEED translators) is refused.
    """
    from kdray.models import export_module
    from kdray.training.student_file import rebuild_student

    check_record(record)
    b = resolve_branch(record, branch)
    try:
        student = rebuild_student(record)
    except RuntimeError as exc:  # load_state_dict(strict=True): missing or unexpected keys
        raise KdrayError(f"student weights do not fit {record['arch']!r}: {first_line(exc, 200)}") from None
    net = export_module(student, b)
    return Deployed(net, record["mean"], record["std"]).eval()


def branch_label(record: dict, branch_index: Optional[int]) -> str:
    """What is deployed, in words: "branch 2", "ensemble" (every branch of an EKD student) or "student"."""
    if branch_index is not None:
        return f"branch {branch_index}"
    return "ensemble" if record.get("multi_branch") and num_branches(record) > 1 else "student"
