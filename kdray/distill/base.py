"""The method contract and its single registry.

A method receives the labels, the student's outputs and the teachers' outputs and returns the
logits to evaluate plus a dict of named loss terms. The training loop sums the dict and logs every
term by name; it never asks which method it runs. Adding a method is one file with ``@register``
(docs/methods.md, "Adding a method").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from kdray.core.errors import KdrayError, choice_error
from kdray.distill.hparams import HPARAMS, HParam, declare

METHODS: dict[str, type["Method"]] = {}


@dataclass(frozen=True)
class TeacherInfo:
    """What a method may know about the teachers when it builds its trainable parts."""

    count: int
    feat_channels: tuple[int, ...]


#: generation g counts its epochs and seeds from 1000 * g, so no two generations share a number
GENERATION_STRIDE = 1000


@dataclass(frozen=True)
class Generation:
    """One full training run of a method. ``teacher`` is "ensemble" or "previous"."""

    index: int
    teacher: str = "ensemble"

    def view_epoch(self, epoch: int) -> int:
        """The train loader's epoch number (``BatchLoader.set_epoch``) of this generation's 0-based
        ``epoch``: it draws the epoch's shuffle and augmentation views, and the teacher store is
        keyed by it, so the run and the store must both take it from here."""
        return epoch + GENERATION_STRIDE * self.index

    def seed(self, base: int) -> int:
        """The seed this generation's student and method are initialised from (``base``: the run's)."""
        return base + GENERATION_STRIDE * self.index


class Method(nn.Module):
    """Base class. Trainable parts (adapters, translators) are submodules of the method."""

    name: ClassVar[str] = ""
    min_teachers: ClassVar[int] = 1
    multi_branch: ClassVar[bool] = False
    default_alpha: ClassVar[float] = 0.9
    #: the hyperparameters this method reads from the config (see hparams.py)
    hparams: ClassVar[tuple[HParam, ...]] = ()

    def __init__(self, cfg, student: nn.Module, teachers: Optional[TeacherInfo]):
        super().__init__()
        self.cfg = cfg
        self.T = float(cfg.temperature)
        self.alpha = cfg.resolved_alpha(self.default_alpha)

    #: whether the engine must return the teachers' feature maps (costs memory)
    uses_teacher_feats: bool = False

    @classmethod
    def needs_teacher_feats(cls, cfg) -> bool:
        """Whether a run of ``cfg`` needs the teachers' feature maps (known before it is built)."""
        return cls.uses_teacher_feats

    def forward(self, y: torch.Tensor, s_out: dict, t_out: Optional[dict]):  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def generations(cls, cfg) -> list[Generation]:
        return [Generation(0)]

    @classmethod
    def total_epochs(cls, cfg) -> int:
        """Epochs over all generations: the length of the run's epoch axis (ASHA's max_t)."""
        return int(cfg.epochs) * len(cls.generations(cfg))


#: run-config keys of its own (set by kdray.training.config): a method may not declare one of them
RESERVED_NAMES: set[str] = set()


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available by its name, with its declared hyperparameters."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} missing or registered twice")
    declare(cls.name, cls.hparams, RESERVED_NAMES)
    METHODS[cls.name] = cls
    return cls


def ensure_registered(classes) -> None:
    """Register methods defined outside kdray (a notebook, a test file) in a Ray worker process,
    where only kdray's own methods are registered at import; a name already known is kept."""
    for cls in classes:
        if cls.name not in METHODS:
            register(cls)


def unregister(name: str) -> None:
    """Forget method ``name`` and the hyperparameters no other method declares (a notebook
    redefining a method, a test cleaning up after itself)."""
    cls = METHODS.pop(name, None)
    if cls is None:
        return
    still = {p.name for other in METHODS.values() for p in other.hparams}
    for p in cls.hparams:
        if p.name not in still:
            HPARAMS.pop(p.name, None)


def methods_defined_outside_kdray() -> list[type[Method]]:
    """Registered methods a Ray worker cannot import from kdray itself. All of them travel with a
    run, not only the one it trains: every config carries every declared hyperparameter."""
    return [cls for cls in METHODS.values() if not cls.__module__.startswith("kdray.")]


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
