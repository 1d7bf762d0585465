"""The training loop: determinism, metrics, checkpoints, resume, NaN handling, generations."""

import json

import pytest
import torch
from conftest import small_cfg

from kdray.core.errors import KdrayError
from kdray.core.io import safe_load
from kdray.teachers.ensemble import load_teachers
from kdray.training.fit import fit
from kdray.training.generation import lr_factor
from kdray.training.loop import NonFiniteLoss
from kdray.training.student_file import rebuild_student

quiet = dict(log=lambda s: None)


def test_deterministic_given_seed(tmp_path):
    a = fit(small_cfg(method="ce"), checkpoint_root=str(tmp_path / "a"), **quiet)["history"]
    b = fit(small_cfg(method="ce"), checkpoint_root=str(tmp_path / "b"), **quiet)["history"]
    c = fit(small_cfg(method="ce", seed=1), checkpoint_root=str(tmp_path / "c"), **quiet)["history"]
    keys = ["train_loss", "val_acc", "loss_ce", "test_acc"]
    assert [[h.get(k) for k in keys] for h in a] == [[h.get(k) for k in keys] for h in b]
    assert a[-1]["train_loss"] != c[-1]["train_loss"]


def test_learns_above_chance(tmp_path):
    m = fit(small_cfg(method="ce", epochs=4), checkpoint_root=str(tmp_path), **quiet)["metrics"]
    assert m["test_acc"] > 0.3  # 10 classes: chance is 0.1


def test_ekd_reports_every_term_and_branch(tmp_path, fake_teachers):
    cfg = small_cfg(method="ekd", branches=3, teachers=str(fake_teachers), feat_weight=0.5, ens_kd_weight=0.5)
    seen = []
    res = fit(cfg, checkpoint_root=str(tmp_path), reporter=lambda m, d: seen.append((m, d)), **quiet)
    m = res["metrics"]
    for key in ("loss_ce", "loss_kd", "loss_feat", "loss_ens_ce", "loss_ens_kd", "val_acc", "val_acc_b0",
                "val_acc_b2", "val_acc_best_branch", "test_acc", "test_acc_best_branch", "lr",
                "epoch_time_s", "images_per_s", "params", "branch_params"):
        assert key in m, key
    assert abs(m["train_loss"] - sum(v for k, v in m.items() if k.startswith("loss_"))) < 1e-4
    assert len(seen) == cfg.epochs and all(d is not None for _, d in seen)
    assert m["params"] > m["branch_params"]


def test_checkpoint_student_reloads_with_same_accuracy(tmp_path, fake_teachers):
    cfg = small_cfg(method="ekd", branches=2, teachers=str(fake_teachers))
    res = fit(cfg, checkpoint_root=str(tmp_path), **quiet)
    record = safe_load(tmp_path / "epoch_0002" / "student.pt")
    student = rebuild_student(record)
    for a, b in zip(student.state_dict().values(), res["student"].state_dict().values()):
        assert torch.equal(a, b)
    assert record["metrics"]["test_acc"] == res["metrics"]["test_acc"]


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, fake_teachers):
    cfg = small_cfg(method="kd", epochs=3, teachers=str(fake_teachers))
    full = fit(cfg, checkpoint_root=str(tmp_path / "full"), **quiet)["history"]

    class Stop(Exception):
        pass

    def stop_after_first(m, d):
        if m["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(cfg, checkpoint_root=str(tmp_path / "cut"), reporter=stop_after_first, **quiet)
    resumed = fit(cfg.replace(resume=True), checkpoint_root=str(tmp_path / "cut"), **quiet)["history"]
    assert [h["epoch"] for h in resumed] == [1, 2, 3]
    assert resumed[-1]["train_loss"] == pytest.approx(full[-1]["train_loss"], abs=1e-6)
    assert resumed[-1]["test_acc"] == full[-1]["test_acc"]


def test_nan_loss_stops_with_reason(tmp_path):
    with pytest.raises(NonFiniteLoss, match="non-finite"):
        fit(small_cfg(method="ce", lr=1e12, weight_decay=0), checkpoint_root=str(tmp_path), **quiet)


def test_sfeed_runs_every_generation(tmp_path, fake_teachers):
    cfg = small_cfg(method="sfeed", generations=2, epochs=1, teachers=str(fake_teachers))
    res = fit(cfg, checkpoint_root=str(tmp_path), **quiet)
    m = res["metrics"]
    assert m["generation"] == 1 and m["epoch"] == 2
    assert "gen1_test_acc" in m and "gen2_test_acc" in m


def test_method_needing_teachers_without_them(tmp_path):
    with pytest.raises(KdrayError, match="needs at least 1 teacher"):
        fit(small_cfg(method="kd"), checkpoint_root=str(tmp_path), **quiet)


def test_teacher_manifest_and_frozen_ensemble(fake_teachers):
    manifest = json.loads((fake_teachers / "manifest.json").read_text())
    assert [t["arch"] for t in manifest["teachers"]] == ["resnet8", "resnet14"]
    assert len(manifest["teachers"][0]["sha256"]) == 64
    ens = load_teachers(fake_teachers, manifest["classes"])
    ens.train()
    assert not ens.training and not any(p.requires_grad for p in ens.parameters())
    out = ens(torch.randn(2, 3, 16, 16), feats=True)
    assert out["logits"].shape == (2, 2, 10) and len(out["feats"]) == 2
    assert not out["logits"].is_inference()


def test_lr_schedules():
    cfg = small_cfg(epochs=4)
    assert [lr_factor(cfg, e) for e in (0, 2)] == [1.0, pytest.approx(0.5)]
    step = cfg.replace(schedule="step", lr_milestones=[0.5, 0.75])
    assert [lr_factor(step, e) for e in range(4)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.01)]


def test_precise_bn_recomputes_statistics_without_changing_training(tmp_path):
    """precise_bn leaves the training trajectory alone (train-mode BatchNorm uses batch statistics)
    and leaves each BatchNorm's running mean at the average of its input's batch means over the
    un-augmented train split under the final weights."""
    from kdray.data.loader import BatchLoader
    from kdray.data.sources import load_data

    # fp32 pinned: precise BN runs in the training precision (amp; auto is bf16 on a CPU with native
    # bf16) and the hook below computes the statistics in fp32, to 1e-5
    cfg = small_cfg(method="ce", epochs=2, amp="off")
    plain = fit(cfg, checkpoint_root=str(tmp_path / "a"), **quiet)
    precise = fit(cfg.replace(precise_bn=True), checkpoint_root=str(tmp_path / "b"), **quiet)
    assert [h["train_loss"] for h in plain["history"]] == [h["train_loss"] for h in precise["history"]]
    student = precise["student"]
    bn = next(m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    data = load_data(cfg)
    seen = []
    hook = bn.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].mean(dim=(0, 2, 3))))
    student.eval()
    with torch.no_grad():
        for x, _ in BatchLoader(data.train, cfg.batch_size, mean=data.mean, std=data.std, train=False):
            student(x)
    hook.remove()
    expected = torch.stack(seen).mean(0)
    assert torch.allclose(bn.running_mean, expected, atol=1e-5)
    other = next(m for m in plain["student"].modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(other.running_mean, expected, atol=1e-3)  # the EMA is something else


def test_teachers_train_continues_after_interruption(tmp_path):
    """An interrupted ``train_teachers`` keeps the finished teacher, resumes the one in training
    from its last epoch, and ends with the same weights as an uninterrupted run."""
    from kdray.training.teacher_set import train_teachers

    cfg = small_cfg(epochs=2)
    whole = train_teachers(cfg, ["resnet8", "resnet14"], 2, tmp_path / "whole", log=lambda s: None)

    class Interrupt(Exception):
        pass

    seen = []

    def stop_in_second_teacher_after_epoch_1(line):
        # epoch 2's line comes after epoch 1's checkpoint and before epoch 2's
        seen.append(line)
        if any("teacher 2/2" in s for s in seen) and line.startswith("epoch 2/"):
            raise Interrupt

    out = tmp_path / "cut"
    with pytest.raises(Interrupt):
        train_teachers(cfg, ["resnet8", "resnet14"], 2, out, log=stop_in_second_teacher_after_epoch_1)
    assert not (out / "manifest.json").exists() and (out / "teacher_0.json").is_file()
    lines = []
    again = train_teachers(cfg, ["resnet8", "resnet14"], 2, out, log=lines.append)
    assert any("teacher 1/2: resnet8 already trained" in s for s in lines)
    assert any("resuming from" in s and "completed epoch 1" in s for s in lines)
    assert [t["sha256"] for t in again["teachers"]] == [t["sha256"] for t in whole["teachers"]]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "teacher_0.pt", "teacher_1.pt"]
