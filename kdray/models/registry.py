"""Architectures registered from Python (``register_model``), next to the built-in zoo.

Configs and manifests name an architecture; only Python code registers one, so reading a config
never runs code. A registered name builds through ``build_model`` like a built-in one: as a
student (single or EKD multi-branch), as a teacher, in teacher training and import.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Union

from torch import nn

from kdray.core.errors import KdrayError
from kdray.models.cifar import CIFAR_RESNETS
from kdray.models.staged import StagedModel
from kdray.models.tv import probe_channels, torchvision_names

#: what a builder may return: a StagedModel, or the (stem, stages, head) it is made of
Built = Union[StagedModel, tuple]
ModelBuilder = Callable[[int], Built]

MODELS: dict[str, ModelBuilder] = {}


def is_builtin(name: str) -> bool:
    """Whether ``build_model`` already routes ``name`` to a built-in family (CIFAR ResNets, every
    ``wrn*`` name, every torchvision classifier name, supported or not)."""
    return name in CIFAR_RESNETS or name.startswith("wrn") or name in torchvision_names()


def _check_new_name(name) -> None:
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise KdrayError(f"model name {name!r} is not allowed; use a non-empty name without surrounding spaces")
    if name in MODELS:
        raise KdrayError(f"model {name!r} is registered already; call unregister_model({name!r}) first to replace it")
    if is_builtin(name):
        # a name in a manifest or config must mean one architecture, whoever reads it
        raise KdrayError(f"model name {name!r} is taken by kdray's built-in architectures (CIFAR ResNets, wrn*, "
                         "torchvision models); register yours under another name")


def register_model(name: str, builder: Optional[ModelBuilder] = None):
    """Make ``builder`` buildable as ``name`` (a function call, or ``@register_model(name)``).

    ``builder(num_classes)`` must return a freshly initialised model on each call (EKD students
    build one per branch): either a :class:`StagedModel`, or a ``(stem, stages, head)`` triple that
    kdray wraps into one (the stage channels are probed with a 64x64 forward). A plain
    ``nn.Module`` is refused: training, EKD branches (split at ``split_stage``) and feature maps
    need the stem/stages/head split. Returns ``builder``, so it also works as a decorator.
    A duplicate name or a built-in name is a :class:`KdrayError`.
    """
    _check_new_name(name)  # at once, also in the decorator form
    if builder is None:
        return lambda fn: register_model(name, fn)
    if not callable(builder):
        raise KdrayError(f"builder for model {name!r} must be callable as builder(num_classes), got {builder!r}")
    MODELS[name] = builder
    return builder


def unregister_model(name: str) -> None:
    """Forget architecture ``name`` (a notebook redefining it, a test cleaning up); unknown: no-op."""
    MODELS.pop(name, None)


@contextlib.contextmanager
def registered_model(name: str, builder: ModelBuilder) -> Iterator[str]:
    """``with registered_model(name, builder):`` -- registered inside the block only (tests)."""
    register_model(name, builder)
    try:
        yield name
    finally:
        unregister_model(name)


def registered_models() -> list[str]:
    return sorted(MODELS)


def registered_builders() -> dict[str, ModelBuilder]:
    """Every registered name and its builder (what a Ray worker needs to build the same models)."""
    return dict(MODELS)


def ensure_models_registered(builders: dict) -> None:
    """Register, in a Ray worker process, architectures registered in the driver; a name already
    known here is kept."""
    for name, builder in (builders or {}).items():
        if name not in MODELS:
            MODELS[name] = builder


def build_registered(name: str, num_classes: int) -> StagedModel:
    """Build registered architecture ``name`` as a :class:`StagedModel` named ``name``."""
    return _as_staged(name, MODELS[name](num_classes), num_classes)


def _as_staged(name: str, built: Built, num_classes: int) -> StagedModel:
    triple = _triple(built)
    if isinstance(built, StagedModel):
        model = built
    elif triple is not None:
        stem, stages, head = triple
        model = StagedModel(stem, stages, head, probe_channels(stem, stages), num_classes, name)
    else:
        raise KdrayError(
            f"builder of model {name!r} returned {type(built).__name__}; it must return a StagedModel "
            "or a (stem, stages, head) tuple of modules (stages: a non-empty list of modules)"
        )
    if model.num_classes != num_classes:
        raise KdrayError(f"builder of model {name!r} made {model.num_classes} classes when asked for {num_classes}")
    model.arch = name  # the name that rebuilds it (student files, manifests)
    return model


def _triple(built) -> Optional[tuple]:
    """``(stem, [stages], head)`` when ``built`` is such a triple of modules, else None."""
    if not (isinstance(built, tuple) and len(built) == 3):
        return None
    stem, stages, head = built
    stages = list(stages) if isinstance(stages, (list, tuple, nn.ModuleList, nn.Sequential)) else []
    modules = [stem, *stages, head]
    if not stages or not all(isinstance(m, nn.Module) for m in modules):
        return None
    return stem, stages, head
