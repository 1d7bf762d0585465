"""Baseline: cross-entropy on the labels only; see docs/methods.md."""

import torch.nn.functional as F

from kdray.distill.base import Method, register


@register
class CE(Method):
    name = "ce"
    min_teachers = 0

    def forward(self, y, s_out, t_out):
        return s_out["logits"], {"ce": F.cross_entropy(s_out["logits"], y)}
