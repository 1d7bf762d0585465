"""One generation of a run, built: the student, the method's trainable parts, optimizer and
learning-rate schedule, where its teacher outputs come from, and the DDP wrapper when several
ranks train."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from kdray.core.device import Precision
from kdray.core.errors import KdrayError
from kdray.distill import Generation, Method, get_method
from kdray.models import build_student
from kdray.teachers.ensemble import LiveTeacherOutputs, TeacherEnsemble
from kdray.teachers.source import StoredTeacherOutputs
from kdray.training.config import SYNC_BN_NEEDS_CUDA
from kdray.training.prepare import Prepared

TeacherOutputs = Callable[..., dict]  # (x, view keys) -> {"logits": [K,N,C], "feats": [...]}


class TrainModule(nn.Module):
    """Student plus the method's trainable parts: the one module DDP wraps (teachers stay out)."""

    def __init__(self, student: nn.Module, method: Method):
        super().__init__()
        self.student = student
        self.method = method

    def forward(self, x, y, t_out):
        s_out = self.student(x)
        return self.method(y, s_out, t_out)


def lr_factor(cfg, epoch: int) -> float:
    """Learning-rate multiplier for a 0-based epoch."""
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.schedule == "step":
        passed = sum(1 for m in cfg.lr_milestones if epoch >= round(m * cfg.epochs))
        return cfg.lr_gamma**passed
    return 1.0


def make_optimizer(cfg, params):
    """SGD (Nesterov when there is momentum) or AdamW, as the config says."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class StepParts:
    """Everything one training step touches. ``wrapped`` is ``module`` or its DDP wrapper."""

    student: nn.Module
    method: Method
    module: TrainModule
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    teacher_outputs: Optional[TeacherOutputs]
    precision: Precision


def teacher_source(plan: Generation, prep: Prepared, feats: bool, prev_student_state: Optional[dict]):
    """Where a generation's teacher outputs come from: the store when one is given (and holds the
    feature maps the method needs), else the live ensemble; for a sequential generation the
    previous generation's student, frozen and live. None for a method without teachers."""
    autocast = prep.precision.autocast
    if plan.teacher == "previous":
        prev = build_student(prep.cfg.student, prep.data.num_classes)
        prev.load_state_dict(prev_student_state)
        return LiveTeacherOutputs(TeacherEnsemble([prev.model]).to(prep.precision.device), autocast, feats)
    if prep.store is not None and (prep.store.has_feats or not feats):
        return StoredTeacherOutputs(prep.store, prep.precision.device, feats,
                                    live=lambda: LiveTeacherOutputs(prep.ensemble(), autocast, feats))
    if prep.teachers is None and prep.store is None:
        return None
    return LiveTeacherOutputs(prep.ensemble(), autocast, feats)


def describe_source(source, prep: Prepared) -> str:
    """One line for the run's log: where this generation's teacher outputs come from."""
    if isinstance(source, StoredTeacherOutputs):
        store = source.store
        return f"teacher outputs: store {store.meta.get('digest', '(in memory)')}, {store.coverage()}"
    if prep.store is not None:
        return "teacher outputs: live ensemble (feature maps online: the store holds none)"
    return "teacher outputs: live ensemble"


def wrap_for_ranks(module: TrainModule, cfg, prep: Prepared) -> nn.Module:
    """``module`` as the step calls it: DDP-wrapped (SyncBatchNorm on GPU) when several ranks train."""
    if prep.world == 1:
        return module
    cuda = prep.precision.device.type == "cuda"
    if cfg.sync_bn or (cfg.sync_bn is None and cuda):
        if not cuda:
            raise KdrayError(SYNC_BN_NEEDS_CUDA)
        # BatchNorm statistics over the global batch, as one process would compute them.
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return nn.parallel.DistributedDataParallel(module, device_ids=[prep.precision.device.index] if cuda else None)


def build_generation(cfg, prep: Prepared, plan: Generation, prev_student_state=None) -> StepParts:
    """The generation's parts, freshly initialised from its seed (``wrapped`` is ``module`` until
    :func:`wrap_for_ranks`, after any checkpoint is restored)."""
    method_cls = get_method(cfg.method)
    source = teacher_source(plan, prep, method_cls.needs_teacher_feats(cfg), prev_student_state)
    torch.manual_seed(plan.seed(cfg.seed))
    student = build_student(cfg.student, prep.data.num_classes, branches=cfg.branches,
                            split_stage=cfg.split_stage, multi_branch=method_cls.multi_branch)
    method = method_cls(cfg, student, source.info if source is not None else None)
    if source is not None and method.uses_teacher_feats and not source.feats:
        raise KdrayError(f"method {cfg.method!r} uses the teachers' feature maps, but its class does not say so "
                         "before it is built: override needs_teacher_feats(cfg) to return True when it will")
    module = TrainModule(student, method).to(prep.precision.device)
    if prep.precision.channels_last:
        module = module.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, [p for p in module.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(cfg, e))
    return StepParts(student, method, module, module, optimizer, scheduler, source, prep.precision)
