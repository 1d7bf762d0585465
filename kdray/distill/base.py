"""The method contract and its single registry.

A method receives the labels, the student's outputs and the teachers' outputs and returns the
logits to evaluate plus a dict of named loss terms. The engine sums the dict and logs every term
by name; it never asks which method it runs. Adding a method is one file with ``@register``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ..errors import KdrayError, choice_error

METHODS: dict[str, type["Method"]] = {}


@dataclass(frozen=True)
class TeacherInfo:
    """What a method may know about the teachers when it builds its trainable parts."""

    count: int
    feat_channels: tuple[int, ...]


@dataclass(frozen=True)
class Generation:
    """One full training run of a method. ``teacher`` is "ensemble" or "previous"."""

    index: int
    teacher: str = "ensemble"


class Method(nn.Module):
    """Base class. Trainable parts (adapters, translators) are submodules of the method."""

    name: ClassVar[str] = ""
    min_teachers: ClassVar[int] = 1
    multi_branch: ClassVar[bool] = False
    default_alpha: ClassVar[float] = 0.9

    def __init__(self, cfg, student: nn.Module, teachers: Optional[TeacherInfo]):
        super().__init__()
        self.cfg = cfg
        self.T = float(cfg.temperature)
        self.alpha = cfg.resolved_alpha(self.default_alpha)

    #: whether the engine must return the teachers' feature maps (costs memory)
    uses_teacher_feats: bool = False

    def forward(self, y: torch.Tensor, s_out: dict, t_out: Optional[dict]):  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def generations(cls, cfg) -> list[Generation]:
        return [Generation(0)]


def register(cls: type[Method]) -> type[Method]:
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} missing or registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise choice_error("method", name, sorted(METHODS))
    return METHODS[name]


def check_teacher_count(method: type[Method], count: int) -> None:
    if count < method.min_teachers:
        raise KdrayError(
            f"method {method.name!r} needs at least {method.min_teachers} teacher(s), got {count}; "
            "pass --teachers DIR (written by `kdray teachers train`)"
        )
