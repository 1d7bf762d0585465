"""EKD (Asif et al. 2019): a multi-branch student, branch b taught by teacher b mod K.

L_b = CE(y, z_b) + a_b T^2 KL(s(t_pair(b)/T) || s(z_b/T)) + g FeatLoss(adapter_b(F_b), F_pair(b))
L   = (1/B) sum_b L_b + d CE(y, z_ens) + e T^2 KL(s(mean_k t_k / T) || s(z_ens / T))
"""

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, register
from .hparams import ALPHA, BRANCHES, SPLIT_STAGE, TEMPERATURE, HParam
from .losses import kd_kl, match_spatial, normalized_mse, soften


def adapter(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


@register
class EKD(Method):
    name = "ekd"
    multi_branch = True
    hparams = (
        TEMPERATURE, ALPHA, BRANCHES, SPLIT_STAGE,
        HParam("branch_alpha", list, None, "one KD weight a_b per branch (default: alpha for every branch)",
               low=0, high=1, optional=True, per_branch=True),
        HParam("feat_weight", float, 0.0, "feature term weight g", low=0),
        HParam("ens_ce_weight", float, 1.0, "ensemble CE weight d", low=0),
        HParam("ens_kd_weight", float, 0.0, "ensemble KD weight e", low=0),
    )

    @classmethod
    def needs_teacher_feats(cls, cfg) -> bool:
        return float(cfg.feat_weight) > 0

    def __init__(self, cfg, student, teachers):
        super().__init__(cfg, student, teachers)
        self.B = int(student.num_branches)
        self.K = teachers.count
        self.pair = [b % self.K for b in range(self.B)]
        alphas = cfg.branch_alpha if cfg.branch_alpha is not None else [self.alpha] * self.B
        self.branch_alpha = [float(a) for a in alphas]
        self.g, self.d, self.e = float(cfg.feat_weight), float(cfg.ens_ce_weight), float(cfg.ens_kd_weight)
        self.uses_teacher_feats = self.needs_teacher_feats(cfg)
        if self.uses_teacher_feats:
            self.adapters = nn.ModuleList(
                adapter(student.feat_channels, teachers.feat_channels[k]) for k in self.pair
            )

    def forward(self, y, s_out, t_out):
        zb = s_out["branch_logits"]  # [B, N, C]
        t_logits = t_out["logits"]  # [K, N, C]
        t_probs = soften(t_logits, self.T)
        ce = torch.stack([F.cross_entropy(zb[b], y) for b in range(self.B)]).mean()
        terms = {"ce": ce}
        if any(a > 0 for a in self.branch_alpha):
            terms["kd"] = torch.stack(
                [self.branch_alpha[b] * kd_kl(zb[b], t_probs[self.pair[b]], self.T) for b in range(self.B)]
            ).mean()
        if self.uses_teacher_feats:
            feats = []
            for b in range(self.B):
                s_f, t_f = match_spatial(self.adapters[b](s_out["feats"][b]), t_out["feats"][self.pair[b]])
                feats.append(normalized_mse(s_f, t_f))
            terms["feat"] = self.g * torch.stack(feats).mean()
        z_ens = zb.mean(0)
        if self.d > 0:
            terms["ens_ce"] = self.d * F.cross_entropy(z_ens, y)
        if self.e > 0:
            terms["ens_kd"] = self.e * kd_kl(z_ens, soften(t_logits.float().mean(0), self.T), self.T)
        return z_ens, terms
