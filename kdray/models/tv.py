"""Wrap torchvision classification models into :class:`StagedModel` without changing their math."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdray.core.errors import KdrayError
from kdray.core.io import first_line
from kdray.models.staged import StagedModel

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
def probe_channels(stem: nn.Module, stages: list[nn.Module], size: int = 64) -> list[int]:
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
            return StagedModel(stem, stages, head, probe_channels(stem, stages), num_classes, name)
    raise _unsupported(name)


def _unsupported(name: str) -> KdrayError:
    return KdrayError(
        f"torchvision model {name!r} is not supported (no stem/stages split known); "
        f"supported torchvision families: {TV_FAMILIES_TEXT}"
    )


def _check_family(name: str) -> None:
    if name not in torchvision_names():
        raise KdrayError(f"{name!r} is not a torchvision classification model (e.g. resnet18, mobilenet_v3_small)")
    if not supported(name):
        raise _unsupported(name)


def build_torchvision(name: str, num_classes: int, weights: Optional[str] = None) -> StagedModel:
    """Build ``name`` and wrap it: torchvision's own init, or with ``weights`` (see
    :func:`load_torchvision_weights`) the pretrained weights, its classifier re-initialised when
    ``num_classes`` differs from the weights' classes."""
    _check_family(name)
    if weights is None:
        import torchvision.models as tvm

        model = tvm.get_model(name, weights=None, num_classes=num_classes)
    else:
        model, _ = load_torchvision_weights(name, weights, num_classes)
    return wrap_torchvision(model, name, num_classes)


# --- torchvision weights ------------------------------------------------------------------------
def resolve_weights(name: str, weights: str):
    """The weights enum member of model ``name`` called ``weights``: a full name
    ("ResNet18_Weights.IMAGENET1K_V1") or a member of the model's enum ("DEFAULT", "IMAGENET1K_V1")."""
    import torchvision.models as tvm

    _check_family(name)
    enum = tvm.get_model_weights(name)
    prefix, _, member = weights.rpartition(".")
    members = ", ".join(["DEFAULT", *enum.__members__])
    if prefix and prefix != enum.__name__:
        raise KdrayError(f"weights {weights!r} are not weights of {name!r}; "
                         f"allowed: {enum.__name__}.X with X in {members}")
    if member != "DEFAULT" and member not in enum.__members__:
        raise KdrayError(f"unknown weights {weights!r} for {name!r}; allowed: {members} (or {enum.__name__}.X)")
    return enum.DEFAULT if member == "DEFAULT" else enum[member]


def _download_state(weights) -> dict:
    """The weights' state dict from the torch hub cache, downloaded into it when missing; loaded
    tensors-only (torch.hub's default would unpickle arbitrary objects)."""
    import torch.hub

    try:
        return torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", check_hash=True,
                                                  weights_only=True)
    except OSError as exc:  # offline: urllib's URLError is an OSError
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise KdrayError(f"cannot get torchvision weights {weights} ({first_line(exc, 120)}); "
                         f"go online once or put {Path(weights.url).name} at {cached}") from None


def load_torchvision_weights(name: str, weights: str, num_classes: int) -> tuple[nn.Module, Optional[str]]:
    """Torchvision model ``name`` with pretrained ``weights`` and a ``num_classes``-way classifier:
    ``(model, re-initialised layer)``. When ``num_classes`` differs from the weights' classes, the
    last ``nn.Linear`` (resnet/regnet ``fc``, the others' ``classifier[-1]``) is replaced by a freshly
    initialised one, named in the second item (else None): such a model needs fine-tuning."""
    import torchvision.models as tvm

    member = resolve_weights(name, weights)
    weight_classes = len(member.meta["categories"])
    model = tvm.get_model(name, weights=None, num_classes=weight_classes)
    load_strict(model, _download_state(member), f"torchvision weights {member} for {name!r}")
    if num_classes == weight_classes:
        return model, None
    return model, replace_classifier(model, num_classes)


def replace_classifier(model: nn.Module, num_classes: int) -> str:
    """Swap the model's last ``nn.Linear`` for a fresh one with ``num_classes`` outputs; its name."""
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(last.in_features, num_classes, bias=last.bias is not None))
    return name


# --- state dicts: loaded strictly, torchvision's own keys into kdray's wrapper ------------------
def state_mismatch(model: nn.Module, state: dict, shown: int = 3) -> Optional[str]:
    """Why ``state`` does not load strictly into ``model`` (missing, unexpected, mis-shaped keys,
    the first few of each), or None when it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
              if k in state and hasattr(state[k], "shape") and state[k].shape != v.shape]
    parts = [f"{len(keys)} {what} ({', '.join(keys[:shown])}{', ...' if len(keys) > shown else ''})"
             for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("shape mismatches, file vs model", shapes)) if keys]
    return "; ".join(parts) or None


def load_strict(model: nn.Module, state: dict, what: str) -> None:
    """``model.load_state_dict(state)`` (strict), or a one-line KdrayError naming the first bad keys."""
    why = state_mismatch(model, state)
    if why:
        raise KdrayError(f"{what} do not fit: {why}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:  # e.g. a non-tensor value
        raise KdrayError(f"{what} do not load: {first_line(exc, 200)}") from None


def from_torchvision_state(name: str, state: dict, num_classes: int) -> StagedModel:
    """kdray's wrapper of torchvision ``name`` holding ``state``, a state dict with torchvision's
    own keys (``conv1.*``, ``layer1.*``, ``fc.*``, ...). The keys map by construction: ``state``
    loads strictly into the torchvision model, which is then split by the same code as
    ``build_model``; a state that does not fit is a one-line KdrayError naming the first bad keys."""
    import torchvision.models as tvm

    _check_family(name)
    model = tvm.get_model(name, weights=None, num_classes=num_classes)
    load_strict(model, state, f"weights for torchvision {name!r} ({num_classes} classes)")
    return wrap_torchvision(model, name, num_classes)


