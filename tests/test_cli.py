"""The kdray command line: help texts, JSON output, and one clear line for every bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import error_line, run_cli

from kdray.cli import main
from kdray.cli.parser import build_parser

FAST = ["--dataset", "fake", "--image-size", "16", "--epochs", "1", "--device", "cpu"]


def test_every_option_has_help():
    parser = build_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if action.choices and isinstance(action.choices, dict):
                stack.extend(action.choices.values())
            elif action.dest != "help":
                assert action.help, f"{p.prog}: option {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--method", "bogus", *FAST], "unknown method 'bogus'; allowed: avg_kd, ce, ekd, feed, kd, sfeed"),
        (["train", "--method", "ce", "--student", "resnet9000", *FAST], "unknown model 'resnet9000'"),
        (["train", "--method", "ce", *FAST, "--dataset", "mnist"], "unknown dataset 'mnist'"),
        (
            ["train", "--method", "ce", *FAST, "--set", "temprature=3"],
            "unknown key 'temprature' (did you mean 'temperature'?)",
        ),
        (["train", "--method", "ce", *FAST, "--branches", "12"], "branches=12 is out of range; allowed: 1..8"),
        (["train", "--method", "kd", *FAST], "needs teachers"),
    ],
)
def test_bad_input_one_line_nonzero(capsys, tmp_path, argv, needle):
    code, out, err = run_cli(capsys, "--workdir", str(tmp_path), *argv)
    assert code == 2
    assert needle in error_line(err)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("student.pt"))


def test_missing_cifar_offline(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--method", "ce", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                           "--no-download", "--epochs", "1")
    assert code == 2
    line = error_line(err)
    assert "cifar10" in line and str(tmp_path) in line


def test_config_file_unknown_key(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: ce\nlearning_rate: 0.1\n")
    code, _, err = run_cli(capsys, "train", "--config", str(cfg), *FAST)
    assert code == 2
    line = error_line(err)
    assert str(cfg) in line and "'learning_rate'" in line and "allowed keys" in line


def test_config_file_cannot_execute_code(capsys, tmp_path):
    cfg = tmp_path / "evil.yaml"
    cfg.write_text("method: !!python/object/apply:os.system ['echo pwned']\n")
    code, _, err = run_cli(capsys, "train", "--config", str(cfg), *FAST)
    assert code == 2 and "malformed YAML" in error_line(err)


def test_teachers_with_other_classes(capsys, tmp_path, fake_teachers):
    code, _, err = run_cli(capsys, "train", "--method", "kd", "--teachers", str(fake_teachers), "--dataset", "digits",
                           "--image-size", "16", "--epochs", "1", "--device", "cpu")
    assert code == 2
    assert "were trained on 'fake'" in error_line(err) and "dataset has classes" in error_line(err)


def test_corrupt_teacher_file(capsys, tmp_path, fake_teachers):
    bad = tmp_path / "teachers"
    shutil.copytree(fake_teachers, bad)
    blob = bytearray((bad / "teacher_1.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / "teacher_1.pt").write_bytes(bytes(blob))
    code, _, err = run_cli(capsys, "train", "--method", "avg_kd", "--teachers", str(bad), *FAST)
    assert code == 2 and "teacher_1.pt is corrupt" in error_line(err)
    code, _, err = run_cli(capsys, "teachers", "show", str(bad))
    assert code == 2 and "corrupt" in error_line(err)


def test_train_json_and_resume(capsys, tmp_path, fake_teachers):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--method", "ekd", "--branches", "2", "--teachers",
                                str(fake_teachers), *FAST, "--epochs", "2", "--out", str(out), "--json")
    assert code == 0
    result = json.loads(stdout)
    assert {"test_acc", "val_acc", "test_acc_b0", "test_acc_best_branch", "student_path"} <= set(result)
    assert Path(result["student_path"]).is_file()
    assert "epoch 1/2" in err and "epoch 2/2" in err  # progress lines on stderr
    code, stdout, err = run_cli(capsys, "train", "--method", "ekd", "--branches", "2", "--teachers",
                                str(fake_teachers), *FAST, "--epochs", "3", "--out", str(out), "--resume", "--json")
    assert code == 0 and "resuming from" in err
    assert json.loads(stdout)["epoch"] == 3
    assert "epoch 1/3" not in err and "epoch 3/3" in err


def test_console_script_teachers_and_train(tmp_path):
    """The installed `kdray` entry point, as a user runs it."""
    kdray = Path(sys.executable).with_name("kdray")
    teachers = tmp_path / "t"
    subprocess.run([str(kdray), "teachers", "train", "--arch", "resnet8", "--count", "2", *FAST, "--out",
                    str(teachers)], check=True, capture_output=True, text=True)
    shown = subprocess.run([str(kdray), "teachers", "show", str(teachers), "--json"], check=True,
                           capture_output=True, text=True)
    assert len(json.loads(shown.stdout)["teachers"]) == 2
    r = subprocess.run([str(kdray), "train", "--method", "feed", "--teachers", str(teachers), *FAST, "--out",
                        str(tmp_path / "run"), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "loss_feed" in json.loads(r.stdout)


def test_teachers_train_is_tracked_as_runs(tmp_path, capsys):
    """Each teacher is an MLflow run (kind teacher) of the kdray-teachers experiment, with its
    epochs' metrics and its student file; the manifest names the run."""
    import mlflow

    rc = main(["teachers", "train", "--dataset", "fake", "--image-size", "16", "--device", "cpu", "--epochs", "2",
               "--count", "2", "--arch", "resnet8", "--out", str(tmp_path / "t"), "--json",
               "--workdir", str(tmp_path / "w")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    manifest = json.loads(out)
    client = mlflow.MlflowClient(f"sqlite:///{(tmp_path / 'w').resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdray-teachers")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(t["mlflow_run_id"] for t in manifest["teachers"])
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["kdray.kind"] == "teacher"
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 2
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["student"]
