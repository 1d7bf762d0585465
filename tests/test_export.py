"""kdray.export: deployable students (ensemble or one branch), files that load, accuracy re-checked."""

import json
import math
from pathlib import Path

import pytest
import torch

from kdray.checkpoint import safe_load
from kdray.engine import fit
from kdray.errors import KdrayError
from kdray.export import export_student, load_exported, measure_latency_ms, resolve_branch

from conftest import small_cfg


@pytest.fixture(scope="module")
def records(fake_teachers, tmp_path_factory):
    out = {}
    for method, kw in (("ekd", {"branches": 3}), ("ce", {}), ("feed", {})):
        cfg = small_cfg(method=method, teachers=str(fake_teachers) if method != "ce" else None, epochs=1,
                        checkpoint_dir=str(tmp_path_factory.mktemp(f"ck-{method}")), **kw)
        fit(cfg, log=lambda s: None)
        out[method] = safe_load(sorted(Path(cfg.checkpoint_dir).glob("epoch_*"))[-1] / "student.pt", "student")
    return out


def test_ensemble_export_files_load_and_accuracy_rechecks(records, tmp_path):
    rec = records["ekd"]
    info = export_student(rec, branch="all", out=tmp_path / "e", log=lambda s: None)
    assert info["branch"] == "ensemble" and info["matches"]
    assert info["test_acc_rechecked"] == pytest.approx(rec["metrics"]["test_acc"], abs=1.0 / info["test_images"])
    sd = torch.load(tmp_path / "e" / "state_dict.pt", weights_only=True)
    assert sum(v.numel() for k, v in sd.items() if k.startswith("net.")) > 0
    meta = json.loads((tmp_path / "e" / "export.json").read_text())
    assert set(meta["files"]) == {"state_dict.pt", "model.pt2"}
    prog = load_exported(tmp_path / "e")
    assert prog(torch.rand(7, 3, 16, 16)).shape == (7, 10)  # dynamic batch


def test_best_branch_is_the_argmax_and_smaller(records, tmp_path):
    rec = records["ekd"]
    accs = [rec["metrics"][f"test_acc_b{i}"] for i in range(3)]
    best = resolve_branch(rec, "best")
    assert accs[best] == max(accs)
    info = export_student(rec, branch="best", out=tmp_path / "b", log=lambda s: None)
    assert info["branch"] == f"branch {best}"
    assert info["params"] < export_student(rec, branch="all", out=tmp_path / "a", log=lambda s: None)["params"]
    assert info["test_acc_logged"] == pytest.approx(accs[best])
    assert info["matches"]


def test_bad_branch_and_existing_out(records, tmp_path):
    with pytest.raises(KdrayError, match=r"branch 7 does not exist; allowed: best, all or 0..2"):
        export_student(records["ekd"], branch=7, out=tmp_path / "x", log=lambda s: None)
    with pytest.raises(KdrayError, match=r"allowed: best, all or 0..0"):
        export_student(records["ce"], branch=1, out=tmp_path / "y", log=lambda s: None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(KdrayError, match="exists and is not empty"):
        export_student(records["ce"], out=tmp_path / "full", log=lambda s: None)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_feed_export_drops_translators(records, tmp_path):
    rec = records["feed"]
    info = export_student(rec, out=tmp_path / "f", log=lambda s: None)
    plain = export_student(records["ce"], out=tmp_path / "c", log=lambda s: None)
    assert info["params"] == plain["params"] == rec["metrics"]["params"]
    assert not any("translator" in k or "ntl" in k.lower() for k in rec["state_dict"])


def test_latency_is_positive_and_finite(records):
    from kdray.export import deploy_module

    ms = measure_latency_ms(deploy_module(records["ce"]), 16, iters=5, warmup=1)
    assert ms > 0 and math.isfinite(ms)


def test_cli_export_from_student_file(records, tmp_path, capsys):
    from kdray.checkpoint import atomic_save
    from kdray.cli import main

    path = atomic_save(records["ekd"], tmp_path / "student.pt")
    code = main(["export", "--student", str(path), "--branch", "1", "--out", str(tmp_path / "o"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["branch"] == "branch 1" and out["matches"]
    code = main(["export", "--student", str(path), "--branch", "nine", "--out", str(tmp_path / "p")])
    assert code == 2 and "allowed: best, all or a branch number" in capsys.readouterr().err
