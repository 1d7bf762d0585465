"""An architecture registered from Python (``register_model``) builds through ``build_model``:
it trains as a student (single and EKD multi-branch), as a teacher, and is imported as one;
duplicate and built-in names are refused with one line."""

from __future__ import annotations

import pytest
import torch
from conftest import small_cfg, sweep_in_process
from torch import nn

from kdray.core.errors import KdrayError
from kdray.models import (
    MultiBranchStudent,
    StagedModel,
    available_models,
    build_model,
    register_model,
    registered_model,
    registered_models,
    unregister_model,
)
from kdray.teachers.ensemble import load_teachers
from kdray.training.fit import fit

QUIET = dict(log=lambda s: None, keep_checkpoints=0)


def tiny_parts(num_classes: int):
    """A (stem, stages, head) triple: two downsampling stages, 16 and 32 channels."""
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
    stages = [nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True)),
              nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True))]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(32, num_classes))
    return stem, stages, head


def tiny_staged(num_classes: int) -> StagedModel:
    stem, stages, head = tiny_parts(num_classes)
    return StagedModel(stem, stages, head, [16, 32], num_classes, "whatever_the_builder_calls_it")


@pytest.fixture
def tiny():
    """'tiny_net' registered for one test only: later tests see kdray's own architectures."""
    with registered_model("tiny_net", tiny_parts) as name:
        yield name
    assert "tiny_net" not in registered_models()


def test_a_registered_triple_builds_as_a_staged_model(tiny):
    model = build_model(tiny, 10)
    assert isinstance(model, StagedModel) and model.arch == "tiny_net" and model.num_classes == 10
    assert model.stage_channels == [16, 32]  # probed from the stages' outputs
    logits, feats = model.forward_features(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 10) and [f.shape[1] for f in feats] == [16, 32]
    assert "tiny_net" in available_models()
    assert build_model(tiny, 10) is not model  # a fresh model per build (EKD builds one per branch)


def test_a_builder_returning_a_staged_model_and_the_decorator_form():
    @register_model("tiny_staged_net")
    def builder(num_classes):
        return tiny_staged(num_classes)

    try:
        assert builder is not None and callable(builder)  # the decorator hands the function back
        model = build_model("tiny_staged_net", 5)
        assert model.arch == "tiny_staged_net" and model(torch.randn(1, 3, 16, 16)).shape == (1, 5)
    finally:
        unregister_model("tiny_staged_net")


def test_trains_as_a_student_with_ce(tiny, tmp_path):
    result = fit(small_cfg(method="ce", student=tiny, epochs=1), checkpoint_root=str(tmp_path), **QUIET)
    assert result["student"].arch == "tiny_net"
    assert 0 <= result["metrics"]["test_acc"] <= 1


def test_trains_as_an_ekd_multi_branch_student(tiny, tmp_path, fake_teachers):
    cfg = small_cfg(method="ekd", student=tiny, epochs=1, branches=2, split_stage=1, teachers=str(fake_teachers))
    result = fit(cfg, checkpoint_root=str(tmp_path), **QUIET)
    student = result["student"]
    assert isinstance(student, MultiBranchStudent) and student.num_branches == 2
    assert len(student.trunk) == 1 and all(len(b.stages) == 1 for b in student.branches)  # split at stage 1
    assert "test_acc_b1" in result["metrics"]


def test_trains_as_a_teacher_and_teaches(tiny, tmp_path):
    from kdray.training.teacher_set import train_teachers

    out = tmp_path / "teachers"
    manifest = train_teachers(small_cfg(epochs=1), [tiny], 1, out, log=lambda s: None)
    assert manifest["teachers"][0]["arch"] == "tiny_net"
    assert load_teachers(out).members[0].arch == "tiny_net"
    result = fit(small_cfg(method="kd", epochs=1, teachers=str(out)), checkpoint_root=str(tmp_path / "kd"), **QUIET)
    assert 0 <= result["metrics"]["test_acc"] <= 1


def test_imports_as_a_teacher_arch(tiny, tmp_path):
    from kdray.teachers.importing import import_teachers

    torch.save(build_model(tiny, 10).state_dict(), tmp_path / "mine.pt")
    manifest = import_teachers([tmp_path / "mine.pt"], out=tmp_path / "set", cfg=small_cfg(), archs=[tiny],
                               log=lambda s: None)
    entry = manifest["teachers"][0]
    assert entry["arch"] == "tiny_net" and entry["layout"] == "kdray" and entry["imported"] is True
    assert load_teachers(tmp_path / "set").members[0].stage_channels == [16, 32]


@pytest.mark.parametrize("name, fragment", [
    ("resnet8", "taken by kdray's built-in architectures"),  # a CIFAR ResNet
    ("resnet18", "taken by kdray's built-in architectures"),  # a torchvision model
    ("vit_b_16", "taken by kdray's built-in architectures"),  # torchvision, even if kdray cannot split it
    ("wrn_99_1", "taken by kdray's built-in architectures"),
    ("", "is not allowed"),
    (" spaced ", "is not allowed"),
])
def test_built_in_and_bad_names_are_refused(name, fragment):
    with pytest.raises(KdrayError) as e:
        register_model(name, tiny_parts)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert name not in registered_models()


def test_a_duplicate_name_is_refused_and_the_first_kept(tiny):
    with pytest.raises(KdrayError, match="'tiny_net' is registered already; call unregister_model"):
        register_model(tiny, tiny_staged)
    assert build_model(tiny, 10).stage_channels == [16, 32]


def test_unknown_names_list_the_registered_ones(tiny):
    with pytest.raises(KdrayError) as e:
        build_model("tiny_nett", 10)
    assert "registered: tiny_net" in str(e.value) and str(e.value).startswith("unknown model 'tiny_nett'; allowed:")


def test_a_builder_returning_something_else_is_one_line():
    with registered_model("plain_net", lambda n: nn.Linear(3, n)), pytest.raises(KdrayError) as e:
        build_model("plain_net", 10)
    assert "returned Linear; it must return a StagedModel or a (stem, stages, head)" in str(e.value)
    with registered_model("wrong_classes_net", lambda n: tiny_staged(n + 1)), \
            pytest.raises(KdrayError, match="made 11 classes when asked for 10"):
        build_model("wrong_classes_net", 10)


def test_searched_as_a_student_in_a_sweep_on_ray_workers(tiny, tmp_path, capsys):
    """A trial runs in a Ray worker process, where only kdray's own architectures exist at import:
    the registered builder travels to it by value (kdray.distributed.raytrain.method_payload)."""
    rows = sweep_in_process(tmp_path, capsys, (
        "name: tiny\nsamples: 2\n"
        "base: {dataset: fake, image_size: 16, student: tiny_net, device: cpu, method: ce, epochs: 1}\n"
        "params:\n  lr: {type: float, low: 0.01, high: 0.1, log: true}\n"), "tiny")
    assert len(rows) == 2
