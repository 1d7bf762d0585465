"""Loss functions on plain tensors, tested against hand-computed values.

Conventions (see docs/methods.md): KL(p || q) with p the teacher side; the student side enters
``F.kl_div`` as log-probabilities; distillation terms carry the T^2 factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax at temperature T: s(t / T)."""
    return F.softmax(logits.float() / temperature, dim=-1)


def kd_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_probs || s(student_logits / T)), averaged over the batch."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(log_q, teacher_probs.float(), reduction="batchmean") * (temperature**2)


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the larger of two NCHW maps (by spatial area) down to the other's size."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if a.shape[-2] * a.shape[-1] > b.shape[-2] * b.shape[-1]:
        return F.adaptive_avg_pool2d(a, b.shape[-2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[-2:])


def normalize_flat(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Flatten each sample and scale it to unit L2 norm."""
    return F.normalize(x.float().flatten(1), p=2, dim=1, eps=eps)


def normalized_sq_dist(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """EKD FeatLoss: squared L2 distance of per-sample L2-normalised maps, averaged over the batch.

    Summed over a sample's elements (not averaged), so it lies in [0, 4] (= 2 - 2 cos) whatever the
    map's size; a mean over elements would divide it by C*H*W and make any sane weight a no-op.
    """
    return (normalize_flat(student_feat) - normalize_flat(teacher_feat)).pow(2).sum(1).mean()


def feed_l1(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """FEED term: mean over batch and elements of |normalize(x_T) - normalize(x_S)|."""
    return (normalize_flat(teacher_feat) - normalize_flat(student_feat)).abs().mean()
