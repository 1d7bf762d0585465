"""The staged model contract every architecture meets: stem -> stages -> head, with the stage
outputs on request (the feature maps the students and feature-distilling methods read)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class StagedModel(nn.Module):
    """An image classifier split into ``stem``, a list of ``stages`` and a ``head``.

    ``head`` maps the last stage's feature map to logits. ``stage_channels[i]`` is the channel
    count of ``stages[i]``'s output; ``arch`` is the name the model was built from.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Iterable[nn.Module],
        head: nn.Module,
        stage_channels: list[int],
        num_classes: int,
        arch: str,
    ):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head
        if len(self.stages) == 0 or len(stage_channels) != len(self.stages):
            raise ValueError("StagedModel needs one channel count per stage and >= 1 stage")
        self.stage_channels = [int(c) for c in stage_channels]
        self.num_classes = int(num_classes)
        self.arch = str(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return ``(logits, [output of each stage])``."""
        feats: list[torch.Tensor] = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return self.head(x), feats

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, num_classes={self.num_classes}, "
            f"stage_channels={self.stage_channels}"
        )
