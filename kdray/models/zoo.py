"""The architecture zoo: ``build_model`` (one entry point for CIFAR ResNets, Wide ResNets,
torchvision models and architectures registered with ``register_model``) and ``available_models``."""

from __future__ import annotations

import re

from kdray.core.errors import KdrayError
from kdray.models.cifar import CIFAR_RESNETS, cifar_resnet, wide_resnet
from kdray.models.registry import MODELS, build_registered, registered_models
from kdray.models.staged import StagedModel
from kdray.models.tv import build_torchvision, supported, torchvision_names

WRN_EXAMPLES = ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "wrn_28_10")
_WRN = re.compile(r"wrn_(\d+)_(\d+)")


def _unknown(name) -> KdrayError:
    registered = ", ".join(registered_models()) or "none so far"
    return KdrayError(
        f"unknown model {name!r}; allowed: {', '.join(CIFAR_RESNETS)}, wrn_D_K (e.g. wrn_16_2), "
        "a torchvision classification model (e.g. resnet18, mobilenet_v3_small), "
        f"or one registered with kdray.models.register_model (registered: {registered})"
    )


def available_models() -> list[str]:
    """CIFAR ResNets, example Wide ResNets, the supported torchvision models, then registered ones."""
    return [*CIFAR_RESNETS, *WRN_EXAMPLES, *(n for n in torchvision_names() if supported(n)),
            *registered_models()]


def build_model(name: str, num_classes: int) -> StagedModel:
    """Build a freshly initialised :class:`StagedModel` by name (see ``available_models``)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise KdrayError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not isinstance(name, str):
        raise _unknown(name)
    if name in MODELS:  # registered names never shadow the built-ins below (register_model checks)
        return build_registered(name, num_classes)
    if name in CIFAR_RESNETS:
        return cifar_resnet(name, num_classes)
    if name.startswith("wrn"):
        m = _WRN.fullmatch(name)
        if not m:
            raise KdrayError(
                f"bad wide resnet name {name!r}; "
                "expected wrn_D_K with integers D and K, e.g. wrn_16_2"
            )
        depth, width = int(m.group(1)), int(m.group(2))
        if depth < 10 or (depth - 4) % 6:
            raise KdrayError(
                f"bad wide resnet depth {depth} in {name!r}; depth D must satisfy (D - 4) % 6 == 0 "
                "and D >= 10 (e.g. 10, 16, 22, 28, 40)"
            )
        if width < 1:
            raise KdrayError(f"bad wide resnet width {width} in {name!r}; width K must be >= 1")
        return wide_resnet(depth, width, num_classes, name)
    if name in torchvision_names():
        return build_torchvision(name, num_classes)
    raise _unknown(name)
