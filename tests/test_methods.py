"""Tests for the distillation methods (kdray.distill) against docs/methods.md.

Expected values are computed independently here: logit losses in plain python (exp/log sums),
feature losses with explicit tensor arithmetic (manual conv/BN/pooling/normalisation).
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdray.core.errors import KdrayError
from kdray.distill import METHODS, Generation, Method, TeacherInfo, check_teacher_count, get_method, register
from kdray.distill.avg_kd import AvgKD
from kdray.distill.ce import CE
from kdray.distill.ekd import EKD
from kdray.distill.feed import FEED
from kdray.distill.kd import KD
from kdray.distill.losses import kd_kl, soften
from kdray.distill.sfeed import SFEED
from kdray.training.config import RunConfig

ALL = {"ce", "kd", "avg_kd", "ekd", "feed", "sfeed"}


# --- independent references ------------------------------------------------------------------


def py_softmax(row, T=1.0):
    m = max(row)
    ex = [math.exp((v - m) / T) for v in row]
    s = sum(ex)
    return [v / s for v in ex]


def py_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def py_ce(z, y):
    """Mean over rows of -log softmax(z)[y]."""
    z, y = z.tolist(), y.tolist()
    out = 0.0
    for row, label in zip(z, y):
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        out += lse - row[label]
    return out / len(z)


def py_kd(z, p_rows, T):
    """T^2 * mean_n KL(p_n || softmax(z_n / T)); p_rows: list of probability rows."""
    z = z.tolist()
    return T * T * sum(py_kl(p, py_softmax(r, T)) for p, r in zip(p_rows, z)) / len(z)


def py_soft_rows(logits, T):
    return [py_softmax(r, T) for r in logits.tolist()]


def py_mean_rows(rows_list):
    k = len(rows_list)
    return [[sum(rs[n][c] for rs in rows_list) / k for c in range(len(rows_list[0][0]))]
            for n in range(len(rows_list[0]))]


def pool_to(x, hw):
    """Adaptive average pooling by block means (integer ratios only)."""
    n, c, h, w = x.shape
    th, tw = hw
    if (h, w) == (th, tw):
        return x
    return x.reshape(n, c, th, h // th, tw, w // tw).mean(dim=(3, 5))


def ref_norm(x):
    flat = x.reshape(x.shape[0], -1)
    return flat / flat.pow(2).sum(1, keepdim=True).sqrt()


def ref_match(s, t):
    if s.shape[-2] * s.shape[-1] > t.shape[-2] * t.shape[-1]:
        return pool_to(s, t.shape[-2:]), t
    return s, pool_to(t, s.shape[-2:])


def cfg_for(**kw):
    return RunConfig().replace(**kw)


def student_ns(branches=1, feat_channels=4):
    return SimpleNamespace(num_branches=branches, feat_channels=feat_channels)


# --- registry --------------------------------------------------------------------------------


def test_registry_has_all_six():
    # other tests register methods of their own; kdray's are the ones defined in kdray
    assert {name for name, cls in METHODS.items() if cls.__module__.startswith("kdray.")} == ALL
    for name in ALL:
        cls = get_method(name)
        assert cls is METHODS[name] and cls.name == name and issubclass(cls, Method)
    assert (get_method("ce"), get_method("kd"), get_method("avg_kd")) == (CE, KD, AvgKD)
    assert (get_method("ekd"), get_method("feed"), get_method("sfeed")) == (EKD, FEED, SFEED)


def test_unknown_method_lists_allowed():
    with pytest.raises(KdrayError) as ei:
        get_method("fitnet")
    msg = str(ei.value)
    assert "fitnet" in msg and "allowed" in msg
    for name in ALL:
        assert name in msg
    assert "\n" not in msg


def test_register_rejects_duplicates_and_missing_name():
    class Dup(Method):
        name = "ce"

    class NoName(Method):
        pass

    before = dict(METHODS)
    with pytest.raises(ValueError):
        register(Dup)
    with pytest.raises(ValueError):
        register(NoName)
    assert METHODS == before


def test_check_teacher_count():
    check_teacher_count(get_method("ce"), 0)
    for name in ("kd", "avg_kd", "ekd", "feed", "sfeed"):
        check_teacher_count(get_method(name), 1)
        with pytest.raises(KdrayError) as ei:
            check_teacher_count(get_method(name), 0)
        assert repr(name) in str(ei.value) and "at least 1" in str(ei.value)


def test_flags_and_defaults():
    assert EKD.multi_branch and not KD.multi_branch and not FEED.multi_branch
    info = TeacherInfo(count=2, feat_channels=(5, 7))
    assert KD(RunConfig(), student_ns(), info).alpha == 0.9
    assert AvgKD(RunConfig(), student_ns(), info).alpha == 0.9
    assert EKD(RunConfig(), student_ns(3), info).alpha == 0.9
    assert FEED(RunConfig(), student_ns(), info).alpha == 0.0
    assert KD(RunConfig(), student_ns(), info).T == 4.0
    assert KD(cfg_for(alpha=0.25, temperature=2.0), student_ns(), info).alpha == 0.25
    assert FEED(RunConfig(), student_ns(), info).b == 500.0
    assert FEED(RunConfig(), student_ns(), info).uses_teacher_feats


# --- ce / kd / avg_kd ------------------------------------------------------------------------


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, generator=g) * 2
    t = torch.randn(2, 4, 3, generator=g) * 3  # K=2 teachers
    y = torch.tensor([0, 2, 1, 2])
    return y, z, t


def test_ce_is_cross_entropy(batch):
    y, z, _ = batch
    m = CE(RunConfig(), student_ns(), None)
    logits, terms = m(y, {"logits": z}, None)
    assert logits is z
    assert set(terms) == {"ce"}
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(py_ce(z, y), rel=1e-5)


def test_kd_terms_use_first_teacher(batch):
    y, z, t = batch
    a, T = 0.7, 3.0
    m = KD(cfg_for(alpha=a, temperature=T), student_ns(), TeacherInfo(2, (5, 7)))
    logits, terms = m(y, {"logits": z}, {"logits": t, "feats": []})
    assert logits is z and set(terms) == {"ce", "kd"}
    assert terms["ce"].item() == pytest.approx((1 - a) * py_ce(z, y), rel=1e-5)
    want = a * py_kd(z, py_soft_rows(t[0], T), T)
    other = a * py_kd(z, py_soft_rows(t[1], T), T)
    assert abs(want - other) > 1e-2  # the check below tells the teachers apart
    assert terms["kd"].item() == pytest.approx(want, rel=1e-5)


def test_kd_alpha_zero_drops_kd_term(batch):
    y, z, t = batch
    m = KD(cfg_for(alpha=0.0), student_ns(), TeacherInfo(2, (5, 7)))
    _, terms = m(y, {"logits": z}, {"logits": t, "feats": []})
    assert set(terms) == {"ce"}
    assert terms["ce"].item() == pytest.approx(py_ce(z, y), rel=1e-5)


def test_avg_kd_uses_mean_of_softened_probs(batch):
    y, z, t = batch
    a, T = 0.9, 2.0
    m = AvgKD(cfg_for(temperature=T), student_ns(), TeacherInfo(2, (5, 7)))
    _, terms = m(y, {"logits": z}, {"logits": t, "feats": []})
    mean_probs = py_mean_rows([py_soft_rows(t[0], T), py_soft_rows(t[1], T)])
    soft_mean = py_soft_rows((t[0] + t[1]) / 2, T)
    want = a * py_kd(z, mean_probs, T)
    assert abs(want - a * py_kd(z, soft_mean, T)) > 1e-2
    assert terms["kd"].item() == pytest.approx(want, rel=1e-5)
    assert terms["ce"].item() == pytest.approx((1 - a) * py_ce(z, y), rel=1e-5)


# --- ekd -------------------------------------------------------------------------------------


def ekd_data(B=3, K=2, N=2, C=3, cs=4, tch=(5, 7), seed=1, s_hw=4, t_hw=(2, 8)):
    g = torch.Generator().manual_seed(seed)
    zb = torch.randn(B, N, C, generator=g) * 2
    t = torch.randn(K, N, C, generator=g) * 3
    y = torch.randint(0, C, (N,), generator=g)
    s_feats = [torch.randn(N, cs, s_hw, s_hw, generator=g) for _ in range(B)]
    t_feats = [torch.randn(N, tch[k], t_hw[k], t_hw[k], generator=g) for k in range(K)]
    return y, zb, t, s_feats, t_feats


def test_ekd_pairing_b_mod_k():
    # B=3, K=2 (B > K) -> teachers {0}, {1}, {0}. Branch logits copy their teacher, so the KD term
    # is exactly 0 with the right pairing and clearly positive with any other.
    y, _, t, _, _ = ekd_data()
    m = EKD(cfg_for(alpha=1.0, ens_ce_weight=0.0), student_ns(3), TeacherInfo(2, (5, 7)))
    assert m.teacher_sets == [[0], [1], [0]]
    zb = torch.stack([t[0], t[1], t[0]])
    logits, terms = m(y, {"branch_logits": zb, "logits": zb.mean(0), "feats": []}, {"logits": t, "feats": []})
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-6)
    T = 4.0
    wrong = sum(py_kd(zb[b], py_soft_rows(t[k], T), T) for b, k in enumerate([0, 0, 0]))
    assert wrong > 1e-2
    # and with other logits the value follows the same pairing
    zb2 = torch.stack([t[1], t[0], t[1]])
    _, terms2 = m(y, {"branch_logits": zb2, "feats": []}, {"logits": t, "feats": []})
    want = sum(py_kd(zb2[b], py_soft_rows(t[k], T), T) for b, k in enumerate([0, 1, 0]))
    assert terms2["kd"].item() == pytest.approx(want, rel=1e-5)


def test_ekd_teacher_sets_every_teacher_teaches():
    # docs/methods.md (revised 2026-11-29): P(b) = {k : k mod B == b} for B <= K, {b mod K} for B > K
    assert EKD(cfg_for(branches=2), student_ns(2), TeacherInfo(3, (4, 4, 4))).teacher_sets == [[0, 2], [1]]
    assert EKD(cfg_for(branches=1), student_ns(1), TeacherInfo(3, (4, 4, 4))).teacher_sets == [[0, 1, 2]]
    assert EKD(cfg_for(branches=2), student_ns(2), TeacherInfo(5, (4,) * 5)).teacher_sets == [[0, 2, 4], [1, 3]]
    assert EKD(cfg_for(branches=3), student_ns(3), TeacherInfo(3, (4, 4, 4))).teacher_sets == [[0], [1], [2]]
    assert EKD(cfg_for(branches=5), student_ns(5), TeacherInfo(2, (4, 4))).teacher_sets == [[0], [1], [0], [1], [0]]
    for B in range(1, 9):
        for K in range(1, 6):
            sets = EKD(cfg_for(branches=B), student_ns(B), TeacherInfo(K, (4,) * K)).teacher_sets
            assert sorted({k for ks in sets for k in ks}) == list(range(K)), (B, K)


def test_ekd_golden_fewer_branches_than_teachers():
    # B=2, K=3: branch 0 learns from the mean of teachers 0 and 2's softened outputs, branch 1
    # from teacher 1. Hand computation at T=1, one sample, two classes, both branches' logits [0, 0]
    # (q = [1/2, 1/2]):
    #   teacher 0 [0, ln 3] -> [1/4, 3/4]; teacher 2 [ln 3, 0] -> [3/4, 1/4]; p_0 = [1/2, 1/2] -> KL 0
    #   teacher 1 [ln3/2, 0] -> p_1 = [r3/(r3+1), 1/(r3+1)] with r3 = sqrt 3
    ln3 = math.log(3.0)
    t = torch.tensor([[[0.0, ln3]], [[ln3 / 2, 0.0]], [[ln3, 0.0]]])  # K=3, N=1, C=2
    zb = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]])  # B=2
    y = torch.tensor([0])
    m = EKD(cfg_for(alpha=1.0, temperature=1.0, ens_ce_weight=0.0), student_ns(2), TeacherInfo(3, (4, 4, 4)))
    _, terms = m(y, {"branch_logits": zb, "feats": []}, {"logits": t, "feats": []})
    r3 = math.sqrt(3.0)
    p1 = [r3 / (r3 + 1), 1 / (r3 + 1)]
    kl1 = sum(p * math.log(p / 0.5) for p in p1)
    assert terms["kd"].item() == pytest.approx(0.0 + kl1, rel=1e-5)
    # the old pairing (branch b <- teacher b) would have given branch 0 KL(s([0, ln3]) || q) > 0
    old0 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert abs(terms["kd"].item() - (old0 + kl1)) > 0.05
    # p_b is a mean of probabilities, not the softmax of mean logits: they coincide above, so take
    # teachers 0 and 2 where they differ
    t2 = torch.tensor([[[0.0, 2.0]], [[0.0, 0.0]], [[1.0, 0.0]]])
    _, terms2 = m(y, {"branch_logits": zb, "feats": []}, {"logits": t2, "feats": []})
    soft = [py_softmax([0.0, 2.0]), py_softmax([1.0, 0.0])]
    p0 = [(soft[0][c] + soft[1][c]) / 2 for c in range(2)]
    want = py_kl(p0, [0.5, 0.5]) + 0.0
    p0_logits = py_softmax([0.5, 1.0])
    assert abs(py_kl(p0_logits, [0.5, 0.5]) - py_kl(p0, [0.5, 0.5])) > 1e-3
    assert terms2["kd"].item() == pytest.approx(want, rel=1e-5)


def test_ekd_branch_alpha_per_branch():
    y, zb, t, _, _ = ekd_data()
    alphas, T = [0.2, 0.0, 1.0], 2.0
    m = EKD(cfg_for(branch_alpha=alphas, temperature=T), student_ns(3), TeacherInfo(2, (5, 7)))
    _, terms = m(y, {"branch_logits": zb, "feats": []}, {"logits": t, "feats": []})
    kls = [py_kd(zb[b], py_soft_rows(t[b % 2], T), T) for b in range(3)]
    want = sum(a * k for a, k in zip(alphas, kls))
    swapped = sum(a * k for a, k in zip(alphas[::-1], kls))
    assert abs(want - swapped) > 1e-2
    assert terms["kd"].item() == pytest.approx(want, rel=1e-5)
    # CE of every branch, summed; unscaled by alpha (L_b = CE + a KL)
    assert terms["ce"].item() == pytest.approx(sum(py_ce(zb[b], y) for b in range(3)), rel=1e-5)
    m0 = EKD(cfg_for(branch_alpha=[0, 0, 0]), student_ns(3), TeacherInfo(2, (5, 7)))
    _, terms0 = m0(y, {"branch_logits": zb, "feats": []}, {"logits": t, "feats": []})
    assert "kd" not in terms0


def test_ekd_ensemble_ce_on_mean_branch_logits():
    y, zb, t, _, _ = ekd_data()
    d = 0.6
    m = EKD(cfg_for(ens_ce_weight=d), student_ns(3), TeacherInfo(2, (5, 7)))
    logits, terms = m(y, {"branch_logits": zb, "feats": []}, {"logits": t, "feats": []})
    z_ens = (zb[0] + zb[1] + zb[2]) / 3
    assert torch.allclose(logits, z_ens, atol=1e-6)
    assert terms["ens_ce"].item() == pytest.approx(d * py_ce(z_ens, y), rel=1e-5)
    assert "ens_kd" not in terms  # e defaults to 0
    m0 = EKD(cfg_for(ens_ce_weight=0.0), student_ns(3), TeacherInfo(2, (5, 7)))
    _, terms0 = m0(y, {"branch_logits": zb, "feats": []}, {"logits": t, "feats": []})
    assert "ens_ce" not in terms0


def test_ekd_ensemble_kd_uses_softened_mean_teacher_logits():
    y, zb, t, _, _ = ekd_data()
    e, T = 0.4, 3.0
    m = EKD(cfg_for(ens_kd_weight=e, temperature=T), student_ns(3), TeacherInfo(2, (5, 7)))
    _, terms = m(y, {"branch_logits": zb, "feats": []}, {"logits": t, "feats": []})
    z_ens = zb.mean(0)
    want = e * py_kd(z_ens, py_soft_rows((t[0] + t[1]) / 2, T), T)
    avg_probs = e * py_kd(z_ens, py_mean_rows([py_soft_rows(t[0], T), py_soft_rows(t[1], T)]), T)
    assert abs(want - avg_probs) > 1e-2
    assert terms["ens_kd"].item() == pytest.approx(want, rel=1e-5)


def test_ekd_no_adapters_when_g_zero():
    m = EKD(RunConfig(), student_ns(3), TeacherInfo(2, (5, 7)))
    assert not m.uses_teacher_feats
    assert not hasattr(m, "adapters")
    assert list(m.parameters()) == []
    y, zb, t, _, _ = ekd_data()
    _, terms = m(y, {"branch_logits": zb, "feats": []}, {"logits": t, "feats": []})
    assert set(terms) == {"ce", "kd", "ens_ce"}


def test_ekd_adapters_when_g_positive():
    m = EKD(cfg_for(feat_weight=0.5), student_ns(3, feat_channels=4), TeacherInfo(2, (5, 7)))
    assert m.uses_teacher_feats
    assert len(m.adapters) == 3
    for b, want_c in enumerate([5, 7, 5]):  # channels of teacher b mod 2 (B > K: one teacher each)
        assert len(m.adapters[b]) == 1
        ad = m.adapters[b][0]
        convs = [x for x in ad.modules() if isinstance(x, nn.Conv2d)]
        bns = [x for x in ad.modules() if isinstance(x, nn.BatchNorm2d)]
        assert len(convs) == 1 and len(bns) == 1
        conv = convs[0]
        assert conv.in_channels == 4 and conv.out_channels == want_c and conv.kernel_size == (1, 1)
        assert bns[0].num_features == want_c
    assert [type(x) for x in m.adapters[0][0]] == [nn.Conv2d, nn.BatchNorm2d]


def ref_adapter(ad, x):
    """conv1x1 then BatchNorm in training mode, written out."""
    conv, bn = ad[0], ad[1]
    out = torch.einsum("nchw,oc->nohw", x, conv.weight[:, :, 0, 0])
    if conv.bias is not None:
        out = out + conv.bias.view(1, -1, 1, 1)
    mean = out.mean(dim=(0, 2, 3), keepdim=True)
    var = (out - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
    out = (out - mean) / torch.sqrt(var + bn.eps)
    return out * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def ref_feat_losses(m, s_feats, t_feats, sets):
    """Per branch: mean over its teachers of sum-over-elements squared distance, batch-averaged."""
    out = []
    for b, ks in enumerate(sets):
        per_teacher = []
        for j, k in enumerate(ks):
            s, tt = ref_match(ref_adapter(m.adapters[b][j], s_feats[b]), t_feats[k])
            per_teacher.append((ref_norm(s) - ref_norm(tt)).pow(2).sum(1).mean().item())
        out.append(sum(per_teacher) / len(per_teacher))
    return out


def make_ekd_full(g=0.5, a=0.7, T=3.0, d=0.8, e=0.3, mean_branch_losses=False):
    torch.manual_seed(0)
    m = EKD(cfg_for(feat_weight=g, alpha=a, temperature=T, ens_ce_weight=d, ens_kd_weight=e,
                    mean_branch_losses=mean_branch_losses),
            student_ns(3, feat_channels=4), TeacherInfo(2, (5, 7)))
    with torch.no_grad():  # non-trivial BN affine parameters
        for ads in m.adapters:
            for ad in ads:
                ad[1].weight.uniform_(0.5, 1.5)
                ad[1].bias.uniform_(-0.5, 0.5)
    m.train()
    return m


def test_ekd_feat_term_value():
    # teacher 0 maps are 2x2 (student's adapted 4x4 is pooled), teacher 1 maps are 8x8 (pooled to 4x4)
    y, zb, t, s_feats, t_feats = ekd_data()
    g = 0.5
    m = make_ekd_full(g=g)
    _, terms = m(y, {"branch_logits": zb, "feats": s_feats}, {"logits": t, "feats": t_feats})
    want = g * sum(ref_feat_losses(m, s_feats, t_feats, [[0], [1], [0]]))
    assert terms["feat"].item() == pytest.approx(want, rel=1e-4)


def test_ekd_total_matches_independent_formula():
    a, T, g, d, e = 0.7, 3.0, 0.5, 0.8, 0.3
    y, zb, t, s_feats, t_feats = ekd_data()
    m = make_ekd_full(g=g, a=a, T=T, d=d, e=e)
    logits, terms = m(y, {"branch_logits": zb, "feats": s_feats}, {"logits": t, "feats": t_feats})
    assert set(terms) == {"ce", "kd", "feat", "ens_ce", "ens_kd"}
    feats = ref_feat_losses(m, s_feats, t_feats, [[0], [1], [0]])
    L = [py_ce(zb[b], y) + a * py_kd(zb[b], py_soft_rows(t[b % 2], T), T) + g * feats[b] for b in range(3)]
    z_ens = zb.mean(0)
    ens = d * py_ce(z_ens, y) + e * py_kd(z_ens, py_soft_rows(t.mean(0), T), T)
    want = sum(L) + ens
    assert sum(v.item() for v in terms.values()) == pytest.approx(want, rel=1e-4)
    # mean_branch_losses: the 2026-11-29 spec's (1/B) sum_b L_b + the same ensemble loss
    m_mean = make_ekd_full(g=g, a=a, T=T, d=d, e=e, mean_branch_losses=True)
    _, terms_mean = m_mean(y, {"branch_logits": zb, "feats": s_feats}, {"logits": t, "feats": t_feats})
    assert sum(v.item() for v in terms_mean.values()) == pytest.approx(sum(L) / 3 + ens, rel=1e-4)
    assert abs(sum(L) / 3 - sum(L)) > 1.0


def test_ekd_feat_term_several_teachers_per_branch():
    # B=2, K=3 with three different channel counts and map sizes: branch 0 has teachers 0 and 2
    # (two adapters), branch 1 teacher 1; each branch's term is the mean over its teachers.
    g = 0.3
    torch.manual_seed(0)
    m = EKD(cfg_for(feat_weight=g, branches=2), student_ns(2, feat_channels=4), TeacherInfo(3, (5, 7, 6)))
    assert [[ad[0].out_channels for ad in ads] for ads in m.adapters] == [[5, 6], [7]]
    m.train()
    gen = torch.Generator().manual_seed(3)
    y = torch.tensor([0, 2])
    zb = torch.randn(2, 2, 3, generator=gen)
    t = torch.randn(3, 2, 3, generator=gen)
    s_feats = [torch.randn(2, 4, 4, 4, generator=gen) for _ in range(2)]
    t_feats = [torch.randn(2, c, hw, hw, generator=gen) for c, hw in ((5, 2), (7, 8), (6, 4))]
    _, terms = m(y, {"branch_logits": zb, "feats": s_feats}, {"logits": t, "feats": t_feats})
    per_branch = ref_feat_losses(m, s_feats, t_feats, [[0, 2], [1]])
    assert terms["feat"].item() == pytest.approx(g * sum(per_branch), rel=1e-4)
    # per-sample sums, not element means: random maps are about orthogonal, so each term is near 2
    assert all(1.0 < v < 3.0 for v in per_branch)


def test_ekd_gradients_flow():
    y, zb, t, s_feats, t_feats = ekd_data()
    m = make_ekd_full()
    zb.requires_grad_(True)
    for f in s_feats:
        f.requires_grad_(True)
    _, terms = m(y, {"branch_logits": zb, "feats": s_feats}, {"logits": t, "feats": t_feats})
    sum(terms.values()).backward()
    assert zb.grad is not None and all(zb.grad[b].abs().sum() > 0 for b in range(3))
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in s_feats)
    for p in m.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_ekd_branch_gets_a_lone_students_gradient():
    # With the ensemble terms off, branch b's logits get exactly the gradient of a single student
    # trained on L_b (kd with b's teacher); the spec's averaged form gave it 1/B of that.
    y, zb, t, _, _ = ekd_data()
    a, T = 0.7, 3.0
    for mean, scale in ((False, 1.0), (True, 1 / 3)):
        m = EKD(cfg_for(alpha=a, temperature=T, ens_ce_weight=0.0, mean_branch_losses=mean),
                student_ns(3), TeacherInfo(2, (5, 7)))
        z = zb.clone().requires_grad_(True)
        _, terms = m(y, {"branch_logits": z, "feats": []}, {"logits": t, "feats": []})
        sum(terms.values()).backward()
        for b in range(3):
            lone = zb[b].clone().requires_grad_(True)
            (F.cross_entropy(lone, y) + a * kd_kl(lone, soften(t[b % 2], T), T)).backward()
            assert torch.allclose(z.grad[b], scale * lone.grad, atol=1e-6), (mean, b)


# --- feed / sfeed ----------------------------------------------------------------------------


def feed_data(N=2, C=3, cs=3, tch=(4, 2), s_hw=4, t_hw=(2, 8), seed=2):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=g) * 2
    t = torch.randn(len(tch), N, C, generator=g) * 3
    y = torch.randint(0, C, (N,), generator=g)
    x_s = torch.randn(N, cs, s_hw, s_hw, generator=g)
    t_feats = [torch.randn(N, c, h, h, generator=g) for c, h in zip(tch, t_hw)]
    return y, z, t, x_s, t_feats


def test_feed_translator_structure():
    m = FEED(RunConfig(), student_ns(feat_channels=3), TeacherInfo(2, (4, 2)))
    assert len(m.translators) == 2
    for ntl, ck in zip(m.translators, (4, 2)):
        layers = list(ntl)
        assert [type(x) for x in layers] == [nn.Conv2d, nn.LeakyReLU] * 3
        convs = layers[0::2]
        assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 3), (3, ck), (ck, ck)]
        for c in convs:
            assert c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1)
        for act in layers[1::2]:
            assert act.negative_slope == pytest.approx(0.1)


def ref_translate(ntl, x):
    convs = [c for c in ntl if isinstance(c, nn.Conv2d)]
    for c in convs:
        x = F.leaky_relu(F.conv2d(x, c.weight, c.bias, stride=1, padding=1), 0.1)
    return x


def ref_feed_sum(m, x_s, t_feats):
    total = 0.0
    for ntl, tf in zip(m.translators, t_feats):
        s, tt = ref_match(ref_translate(ntl, x_s), tf)
        total += (ref_norm(tt) - ref_norm(s)).abs().mean().item()
    return total


def test_feed_term_value_and_no_kd_by_default():
    y, z, t, x_s, t_feats = feed_data()
    b = 2.0
    torch.manual_seed(0)
    m = FEED(cfg_for(method="feed", feed_weight=b), student_ns(feat_channels=3), TeacherInfo(2, (4, 2)))
    logits, terms = m(y, {"logits": z, "feats": [x_s]}, {"logits": t, "feats": t_feats})
    assert logits is z
    assert set(terms) == {"ce", "feed"}  # alpha defaults to 0
    assert terms["ce"].item() == pytest.approx(py_ce(z, y), rel=1e-5)
    per_k = []
    for ntl, tf in zip(m.translators, t_feats):
        s, tt = ref_match(ref_translate(ntl, x_s), tf)
        per_k.append((ref_norm(tt) - ref_norm(s)).abs().mean().item())
    assert terms["feed"].item() == pytest.approx(b * sum(per_k), rel=1e-4)


def test_feed_default_weight_500():
    y, z, t, x_s, t_feats = feed_data()
    m = FEED(RunConfig(), student_ns(feat_channels=3), TeacherInfo(2, (4, 2)))
    _, terms = m(y, {"logits": z, "feats": [x_s]}, {"logits": t, "feats": t_feats})
    assert terms["feed"].item() == pytest.approx(500.0 * ref_feed_sum(m, x_s, t_feats), rel=1e-4)


def test_feed_alpha_adds_kd_on_mean_teacher_logits():
    y, z, t, x_s, t_feats = feed_data()
    a, T = 0.5, 2.0
    m = FEED(cfg_for(alpha=a, temperature=T, feed_weight=1.0), student_ns(feat_channels=3), TeacherInfo(2, (4, 2)))
    _, terms = m(y, {"logits": z, "feats": [x_s]}, {"logits": t, "feats": t_feats})
    assert set(terms) == {"ce", "feed", "kd"}
    assert terms["ce"].item() == pytest.approx(py_ce(z, y), rel=1e-5)  # CE not scaled by (1-a)
    want = a * py_kd(z, py_soft_rows(t.mean(0), T), T)
    other = a * py_kd(z, py_mean_rows([py_soft_rows(t[0], T), py_soft_rows(t[1], T)]), T)
    assert abs(want - other) > 1e-3
    assert terms["kd"].item() == pytest.approx(want, rel=1e-5)


def test_feed_gradients_and_detached_teacher_feats():
    y, z, t, x_s, t_feats = feed_data()
    m = FEED(cfg_for(alpha=0.5), student_ns(feat_channels=3), TeacherInfo(2, (4, 2)))
    z.requires_grad_(True)
    x_s.requires_grad_(True)
    for f in t_feats:
        f.requires_grad_(True)
    _, terms = m(y, {"logits": z, "feats": [x_s]}, {"logits": t, "feats": t_feats})
    sum(terms.values()).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert x_s.grad is not None and x_s.grad.abs().sum() > 0
    assert all(f.grad is None for f in t_feats)
    for p in m.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_sfeed_generations():
    gens = SFEED.generations(cfg_for(generations=3))
    assert gens == [Generation(0, "ensemble"), Generation(1, "previous"), Generation(2, "previous")]
    assert [g.index for g in SFEED.generations(RunConfig())] == [0, 1]  # default 2
    assert SFEED.generations(cfg_for(generations=1)) == [Generation(0, "ensemble")]
    for cls in (CE, KD, AvgKD, EKD, FEED):
        assert cls.generations(RunConfig()) == [Generation(0)]


def test_sfeed_is_parallel_feed_per_generation():
    y, z, t, x_s, t_feats = feed_data(tch=(4,), t_hw=(4,))
    assert issubclass(SFEED, FEED)
    m = SFEED(cfg_for(feed_weight=3.0), student_ns(feat_channels=3), TeacherInfo(1, (4,)))
    _, terms = m(y, {"logits": z, "feats": [x_s]}, {"logits": t, "feats": t_feats})
    assert len(m.translators) == 1
    assert terms["feed"].item() == pytest.approx(3.0 * ref_feed_sum(m, x_s, t_feats), rel=1e-4)


def test_generation_numbers_its_view_epochs_and_seeds_apart():
    assert [Generation(g).view_epoch(e) for g in (0, 2) for e in (0, 3)] == [0, 3, 2000, 2003]
    assert [Generation(g).seed(7) for g in (0, 1, 2)] == [7, 1007, 2007]


def test_the_run_trains_on_the_view_epochs_the_teacher_store_holds(monkeypatch, tmp_path, fake_teachers):
    """The store is keyed by teacher_view_epochs; fit draws each epoch's views by set_epoch. Both take
    the numbers from Generation.view_epoch: every epoch the ensemble teaches in is one the store holds,
    in generations after the first too."""
    from conftest import small_cfg

    from kdray.data.loader import BatchLoader
    from kdray.distill import unregister
    from kdray.teachers.source import teacher_view_epochs
    from kdray.training.fit import fit

    @register
    class TwoTaught(KD):  # generations 0 and 1 taught by the ensemble, 2 by generation 1's student
        name = "test_two_taught"

        @classmethod
        def generations(cls, cfg):
            return [Generation(0), Generation(1), Generation(2, "previous")]

    seen = []
    set_epoch = BatchLoader.set_epoch
    monkeypatch.setattr(BatchLoader, "set_epoch", lambda self, e: (seen.append(e), set_epoch(self, e)))
    try:
        cfg = small_cfg(method="test_two_taught", epochs=2, teachers=str(fake_teachers))
        fit(cfg, checkpoint_root=str(tmp_path), log=lambda s: None)
        assert seen[:4] == list(teacher_view_epochs(cfg)) == [0, 1, 1000, 1001]
        assert seen[4:] == [2000, 2001]  # taught by the previous student: not the store's
    finally:
        unregister("test_two_taught")
