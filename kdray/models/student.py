"""Students with one output contract: ``{"logits", "branch_logits", "feats"}``.

``logits`` [N, C] is what gets evaluated, ``branch_logits`` [B, N, C] holds each branch's logits and
``feats`` is a list of B last-stage feature maps (before pooling).
"""

from __future__ import annotations

import copy
from typing import Optional, Union

import torch
from torch import nn

from kdray.core.errors import KdrayError
from kdray.models.staged import StagedModel
from kdray.models.zoo import build_model


class Student(nn.Module):
    """A single :class:`StagedModel` presented with the student output contract (B = 1)."""

    num_branches = 1

    def __init__(self, model: StagedModel):
        super().__init__()
        self.model = model
        self.stage_channels = list(model.stage_channels)
        self.feat_channels = model.stage_channels[-1]
        self.arch = model.arch
        self.num_classes = model.num_classes

    def forward(self, x: torch.Tensor) -> dict:
        z, feats = self.model.forward_features(x)
        return {"logits": z, "branch_logits": z.unsqueeze(0), "feats": [feats[-1]]}


class _Branch(nn.Module):
    """The unshared tail of one branch: remaining stages + head."""

    def __init__(self, stages: list[nn.Module], head: nn.Module):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for stage in self.stages:
            x = stage(x)
        return self.head(x), x


class MultiBranchStudent(nn.Module):
    """EKD student: a shared trunk (stem + ``stages[:split_stage]``) feeding B branches.

    Each branch (``stages[split_stage:]`` + head) comes from an independently initialised build of
    ``backbone``, so branches start different. ``logits`` is the mean of the branch logits.
    """

    def __init__(self, backbone: str, num_classes: int, branches: int, split_stage: int):
        super().__init__()
        if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
            raise KdrayError(f"branches must be an integer >= 1, got {branches!r}")
        base = build_model(backbone, num_classes)
        n = len(base.stages)
        bad = isinstance(split_stage, bool) or not isinstance(split_stage, int)
        if bad or not 0 <= split_stage < n:
            raise KdrayError(
                f"split_stage must be an integer in 0..{n - 1} for {backbone!r} ({n} stages; "
                f"each branch keeps at least one stage), got {split_stage!r}"
            )
        self.stem = base.stem
        self.trunk = nn.ModuleList(base.stages[:split_stage])
        models = [base] + [build_model(backbone, num_classes) for _ in range(branches - 1)]
        self.branches = nn.ModuleList(_Branch(list(m.stages[split_stage:]), m.head) for m in models)
        self.stage_channels = list(base.stage_channels)
        self.num_branches = branches
        self.feat_channels = base.stage_channels[-1]
        self.arch = base.arch
        self.split_stage = split_stage
        self.num_classes = base.num_classes

    def trunk_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.trunk:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> dict:
        h = self.trunk_forward(x)
        logits, feats = [], []
        for branch in self.branches:
            z, f = branch(h)
            logits.append(z)
            feats.append(f)
        branch_logits = torch.stack(logits)
        return {"logits": branch_logits.mean(0), "branch_logits": branch_logits, "feats": feats}

    def extract_branch(self, b: int) -> StagedModel:
        """A standalone single model (deep copies of trunk + branch ``b``)."""
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < self.num_branches:
            raise KdrayError(f"branch must be an integer in 0..{self.num_branches - 1}, got {b!r}")
        br = self.branches[b]
        model = StagedModel(
            copy.deepcopy(self.stem),
            [copy.deepcopy(s) for s in self.trunk] + [copy.deepcopy(s) for s in br.stages],
            copy.deepcopy(br.head),
            self.stage_channels,
            self.num_classes,
            self.arch,
        )
        return model.train(self.training)


def build_student(
    name: str,
    num_classes: int,
    branches: int = 1,
    split_stage: int = 1,
    multi_branch: bool = False,
) -> Union[Student, MultiBranchStudent]:
    """A :class:`MultiBranchStudent` when ``multi_branch``, else a single :class:`Student`."""
    if multi_branch:
        return MultiBranchStudent(name, num_classes, branches, split_stage)
    return Student(build_model(name, num_classes))


class EnsembleLogits(nn.Module):
    """Images -> mean branch logits of a :class:`MultiBranchStudent` (shares its modules)."""

    def __init__(self, student: MultiBranchStudent):
        super().__init__()
        self.stem = student.stem
        self.trunk = student.trunk
        self.branches = student.branches
        self.num_classes = student.num_classes
        self.arch = student.arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.trunk:
            x = stage(x)
        logits: list[torch.Tensor] = []
        for branch in self.branches:
            logits.append(branch(x)[0])
        return torch.stack(logits).mean(0)


def export_module(student: nn.Module, branch: Optional[int] = None) -> nn.Module:
    """An images -> logits module for deployment (``torch.jit.trace`` / ``torch.export``)."""
    if isinstance(student, MultiBranchStudent):
        return EnsembleLogits(student) if branch is None else student.extract_branch(branch)
    if branch not in (None, 0):
        raise KdrayError(f"branch {branch!r} given, but a single-branch student has only branch 0")
    if isinstance(student, Student):
        return student.model
    if isinstance(student, StagedModel):
        return student
    raise KdrayError(
        f"cannot export {type(student).__name__}; expected a Student or MultiBranchStudent"
    )
