"""Hinton KD: (1-a) CE(y, z) + a T^2 KL(s(t/T) || s(z/T)) with one teacher (the first);
see docs/methods.md."""

import torch.nn.functional as F

from kdray.distill.base import Method, register
from kdray.distill.hparams import ALPHA, TEMPERATURE
from kdray.distill.losses import kd_kl, soften


@register
class KD(Method):
    name = "kd"
    hparams = (TEMPERATURE, ALPHA)

    def teacher_probs(self, t_out):
        return soften(t_out["logits"][0], self.T)

    def forward(self, y, s_out, t_out):
        z = s_out["logits"]
        terms = {"ce": (1 - self.alpha) * F.cross_entropy(z, y)}
        if self.alpha > 0:
            terms["kd"] = self.alpha * kd_kl(z, self.teacher_probs(t_out), self.T)
        return z, terms
