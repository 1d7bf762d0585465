"""Averaged multi-teacher KD: as ``kd``, the teacher side the mean of the K softened outputs;
see docs/methods.md."""

from kdray.distill.base import register
from kdray.distill.kd import KD
from kdray.distill.losses import soften


@register
class AvgKD(KD):
    name = "avg_kd"

    def teacher_probs(self, t_out):
        return soften(t_out["logits"], self.T).mean(0)
