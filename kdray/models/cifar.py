"""CIFAR-style ResNets (RepDistiller conventions) and pre-activation Wide ResNets."""

from __future__ import annotations

import torch
from torch import nn

from kdray.models.staged import StagedModel

# name -> (depth, [stem, stage1, stage2, stage3] channels)
CIFAR_RESNETS: dict[str, tuple[int, list[int]]] = {
    **{f"resnet{d}": (d, [16, 16, 32, 64]) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, [32, 64, 128, 256]),
    "resnet32x4": (32, [32, 64, 128, 256]),
}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus shortcut (1x1 conv + BN when the shape changes), then relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.downsample = nn.Sequential()  # identity, scriptable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class WideBasicBlock(nn.Module):
    """Pre-activation block: bn-relu-conv-bn-relu-conv; 1x1 conv shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.equal_in_out = cin == cout and stride == 1
        if self.equal_in_out:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        # as in Zagoruyko & Komodakis: a projecting shortcut sees the pre-activated input
        residual = x if self.equal_in_out else self.shortcut(act)
        return out + residual


def _init_layer(m: nn.Module) -> None:
    """He-normal convs, unit-scale zero-shift norms, zero Linear bias; other modules untouched."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)


def _init(model: nn.Module) -> nn.Module:
    # modules() order (not apply()'s children-first order): it fixes which conv draws which
    # random numbers, so the same seed keeps giving the same weights
    for m in model.modules():
        _init_layer(m)
    return model


def _head(channels: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes))


def cifar_resnet(name: str, num_classes: int) -> StagedModel:
    """Build one of ``CIFAR_RESNETS`` (n = (depth - 2) / 6 BasicBlocks per stage)."""
    depth, ch = CIFAR_RESNETS[name]
    n = (depth - 2) // 6
    stem = nn.Sequential(_conv3x3(3, ch[0]), nn.BatchNorm2d(ch[0]), nn.ReLU(inplace=True))
    stages, cin = [], ch[0]
    for cout, stride in zip(ch[1:], (1, 2, 2)):
        blocks = []
        for i in range(n):
            blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
            cin = cout
        stages.append(nn.Sequential(*blocks))
    model = StagedModel(stem, stages, _head(ch[-1], num_classes), ch[1:], num_classes, name)
    return _init(model)


def wide_resnet(depth: int, width: int, num_classes: int, name: str) -> StagedModel:
    """Pre-activation WRN-depth-width; the final BN+ReLU closes the last stage."""
    n = (depth - 4) // 6
    ch = [16, 16 * width, 32 * width, 64 * width]
    stem = _conv3x3(3, ch[0])
    stages, cin = [], ch[0]
    for cout, stride in zip(ch[1:], (1, 2, 2)):
        blocks: list[nn.Module] = []
        for i in range(n):
            blocks.append(WideBasicBlock(cin, cout, stride if i == 0 else 1))
            cin = cout
        stages.append(nn.Sequential(*blocks))
    stages[-1].append(nn.BatchNorm2d(ch[-1]))
    stages[-1].append(nn.ReLU(inplace=True))
    model = StagedModel(stem, stages, _head(ch[-1], num_classes), ch[1:], num_classes, name)
    return _init(model)
