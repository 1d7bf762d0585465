"""The staged model contract (stem -> stages -> head) and a hook-based feature tap."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from kdray.core.errors import KdrayError


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


def _name_list(names: list[str], limit: int = 30) -> str:
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")


class FeatureTap:
    """Capture the outputs of named submodules with forward hooks, without rewriting the model.

    ``tap.outputs[name]`` holds the latest output of ``dict(model.named_modules())[name]``
    (graph attached, so losses on it backpropagate). Use as a context manager or call
    ``remove()`` to detach the hooks.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        if isinstance(names, str):
            names = [names]
        modules = dict(model.named_modules())
        names = list(dict.fromkeys(names))
        bad = [n for n in names if n not in modules]
        if bad:
            valid = [n for n in modules if n]
            raise KdrayError(
                f"unknown module name(s) {', '.join(repr(b) for b in bad)} for a feature tap on "
                f"{type(model).__name__}; valid names: {_name_list(valid)}"
            )
        self.names = names
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.outputs[name] = output

        return hook

    def clear(self) -> None:
        """Forget captured outputs (frees their memory)."""
        self.outputs.clear()

    def remove(self) -> None:
        """Remove all hooks; captured outputs are kept until ``clear()``."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
