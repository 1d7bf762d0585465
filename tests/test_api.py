"""The Python API (kdray.train / kdray.load_student / kdray.make_config), in process, against a
real sqlite MLflow store. (kdray.sweep runs from an installed wheel in test_package.py.)"""

from __future__ import annotations

import pytest
import torch

import kdray
from kdray.core.errors import KdrayError

CFG = dict(dataset="fake", image_size=16, student="resnet8", epochs=2, batch_size=64, eval_batch_size=256,
           lr=0.05, device="cpu")


def test_train_from_a_dict_returns_student_metrics_and_mlflow_run(tmp_path, fake_teachers):
    lines = []
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = kdray.train({**CFG, "method": "ekd", "branches": 2}, teachers=str(fake_teachers), workdir=tmp_path,
                      tracking_uri=uri, experiment="api", log=lines.append)
    assert set(run.metrics) >= {"test_acc", "val_acc", "val_acc_best_branch", "params"}
    assert 0.0 <= run.metrics["test_acc"] <= 1.0
    assert run.config.method == "ekd" and run.config.teachers == str(fake_teachers)
    assert run.student_path.startswith(str(tmp_path / "runs"))
    assert any(line.startswith("epoch 2/2") for line in lines)  # progress as on the CLI
    mlrun = run.mlflow_run
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_id == run.run_id
    assert mlrun.data.metrics["test_acc"] == pytest.approx(run.metrics["test_acc"])

    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = run.student(x)
    by_id = kdray.load_student(run.run_id, tracking_uri=uri)
    by_path = kdray.load_student(run.student_path)
    with torch.no_grad():
        for loaded in (by_id, by_path):
            assert torch.equal(loaded.student(x), want)
    assert want.shape == (3, 10)  # images -> logits (EKD: the ensemble of the branches)
    with torch.no_grad():
        branches = [run.branch(b)(x) for b in range(2)]
    assert torch.allclose((branches[0] + branches[1]) / 2, want, atol=1e-5)
    assert by_id.classes == run.classes and by_id.metrics["test_acc"] == pytest.approx(run.metrics["test_acc"])


def test_train_untracked_with_overrides_and_a_run_config(tmp_path):
    from kdray.training.config import RunConfig

    run = kdray.train(RunConfig().replace(**CFG), method="ce", epochs=1, track=False, out=tmp_path / "run",
                      log=lambda s: None)
    assert run.run_id is None and run.mlflow_run is None
    assert run.config.epochs == 1 and (tmp_path / "run" / "student.pt").is_file()
    with pytest.raises(KdrayError, match="holds an earlier run"):  # never replaces a run folder
        kdray.train(CFG, method="ce", epochs=1, track=False, out=tmp_path / "run", log=lambda s: None)


def test_make_config_rejects_bad_input_with_one_line():
    with pytest.raises(KdrayError, match="unknown key 'epoch'"):
        kdray.make_config({"epoch": 3})
    with pytest.raises(KdrayError, match="config must be a RunConfig, a dict or a YAML path"):
        kdray.make_config(42)
    with pytest.raises(KdrayError, match="needs teachers"):
        kdray.train({**CFG, "method": "kd"}, track=False)


def test_load_student_missing_file():
    with pytest.raises(KdrayError, match="no such student file"):
        kdray.load_student("nowhere/student.pt")


def test_import_kdray_stays_light():
    import subprocess
    import sys

    code = "import sys, kdray; print(sorted(m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_sweep_takes_exactly_the_sweep_options_and_names_them_on_a_typo(tmp_path):
    with pytest.raises(KdrayError, match=r"unknown sweep option 'sample'; allowed: samples, concurrency, .*, "
                                         r"teacher_store_budget, workdir, track, tracking_uri, log"):
        kdray.sweep("quick", sample=3, workdir=tmp_path, track=False, log=lambda s: None)
    assert not (tmp_path / "spaces").exists()  # refused before anything is written


def test_each_sweep_option_is_one_tune_flag_with_its_default():
    """SweepOptions declares every `kdray tune` option once: the parser's flags and defaults come from it."""
    from kdray.cli.parser import build_parser
    from kdray.tune.options import SweepOptions

    args = build_parser().parse_args(["tune", "--space", "quick"])
    assert SweepOptions(**{n: getattr(args, n) for n in SweepOptions.names()}) == SweepOptions()
    args = build_parser().parse_args(["tune", "--space", "quick", "--no-teacher-store", "--teacher-store", "D",
                                      "--samples", "3", "--gpus-per-worker", "0.5", "--resume"])
    picked = SweepOptions(**{n: getattr(args, n) for n in SweepOptions.names()})
    assert picked == SweepOptions(teacher_store=False, teacher_store_dir="D", samples=3, gpus_per_worker=0.5,
                                  resume=True)


def test_tracking_states_are_frozen_and_pickle():
    """They cross stages and processes (a trial's tracking state goes to Ray's trial processes)."""
    import dataclasses
    import pickle

    from kdray.tracking.state import RunHandle, SweepTracking, TrackingSettings

    for value in (TrackingSettings("sqlite:///m.db", "e", "/w"), RunHandle("http://h:5000", "r1", "3"),
                  SweepTracking("http://h:5000", "3", "p1", teacher_archs=("resnet20",), teacher_store="off")):
        assert pickle.loads(pickle.dumps(value)) == value
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.uri = "elsewhere"
