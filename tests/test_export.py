"""Deployable students: files, branch choice, re-checked accuracy, FEED without translators."""

import json
import math

import pytest
import torch
from conftest import small_cfg

from kdray.core.errors import KdrayError
from kdray.core.io import safe_load, sha256_file
from kdray.data.loader import BatchLoader
from kdray.deploy.deployed import resolve_branch
from kdray.deploy.export import export_student, load_exported, load_state_dict_module
from kdray.deploy.latency import measure_latency_ms
from kdray.deploy.recheck import load_test_split, predict
from kdray.models import build_model
from kdray.models.measure import count_params
from kdray.training.fit import fit
from kdray.training.student_file import rebuild_student

quiet = dict(log=lambda s: None)


def _train(tmp_path_factory, name, log=None, **kw):
    root = tmp_path_factory.mktemp(name)
    cfg = small_cfg(epochs=1, **kw)
    fit(cfg, checkpoint_root=str(root), log=log or quiet["log"])
    return safe_load(root / "epoch_0001" / "student.pt", "student")


@pytest.fixture(scope="module")
def ekd_record(tmp_path_factory, fake_teachers):
    return _train(tmp_path_factory, "ekd", method="ekd", branches=3, teachers=str(fake_teachers))


@pytest.fixture(scope="module")
def ce_record(tmp_path_factory):
    return _train(tmp_path_factory, "ce", method="ce")


@pytest.fixture(scope="module")
def bf16_record(tmp_path_factory, fake_teachers):
    """An EKD run with bf16 autocast forced on, on any CPU (without native bf16 oneDNN emulates it,
    only slower): ``(record, the run's log lines, {(train mode, logits dtype)} of the student's
    forward passes)``."""
    import kdray.training.fit as fit_module

    lines, passes = [], set()
    build = fit_module.build_generation

    def watched(*args, **kw):  # each forward pass of the student: (train mode, dtype of its logits)
        parts = build(*args, **kw)
        parts.student.register_forward_hook(lambda m, i, out: passes.add((m.training, out["logits"].dtype)))
        return parts

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit_module, "build_generation", watched)
        record = _train(tmp_path_factory, "bf16", log=lines.append, method="ekd", branches=2,
                        teachers=str(fake_teachers), amp="bf16", seed=3)
    return record, lines, passes


@pytest.fixture(scope="module")
def feed_record(tmp_path_factory, fake_teachers):
    return _train(tmp_path_factory, "feed", method="feed", teachers=str(fake_teachers))


def _eval_predictions(record):
    """Per-image predictions the way kdray.models.measure.evaluate makes them: [ensemble, branch 0, ...]."""
    cfg, data = load_test_split(record)
    test = data.test
    student = rebuild_student(record)
    loader = BatchLoader(test, cfg.eval_batch_size, mean=record["mean"], std=record["std"], train=False)
    rows = []
    with torch.no_grad():
        for x, _ in loader:
            out = student(x)
            rows.append(torch.cat([out["logits"].argmax(1)[None], out["branch_logits"].argmax(2)]))
    return torch.cat(rows, 1)


def _check_files(out, info):
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.pt2", "state_dict.pt"]
    assert json.loads((out / "export.json").read_text()) == {k: v for k, v in info.items() if k != "total_s"}
    state = torch.load(out / "state_dict.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    program = torch.export.load(out / "model.pt2").module()
    x = torch.rand(3, 3, info["image_size"], info["image_size"])
    assert torch.equal(program(x), load_state_dict_module(out)(x))  # the two files hold the same model
    assert program(x).shape == (3, info["num_classes"])
    assert info["files"]["model.pt2"] == sha256_file(out / "model.pt2")


def test_ekd_best_branch(tmp_path, ekd_record):
    m = ekd_record["metrics"]
    accs = [m[f"val_acc_b{i}"] for i in range(3)]  # chosen on val: the test split stays unseen
    best = accs.index(max(accs))  # ties: the lowest index
    info = export_student(ekd_record, branch="best", out=tmp_path / "best", **quiet)
    _check_files(tmp_path / "best", info)
    assert info["branch_index"] == best and info["branch"] == f"branch {best}"
    assert info["branch_selected_by"] == "val_acc_b*" and info["branch_accuracies_logged"] == accs
    assert info["params"] == m["branch_params"] < m["params"]
    assert info["test_acc_logged"] == m[f"test_acc_b{best}"]
    assert info["test_acc_rechecked"] == info["test_acc_logged"] and info["matches"] is True
    # the loaded program predicts exactly what evaluate() predicted during training, image by image
    test = load_test_split(ekd_record)[1].test
    assert torch.equal(predict(load_exported(tmp_path / "best"), test.x), _eval_predictions(ekd_record)[1 + best])
    assert 0 < info["latency_ms"] < 1e4


def test_a_bf16_run_logs_the_accuracy_its_exported_model_reproduces(tmp_path, bf16_record):
    """amp bf16 trains under bf16 autocast but logs accuracies measured in fp32 (the precision of
    what is exported): the exported ensemble and best branch, loaded from disk, reproduce the logged
    test accuracies exactly, image by image, on any CPU."""
    record, lines, passes = bf16_record
    assert any("cpu, bf16 steps, fp32 evaluation" in line for line in lines), lines[:2]
    assert passes == {(True, torch.bfloat16), (False, torch.float32)}  # steps under bf16, evaluation in fp32
    assert record["config"]["amp"] == "bf16" and record["evaluation"] == {"device": "cpu", "precision": "fp32"}
    m = record["metrics"]
    preds = _eval_predictions(record)  # fp32, as kdray.models.measure.evaluate ran during training
    y = load_test_split(record)[1].test.y
    assert [(p == y).double().mean().item() for p in preds] == pytest.approx(
        [m["test_acc"], m["test_acc_b0"], m["test_acc_b1"]], abs=1e-12)
    whole = export_student(record, branch="all", out=tmp_path / "all", latency=False, **quiet)
    assert whole["test_acc_rechecked"] == whole["test_acc_logged"] == m["test_acc"] and whole["matches"] is True
    assert whole["recheck_tolerance"] == 1e-6 and "identical predictions" in whole["recheck_tolerance_reason"]
    best = export_student(record, branch="best", out=tmp_path / "best", latency=False, **quiet)
    assert best["test_acc_rechecked"] == best["test_acc_logged"] == m[f"test_acc_b{best['branch_index']}"]
    assert best["matches"] is True
    test = load_test_split(record)[1].test
    assert torch.equal(predict(load_exported(tmp_path / "all"), test.x), preds[0])
    assert torch.equal(predict(load_exported(tmp_path / "best"), test.x), preds[1 + best["branch_index"]])


def test_a_record_from_before_fp32_evaluation_gets_the_bf16_tolerance(ce_record):
    """A student.pt without ``evaluation`` was evaluated in the run's ``amp``: exact only if amp was
    off (auto picked bf16 on a CPU with native bf16)."""
    from kdray.deploy.recheck import _recheck_tolerance
    from kdray.training.config import from_dict

    old = {k: v for k, v in ce_record.items() if k != "evaluation"}
    assert ce_record["evaluation"] == {"device": "cpu", "precision": "fp32"}
    assert _recheck_tolerance(ce_record, from_dict(dict(ce_record["config"], amp="bf16")), 200)[0] == 1e-6
    for amp, exact in (("auto", False), ("bf16", False), ("off", True)):
        cfg = from_dict(dict(ce_record["config"], amp=amp))
        tol, why = _recheck_tolerance(old, cfg, 200)
        assert (tol == 1e-6) is exact, (amp, tol, why)
        assert exact or (tol == pytest.approx(0.005, abs=1e-5) and f"amp={amp!r}" in why and "1 image(s)" in why)
    assert _recheck_tolerance(ce_record, from_dict(ce_record["config"]), 200, device="cuda")[0] > 1e-6


def test_branch_choice_errors(tmp_path, ekd_record, ce_record):
    with pytest.raises(
        KdrayError, match=r"branch 7 does not exist in a 3-branch student; allowed: best, all or 0\.\.2"
    ):
        export_student(ekd_record, branch=7, out=tmp_path / "x", **quiet)
    assert not (tmp_path / "x").exists()
    test_only = dict(ekd_record, metrics={k: v for k, v in ekd_record["metrics"].items() if not k.startswith("val_")})
    test_accs = [test_only["metrics"][f"test_acc_b{i}"] for i in range(3)]
    assert test_accs[resolve_branch(test_only, "best")] == max(test_accs)
    assert resolve_branch(ekd_record, "2") == 2 and resolve_branch(ekd_record, "all") is None
    with pytest.raises(KdrayError, match="allowed: best, all or a branch number"):
        resolve_branch(ekd_record, "first")
    assert [resolve_branch(ce_record, b) for b in ("best", "all", 0, "0")] == [None] * 4
    with pytest.raises(KdrayError, match="single-branch student; allowed: best, all or 0$"):
        resolve_branch(ce_record, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary folders left behind


def test_single_student_and_no_overwrite(tmp_path, ce_record, monkeypatch):
    out = tmp_path / "ce"
    info = export_student(ce_record, out=out, latency=False, **quiet)
    _check_files(out, info)
    assert info["branch"] == "student" and info["params"] == ce_record["metrics"]["params"]
    assert info["test_acc_rechecked"] == info["test_acc_logged"] == ce_record["metrics"]["test_acc"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(KdrayError, match="exists and is not empty; pass --overwrite"):
        export_student(ce_record, out=out, **quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a failure half-way (a half-written program) leaves the old export and no debris
    import kdray.deploy.export as ex

    def half_written(module, size, d):
        (d / "model.pt2").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "_export_program", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        export_student(ce_record, out=out, overwrite=True, **quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ce"]


def test_feed_exports_only_the_student(tmp_path, feed_record):
    assert not any("translator" in k for k in feed_record["state_dict"])
    info = export_student(feed_record, out=tmp_path / "feed", latency=False, **quiet)
    plain = count_params(build_model("resnet8", 10))
    assert info["params"] == plain == feed_record["metrics"]["params"]
    state = safe_load(tmp_path / "feed" / "state_dict.pt")
    assert sum(v.numel() for k, v in state.items() if k.startswith("net.") and "running" not in k
               and "num_batches" not in k) == plain
    assert info["test_acc_rechecked"] == info["test_acc_logged"] and info["matches"] is True
    # a record smuggling extra (translator) weights is refused rather than exported
    bad = dict(feed_record, state_dict={**feed_record["state_dict"], "translators.0.weight": torch.zeros(1)})
    with pytest.raises(KdrayError, match="do not fit"):
        export_student(bad, out=tmp_path / "bad", **quiet)


def test_torchscript_fallback_and_missing_data(tmp_path, ce_record, monkeypatch):
    def no_export(*a, **k):
        raise RuntimeError("unsupported op")

    export_student(ce_record, out=tmp_path / "ts", recheck=False, latency=False, **quiet)  # an older export
    monkeypatch.setattr(torch.export, "export", no_export)
    info = export_student(ce_record, out=tmp_path / "ts", overwrite=True, latency=False, **quiet)
    assert not (tmp_path / "ts" / "model.pt2").exists() and (tmp_path / "ts" / "model.ts").is_file()
    assert info["program_format"] == "torchscript" and "unsupported op" in info["export_fallback_reason"]
    assert sorted(info["files"]) == ["model.ts", "state_dict.pt"]
    assert info["test_acc_rechecked"] == info["test_acc_logged"]
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(load_exported(tmp_path / "ts")(x), load_state_dict_module(tmp_path / "ts")(x))

    gone = dict(ce_record, config=dict(ce_record["config"], dataset="imagefolder", data_dir=str(tmp_path / "nope")))
    with pytest.raises(KdrayError, match="cannot re-check the accuracy: dataset 'imagefolder' could not be loaded"):
        export_student(gone, out=tmp_path / "gone", **quiet)
    assert not (tmp_path / "gone").exists()


def test_latency_positive_finite(ce_record):
    module = rebuild_student(ce_record).model
    ms = measure_latency_ms(module, 16, batch=2, warmup=1, iters=3)
    assert ms > 0 and math.isfinite(ms)


def test_cli_exports_whole_ensemble(ekd_record, tmp_path, capsys):
    from kdray.cli import main
    from kdray.core.io import atomic_save

    path = atomic_save(ekd_record, tmp_path / "student.pt")
    code = main(["export", "--student", str(path), "--branch", "all", "--out", str(tmp_path / "o"), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert code == 0
    _check_files(tmp_path / "o", info)
    assert info["branch"] == "ensemble" and info["branch_index"] is None
    assert info["params"] == ekd_record["metrics"]["params"]
    assert info["test_acc_rechecked"] == info["test_acc_logged"] == ekd_record["metrics"]["test_acc"]
    assert info["matches"] is True
    test = load_test_split(ekd_record)[1].test
    assert torch.equal(predict(load_exported(tmp_path / "o"), test.x), _eval_predictions(ekd_record)[0])
    code = main(["export", "--student", str(path), "--branch", "nine", "--out", str(tmp_path / "p")])
    assert code == 2 and "allowed: best, all or a branch number" in capsys.readouterr().err


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli_error(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdray: error:")]
    assert len(lines) == 1  # one line: folder, what is wrong, what is allowed
    return lines[0]


def test_cli_overwrite_replaces_an_earlier_export(ce_record, tmp_path, capsys):
    from kdray.cli import main
    from kdray.core.io import atomic_save

    path = atomic_save(ce_record, tmp_path / "run" / "student.pt")
    out = tmp_path / "o"
    argv = ["export", "--student", str(path), "--out", str(out), "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(argv) == 2 and "exists and is not empty; pass --overwrite" in _cli_error(capsys)
    assert main(argv + ["--overwrite"]) == 0
    info = json.loads(capsys.readouterr().out)
    _check_files(out, info)
    assert info["files"]["state_dict.pt"] == first["files"]["state_dict.pt"]  # same student, same weights
    assert info["test_acc_rechecked"] == info["test_acc_logged"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "run"]  # no temporary or set-aside folders


def test_cli_overwrite_refuses_foreign_files(ce_record, tmp_path, capsys):
    from kdray.cli import main
    from kdray.core.io import atomic_save

    path = atomic_save(ce_record, tmp_path / "run" / "student.pt")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not an export")
    code = main(["export", "--student", str(path), "--out", str(mine), "--overwrite", "--no-recheck"])
    err = _cli_error(capsys)
    assert code == 2
    assert f"--out {mine} holds files kdray export did not write ('notes.txt')" in err
    assert "--overwrite replaces only an earlier kdray export" in err
    assert _snapshot(mine) == {"notes.txt": b"not an export"}

    # an earlier export with one file added by someone else is no longer only an export
    out = tmp_path / "o"
    export_student(ce_record, out=out, recheck=False, latency=False, **quiet)
    (out / "README.md").write_text("my notes")
    before = _snapshot(out)
    code = main(["export", "--student", str(path), "--out", str(out), "--overwrite", "--no-recheck"])
    assert code == 2 and "did not write ('README.md')" in _cli_error(capsys)
    assert _snapshot(out) == before
    # a folder with a state_dict.pt but no export.json is not an export either
    (mine / "notes.txt").unlink()
    (mine / "state_dict.pt").write_bytes(b"someone's weights")
    with pytest.raises(KdrayError, match=r"did not write \('state_dict.pt'\)"):
        export_student(ce_record, out=mine, overwrite=True, recheck=False, latency=False, **quiet)
    assert _snapshot(mine) == {"state_dict.pt": b"someone's weights"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "o", "run"]


def test_cli_overwrite_refuses_the_students_own_folder(ce_record, tmp_path, capsys):
    from kdray.cli import main
    from kdray.core.io import atomic_save

    run = tmp_path / "run"
    path = atomic_save(ce_record, run / "epoch_0001" / "student.pt")
    (run / "epoch_0001" / "checkpoint.pt").write_bytes(b"training state")
    before = _snapshot(run)
    for out in (path.parent, run):  # the folder holding student.pt, and a parent of it
        code = main(["export", "--student", str(path), "--out", str(out), "--overwrite", "--no-recheck"])
        err = _cli_error(capsys)
        assert code == 2 and f"--out {out} " in err and "--overwrite replaces only an earlier kdray export" in err
        assert _snapshot(run) == before
        # told where the student came from, export names that reason, whatever else the folder holds
        with pytest.raises(KdrayError, match=r"contains the student being exported .*never the student's own folder"):
            export_student(ce_record, out=out, overwrite=True, source=path, recheck=False, latency=False, **quiet)
        assert _snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
