"""Tests for kdray.distill.losses against values computed by hand (plain python math).

Every golden value below is written out from exp/log sums on 2-3 element vectors; nothing here
calls torch.softmax or F.kl_div to produce an expected value.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from kdray.distill.losses import feed_l1, kd_kl, match_spatial, normalize_flat, normalized_sq_dist, soften


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# --- soften ----------------------------------------------------------------------------------


def test_soften_at_temperature_by_hand():
    # s([1, 2, 3] / 2) = [e^0.5, e^1, e^1.5] / (e^0.5 + e^1 + e^1.5)
    a, b, c = math.exp(0.5), math.exp(1.0), math.exp(1.5)
    z = a + b + c
    got = soften(t([[1.0, 2.0, 3.0]]), 2.0)
    assert got.tolist()[0] == pytest.approx([a / z, b / z, c / z], rel=1e-6)
    # T = 1 is the plain softmax: [e^0, e^1] / (1 + e)
    got1 = soften(t([[0.0, 1.0]]), 1.0)
    assert got1.tolist()[0] == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)], rel=1e-6)


def test_soften_higher_temperature_is_flatter_and_rows_independent():
    logits = t([[0.0, 4.0], [4.0, 0.0]])
    p1, p8 = soften(logits, 1.0), soften(logits, 8.0)
    # [1, e^4] / (1 + e^4) versus [1, e^0.5] / (1 + e^0.5)
    assert p1[0, 1].item() == pytest.approx(math.exp(4) / (1 + math.exp(4)), rel=1e-6)
    assert p8[0, 1].item() == pytest.approx(math.exp(0.5) / (1 + math.exp(0.5)), rel=1e-6)
    assert p8[1, 0].item() == pytest.approx(p8[0, 1].item(), rel=1e-6)  # softmax over the last dim
    assert p8[0, 1] < p1[0, 1]


def test_mean_of_softened_differs_from_softened_mean():
    # teachers t1 = [2, 0], t2 = [0, 0], T = 1
    # avg_kd side: mean of probabilities = ([e^2, 1]/(e^2+1) + [1/2, 1/2]) / 2
    e2 = math.exp(2.0)
    avg_probs = [(e2 / (e2 + 1) + 0.5) / 2, (1 / (e2 + 1) + 0.5) / 2]
    # EKD ensemble / FEED side: softmax of mean logits [1, 0] = [e, 1] / (e + 1)
    soft_avg = [math.e / (math.e + 1), 1 / (math.e + 1)]
    tl = t([[[2.0, 0.0]], [[0.0, 0.0]]])  # [K=2, N=1, C=2]
    got_avg = soften(tl, 1.0).mean(0)[0].tolist()
    got_soft = soften(tl.mean(0), 1.0)[0].tolist()
    assert got_avg == pytest.approx(avg_probs, rel=1e-6)
    assert got_soft == pytest.approx(soft_avg, rel=1e-6)
    assert abs(avg_probs[0] - soft_avg[0]) > 0.03  # 0.6904 vs 0.7311: the two really differ


# --- kd_kl -----------------------------------------------------------------------------------


def test_kd_kl_direction_teacher_is_p():
    # p = teacher = [0.9, 0.1]; student logits [0, 0] -> q = [0.5, 0.5]; T = 1
    # KL(p||q) = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5) = 0.368064...
    # KL(q||p) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.510826...
    kl_pq = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    kl_qp = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_pq == pytest.approx(0.3680642, abs=1e-6)
    assert kl_qp == pytest.approx(0.5108256, abs=1e-6)
    got = kd_kl(t([[0.0, 0.0]]), t([[0.9, 0.1]]), 1.0).item()
    assert got == pytest.approx(kl_pq, rel=1e-5)
    assert abs(got - kl_qp) > 0.1


def test_kd_kl_asymmetric_three_classes():
    # student logits z = [ln 1, ln 2, ln 5] -> q = [0.125, 0.25, 0.625]; teacher p = [0.8, 0.15, 0.05]
    # KL(p||q) = 1.2822..., KL(q||p) = 1.4743...
    p = [0.8, 0.15, 0.05]
    q = [1 / 8, 2 / 8, 5 / 8]
    kl_pq = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    kl_qp = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    got = kd_kl(t([[math.log(1), math.log(2), math.log(5)]]), t([p]), 1.0).item()
    assert got == pytest.approx(kl_pq, rel=1e-5)
    assert abs(kl_pq - kl_qp) > 0.15 and abs(got - kl_qp) > 0.15


def test_kd_kl_has_t_squared_factor():
    # T = 2: teacher logits [2, 0, 0] -> p = [e, 1, 1] / (e + 2);
    #        student logits [0, 2, 4] -> q = [1, e, e^2] / (1 + e + e^2)
    e = math.e
    p = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
    zq = 1 + e + e * e
    q = [1 / zq, e / zq, e * e / zq]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    got = kd_kl(t([[0.0, 2.0, 4.0]]), t([p]), 2.0).item()
    assert got == pytest.approx(4.0 * kl, rel=1e-5)
    # and T = 1 carries no factor: student logits [0, 1, 2] soften at T=1 to the same q
    got1 = kd_kl(t([[0.0, 1.0, 2.0]]), t([p]), 1.0).item()
    assert got1 == pytest.approx(kl, rel=1e-5)
    assert got == pytest.approx(4.0 * got1, rel=1e-5)


def test_kd_kl_batchmean_over_samples_not_classes():
    # sample 1: p=[0.9,0.1], z=[0,0] -> q=[.5,.5];  sample 2: p=[0.5,0.5], z=[ln 3, 0] -> q=[.75,.25]
    kl1 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    kl2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    got = kd_kl(t([[0.0, 0.0], [math.log(3.0), 0.0]]), t([[0.9, 0.1], [0.5, 0.5]]), 1.0).item()
    assert got == pytest.approx((kl1 + kl2) / 2, rel=1e-5)  # divided by N=2, not by N*C=4


def test_kd_kl_zero_when_matched_and_gradient_to_student():
    z = t([[0.3, -1.0, 2.0]]).requires_grad_(True)
    p = soften(z.detach(), 3.0)
    loss = kd_kl(z, p, 3.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    z2 = t([[1.0, 0.0, 0.0]]).requires_grad_(True)
    kd_kl(z2, t([[0.2, 0.3, 0.5]]), 2.0).backward()
    assert z2.grad is not None and z2.grad.abs().sum() > 0


# --- normalize_flat / normalized_sq_dist / feed_l1 ---------------------------------------------------


def test_normalize_flat_over_chw_jointly():
    # one sample [C=2, H=1, W=2] of ones: norm over all 4 elements is 2 -> every entry 0.5
    # (a per-channel normalisation would give 1/sqrt(2))
    x = torch.ones(1, 2, 1, 2)
    got = normalize_flat(x)
    assert tuple(got.shape) == (1, 4)
    assert got.tolist()[0] == pytest.approx([0.5] * 4)
    # [3, 4] -> [0.6, 0.8]; samples normalised independently
    got2 = normalize_flat(t([[3.0, 4.0], [0.0, -2.0]]).view(2, 2, 1, 1))
    assert got2.tolist() == [pytest.approx([0.6, 0.8]), pytest.approx([0.0, -1.0])]


# N=2 samples, each [C=2, H=1, W=1]:
#   s1=[3,4]->[0.6,0.8],  t1=[1,0]->[1,0],  diff [-0.4, 0.8]
#   s2=[0,-2]->[0,-1],    t2=[0,7]->[0,1],  diff [0, -2]
# squared per sample: 0.16 + 0.64 = 0.8 and 0 + 4 = 4 -> mean over the 2 samples = 2.4
# abs:     0.4 + 0.8 + 0 + 2 = 3.2   -> mean over 4 elements = 0.8
S = [[3.0, 4.0], [0.0, -2.0]]
T_ = [[1.0, 0.0], [0.0, 7.0]]


def maps(rows):
    return t(rows).view(len(rows), 2, 1, 1)


def test_normalized_sq_dist_by_hand():
    assert normalized_sq_dist(maps(S), maps(T_)).item() == pytest.approx(2.4, rel=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 1), (64, 8, 8), (256, 8, 8)])
def test_normalized_sq_dist_scale_does_not_shrink_with_map_size(shape):
    # The revised FeatLoss (docs/methods.md, 2026-11-29) is 2 - 2 cos per sample, in [0, 4], for any
    # C*H*W: opposite maps give 4, orthogonal ones 2. The old mean over elements gave 4 / (C*H*W).
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, *shape, generator=g)
    assert normalized_sq_dist(s, -2.0 * s).item() == pytest.approx(4.0, rel=1e-5)
    a, b = torch.zeros(1, *shape), torch.zeros(1, *shape)
    a.view(-1)[0], b.view(-1)[-1] = 1.0, 5.0
    if a.numel() > 1:
        assert normalized_sq_dist(a, b).item() == pytest.approx(2.0, rel=1e-6)
    tt = torch.randn(3, *shape, generator=g)
    cos = F.cosine_similarity(s.flatten(1), tt.flatten(1), dim=1)
    got = normalized_sq_dist(s, tt).item()
    assert got == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-5)
    assert 0.0 <= got <= 4.0


def test_feed_l1_by_hand():
    assert feed_l1(maps(S), maps(T_)).item() == pytest.approx(0.8, rel=1e-6)


def test_normalized_sq_dist_and_feed_l1_spatial_elements():
    # one sample [C=1, H=1, W=3]: s=[1,2,2]/3 after normalisation (norm 3), t=[0,0,5]->[0,0,1]
    s = t([[[[1.0, 2.0, 2.0]]]])
    tt = t([[[[0.0, 0.0, 5.0]]]])
    d = [1 / 3 - 0.0, 2 / 3 - 0.0, 2 / 3 - 1.0]
    assert normalized_sq_dist(s, tt).item() == pytest.approx(sum(x * x for x in d), rel=1e-6)
    assert feed_l1(s, tt).item() == pytest.approx(sum(abs(x) for x in d) / 3, rel=1e-6)


def test_feature_losses_invariant_to_scaling_a_sample():
    s, tt = maps(S), maps(T_)
    scale = t([7.0, 0.01]).view(2, 1, 1, 1)
    for fn in (normalized_sq_dist, feed_l1):
        base = fn(s, tt).item()
        assert fn(s * scale, tt).item() == pytest.approx(base, rel=1e-5)
        assert fn(s, tt * scale.flip(0)).item() == pytest.approx(base, rel=1e-5)


def test_feature_losses_symmetric_and_zero_on_parallel_maps():
    s, tt = maps(S), maps(T_)
    assert feed_l1(s, tt).item() == pytest.approx(feed_l1(tt, s).item())
    assert normalized_sq_dist(s, 3.0 * s).item() == pytest.approx(0.0, abs=1e-7)
    assert feed_l1(s, 3.0 * s).item() == pytest.approx(0.0, abs=1e-7)


# --- match_spatial -----------------------------------------------------------------------------


def test_match_spatial_pools_larger_first_argument():
    a = t([[[[1.0, 2.0], [3.0, 4.0]]]])  # [1,1,2,2]
    b = t([[[[9.0]]]])  # [1,1,1,1]
    pa, pb = match_spatial(a, b)
    assert tuple(pa.shape) == (1, 1, 1, 1)
    assert pa.item() == pytest.approx((1 + 2 + 3 + 4) / 4)  # 2.5
    assert pb is b


def test_match_spatial_pools_larger_second_argument_keeps_order():
    a = t([[[[9.0]], [[-1.0]]]])  # [1,2,1,1]
    b = t([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 8.0]]]]).view(1, 2, 2, 2)
    pa, pb = match_spatial(a, b)
    assert pa is a
    assert tuple(pb.shape) == (1, 2, 1, 1)
    assert pb.flatten().tolist() == pytest.approx([2.5, 2.0])


def test_match_spatial_4x4_to_2x2_block_means_and_same_size_untouched():
    a = torch.arange(16.0).view(1, 1, 4, 4)
    b = torch.zeros(1, 3, 2, 2)
    pa, pb = match_spatial(a, b)
    # blocks: {0,1,4,5} {2,3,6,7} {8,9,12,13} {10,11,14,15}
    assert pa.flatten().tolist() == pytest.approx([2.5, 4.5, 10.5, 12.5])
    assert pb is b
    c = torch.ones(1, 1, 2, 2)
    x, y = match_spatial(c, b)
    assert x is c and y is b
