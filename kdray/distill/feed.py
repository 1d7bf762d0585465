"""Parallel FEED (Park & Kwak 2019): one non-linear translator per teacher on the student's
last-stage feature map, each trained to reproduce its teacher's map. Translators are dropped
at export.

L = CE(y, z) + b sum_k FEED_k + a T^2 KL(s(mean_k t_k / T) || s(z / T)); see docs/methods.md.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kdray.distill.base import Method, register
from kdray.distill.hparams import ALPHA, TEMPERATURE, HParam
from kdray.distill.losses import feed_l1, kd_kl, match_spatial, soften


def translator(c_s: int, c_t: int) -> nn.Module:
    """NTL: conv3x3(Cs->Cs), LReLU, conv3x3(Cs->Ck), LReLU, conv3x3(Ck->Ck), LReLU."""
    return nn.Sequential(
        nn.Conv2d(c_s, c_s, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(c_s, c_t, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(c_t, c_t, 3, padding=1),
        nn.LeakyReLU(0.1),
    )


@register
class FEED(Method):
    name = "feed"
    default_alpha = 0.0
    uses_teacher_feats = True
    hparams = (TEMPERATURE, ALPHA, HParam("feed_weight", float, 500.0, "FEED weight b", low=0))

    def __init__(self, cfg, student, teachers):
        super().__init__(cfg, student, teachers)
        self.b = float(cfg.feed_weight)
        self.translators = nn.ModuleList(translator(student.feat_channels, c) for c in teachers.feat_channels)

    def forward(self, y, s_out, t_out):
        z = s_out["logits"]
        x_s = s_out["feats"][0]
        terms = {"ce": F.cross_entropy(z, y)}
        feed = []
        for k, ntl in enumerate(self.translators):
            s_f, t_f = match_spatial(ntl(x_s), t_out["feats"][k].detach())
            feed.append(feed_l1(s_f, t_f))
        terms["feed"] = self.b * torch.stack(feed).sum()
        if self.alpha > 0:
            terms["kd"] = self.alpha * kd_kl(z, soften(t_out["logits"].float().mean(0), self.T), self.T)
        return z, terms
