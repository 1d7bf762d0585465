"""Wrap torchvision classification models into :class:`StagedModel` without changing their math."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import KdrayError
from .staged import StagedModel

#: name prefixes of the torchvision families we know how to split into stages
TV_FAMILIES = ("resnet", "resnext", "wide_resnet", "mobilenet_v2", "mobilenet_v3",
               "efficientnet", "convnext", "regnet")
TV_FAMILIES_TEXT = ("resnet/resnext/wide_resnet, mobilenet_v2, mobilenet_v3_*, efficientnet*, "
                    "convnext*, regnet*")


def torchvision_names() -> list[str]:
    """All torchvision classification model names (empty if torchvision is missing)."""
    try:
        import torchvision.models as tvm
    except ImportError:  # pragma: no cover
        return []
    return sorted(tvm.list_models(module=tvm))


def supported(name: str) -> bool:
    return name.startswith(TV_FAMILIES)


@torch.no_grad()
def _probe_channels(stem: nn.Module, stages: list[nn.Module], size: int = 64) -> list[int]:
    """Channel count of each stage output, from one eval-mode forward of zeros (no RNG used)."""
    mods = [stem, *stages]
    was = [m.training for m in mods]
    for m in mods:
        m.eval()
    try:
        x = stem(torch.zeros(1, 3, size, size))
        chans = []
        for s in stages:
            x = s(x)
            chans.append(int(x.shape[1]))
    finally:
        for m, w in zip(mods, was):
            m.train(w)
    return chans


def _split_resnet(model: nn.Module, name: str):
    """ResNet/ResNeXt/Wide ResNet: conv-bn-relu-maxpool stem, layer1..layer4, pool-flatten-fc head."""
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    return stem, stages, head


def _split_regnet(model: nn.Module, name: str):
    """RegNet: its own stem, the blocks of ``trunk_output``, pool-flatten-fc head."""
    head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    return model.stem, list(model.trunk_output), head


def _split_features(model: nn.Module, name: str):
    """MobileNet/EfficientNet/ConvNeXt: ``features[0]`` is the stem, the rest are the stages."""
    feats = list(model.features)
    # mobilenet_v2 pools functionally (no avgpool module), so its head gets a fresh one
    pool = getattr(model, "avgpool", None)
    if pool is None:
        pool = nn.AdaptiveAvgPool2d((1, 1))
    if name.startswith("convnext"):  # convnext's classifier flattens itself
        head = nn.Sequential(pool, model.classifier)
    else:
        head = nn.Sequential(pool, nn.Flatten(1), model.classifier)
    return feats[0], feats[1:], head


#: (name prefixes, splitter) per family, tried in order; a splitter returns (stem, stages, head)
_FAMILY_SPLITTERS = (
    (("resnet", "resnext", "wide_resnet"), _split_resnet),
    (("regnet",), _split_regnet),
    (("mobilenet_v2", "mobilenet_v3", "efficientnet", "convnext"), _split_features),
)


def wrap_torchvision(model: nn.Module, name: str, num_classes: int) -> StagedModel:
    """Split a torchvision model into stem/stages/head, reusing its modules (same weights)."""
    for prefixes, split in _FAMILY_SPLITTERS:
        if name.startswith(prefixes):
            stem, stages, head = split(model, name)
            return StagedModel(stem, stages, head, _probe_channels(stem, stages), num_classes, name)
    raise KdrayError(
        f"torchvision model {name!r} is not supported (no stem/stages split known); "
        f"supported torchvision families: {TV_FAMILIES_TEXT}"
    )


def build_torchvision(name: str, num_classes: int) -> StagedModel:
    """Build ``name`` with ``weights=None`` (torchvision's own init) and wrap it."""
    import torchvision.models as tvm

    if not supported(name):
        wrap_torchvision(nn.Identity(), name, num_classes)  # raises the family error
    model = tvm.get_model(name, weights=None, num_classes=num_classes)
    return wrap_torchvision(model, name, num_classes)
