"""Tests for kdray.models: builds, errors, multi-branch students, export."""

import copy

import pytest
import torch
from torch import nn

from kdray.core.errors import KdrayError
from kdray.models import (
    MultiBranchStudent,
    StagedModel,
    Student,
    available_models,
    build_model,
    build_student,
    export_module,
)

CIFAR = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
         "resnet8x4", "resnet32x4"]
# approximate parameter counts with 10 classes (RepDistiller reference numbers)
PARAMS = {"resnet8": 78e3, "resnet20": 0.27e6, "resnet56": 0.85e6, "resnet110": 1.73e6,
          "resnet8x4": 1.2e6, "resnet32x4": 7.4e6, "wrn_16_2": 0.69e6, "wrn_40_2": 2.2e6}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("name", CIFAR + ["wrn_16_2", "wrn_40_2"])
def test_build_shapes_channels_params(name, x):
    m = build_model(name, 10)
    assert isinstance(m, StagedModel) and m.arch == name and m.num_classes == 10
    assert len(m.stages) == 3
    logits, feats = m.forward_features(x)
    assert logits.shape == (2, 10)
    assert [f.shape[1] for f in feats] == m.stage_channels
    assert [f.shape[-1] for f in feats] == [32, 16, 8]
    assert torch.equal(m(x), logits)
    if name in PARAMS:
        assert n_params(m) == pytest.approx(PARAMS[name], rel=0.06)


def test_cifar_conventions():
    m = build_model("resnet8x4", 100)
    assert m.stage_channels == [64, 128, 256] and m.stem[0].out_channels == 32
    assert m.stages[0][0].downsample[0].kernel_size == (1, 1)  # 32 -> 64 projection
    assert len(build_model("resnet110", 10).stages[0]) == 18
    w = build_model("wrn_40_2", 10)
    assert isinstance(w.stages[-1][-1], nn.ReLU) and isinstance(w.stages[-1][-2], nn.BatchNorm2d)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)


def test_channels_last(x):
    m = build_model("wrn_16_2", 10).to(memory_format=torch.channels_last)
    out = m(x.to(memory_format=torch.channels_last))
    assert out.shape == (2, 10)


def test_available_models():
    names = available_models()
    assert names[: len(CIFAR)] == CIFAR
    assert "wrn_16_2" in names and "resnet18" in names and "mobilenet_v3_small" in names
    assert "vit_b_16" not in names  # unsupported torchvision families are not advertised


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("foo", "unknown model 'foo'; allowed: resnet8, resnet14"),
        ("resnet9", "wrn_D_K (e.g. wrn_16_2)"),
        ("wrn_17_2", "(D - 4) % 6 == 0"),
        ("wrn_16_0", "width K must be >= 1"),
        ("wrn_16", "expected wrn_D_K"),
        ("vit_b_16", "supported torchvision families: resnet"),
    ],
)
def test_bad_names(name, fragment):
    with pytest.raises(KdrayError) as e:
        build_model(name, 10)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("nc", [1, 0, 2.5, True])
def test_bad_num_classes(nc):
    with pytest.raises(KdrayError, match="num_classes"):
        build_model("resnet8", nc)


def test_multi_branch_outputs(x):
    torch.manual_seed(1)
    s = MultiBranchStudent("resnet8", 10, branches=3, split_stage=1)
    assert (s.num_branches, s.feat_channels, s.arch, s.split_stage, s.num_classes) == (
        3, 64, "resnet8", 1, 10)
    out = s(x)
    assert out["logits"].shape == (2, 10) and out["branch_logits"].shape == (3, 2, 10)
    assert [f.shape for f in out["feats"]] == [torch.Size([2, 64, 8, 8])] * 3
    assert torch.allclose(out["logits"], out["branch_logits"].mean(0))
    bl = out["branch_logits"]
    assert not torch.allclose(bl[0], bl[1]) and not torch.allclose(bl[1], bl[2])
    w = [b.head[-1].weight for b in s.branches]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


@pytest.mark.parametrize("split", [0, 1, 2])
def test_multi_branch_shares_trunk(split):
    s = MultiBranchStudent("resnet8", 10, branches=3, split_stage=split)
    single = build_model("resnet8", 10)
    trunk = n_params(single.stem) + sum(n_params(st) for st in single.stages[:split])
    branch = n_params(single) - trunk
    assert n_params(s) == trunk + 3 * branch
    assert len(s.trunk) == split and all(len(b.stages) == 3 - split for b in s.branches)


def test_multi_branch_gradients(x):
    s = MultiBranchStudent("resnet8", 10, branches=2, split_stage=2)
    out = s(x)
    (out["logits"].sum() + sum(f.mean() for f in out["feats"])).backward()
    assert s.stem[0].weight.grad is not None and s.stem[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in s.trunk.parameters())
    for b in s.branches:
        assert b.head[-1].weight.grad.abs().sum() > 0
        assert b.stages[0][0].conv1.weight.grad.abs().sum() > 0


def test_extract_branch_exact(x):
    s = MultiBranchStudent("resnet8", 10, branches=3, split_stage=1)
    s.train()
    s(torch.randn(8, 3, 32, 32))  # move BN running stats off their init
    s.eval()
    with torch.no_grad():
        bl = s(x)["branch_logits"]
        for b in range(3):
            m = s.extract_branch(b)
            assert isinstance(m, StagedModel) and not m.training
            assert m.stage_channels == [16, 32, 64] and len(m.stages) == 3
            assert torch.equal(m(x), bl[b])
    m = s.extract_branch(0)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(m.parameters(), s.parameters()))
    with pytest.raises(KdrayError, match="0..2"):
        s.extract_branch(3)


@pytest.mark.parametrize("split, branches", [(3, 2), (-1, 2), (1, 0)])
def test_multi_branch_bad_args(split, branches):
    with pytest.raises(KdrayError) as e:
        MultiBranchStudent("resnet8", 10, branches=branches, split_stage=split)
    assert ("0..2" in str(e.value)) if branches else ("branches" in str(e.value))


def test_build_student(x):
    st = build_student("resnet8", 10)
    assert isinstance(st, Student) and st.num_branches == 1 and st.feat_channels == 64
    assert st.arch == "resnet8" and st.num_classes == 10 and st.stage_channels == [16, 32, 64]
    out = st(x)
    assert out["logits"].shape == (2, 10) and out["branch_logits"].shape == (1, 2, 10)
    assert torch.equal(out["branch_logits"][0], out["logits"])
    assert out["feats"][0].shape == (2, 64, 8, 8)
    mb = build_student("wrn_16_2", 10, branches=2, split_stage=2, multi_branch=True)
    assert isinstance(mb, MultiBranchStudent) and mb.feat_channels == 128
    assert mb(x)["feats"][1].shape == (2, 128, 8, 8)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_wrapping_matches(name):
    import torchvision.models as tvm

    torch.manual_seed(0)
    wrapped = build_model(name, 10).eval()
    torch.manual_seed(0)
    ref = tvm.get_model(name, weights=None, num_classes=10).eval()
    assert n_params(wrapped) == n_params(ref)
    for p, q in zip(wrapped.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    xx = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, feats = wrapped.forward_features(xx)
        assert torch.equal(logits, ref(xx))
    assert [f.shape[1] for f in feats] == wrapped.stage_channels
    if name == "resnet18":
        assert wrapped.stage_channels == [64, 128, 256, 512]


def test_torchvision_multi_branch(x):
    s = MultiBranchStudent("mobilenet_v3_small", 10, branches=2, split_stage=8)
    assert s(x)["branch_logits"].shape == (2, 2, 10)
    with pytest.raises(KdrayError, match=r"0\.\.11"):
        MultiBranchStudent("mobilenet_v3_small", 10, branches=2, split_stage=12)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("multi, branch", [(False, None), (True, None), (True, 1)])
def test_export_trace(multi, branch, x):
    st = build_student("resnet8", 10, branches=2, split_stage=1, multi_branch=multi).eval()
    mod = export_module(st, branch).eval()
    with torch.no_grad():
        want = st(x)["logits"] if branch is None else st(x)["branch_logits"][branch]
        assert torch.equal(mod(x), want)
        traced = torch.jit.trace(mod, x)
        assert torch.allclose(traced(x), want, atol=1e-6)
    if branch is None:  # torch.export is slow on CPU; once per student kind
        ep = torch.export.export(mod, (x,))
        with torch.no_grad():
            assert torch.allclose(ep.module()(x), want, atol=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_export_scriptable(x):
    mod = export_module(build_student("resnet8", 10, branches=2, multi_branch=True)).eval()
    with torch.no_grad():
        assert torch.allclose(torch.jit.script(mod)(x), mod(x), atol=1e-6)


def test_export_errors():
    with pytest.raises(KdrayError, match="single-branch"):
        export_module(build_student("resnet8", 10), branch=1)
    with pytest.raises(KdrayError, match="cannot export"):
        export_module(nn.Linear(2, 2))
    st = build_student("resnet8", 10)
    assert export_module(st) is st.model and export_module(copy.copy(st), 0) is st.model
