"""A refused `kdray train` leaves nothing behind: bad input (an unknown student, a data set that is
not there, a broken or hostile teacher set, a hostile checkpoint, bad option values, a data set that
fails in the first epoch) gets its one `kdray: error:` line and exit code 2, and the working
directory holds afterwards what it held before: no log file, no run folder, no MLflow run, not even
the working directory itself when there was none. Through the real CLI, with a real sqlite MLflow
store that already holds a run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import error_line, run_cli

FAKE = ["--dataset", "fake", "--image-size", "16", "--student", "resnet8", "--device", "cpu", "--epochs", "1"]


class _RunsCode:
    """A pickle payload that would create a marker file if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _tree(root: Path) -> dict:
    """Every path under ``root`` -> its size (None for a folder); {} when ``root`` does not exist."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[str(Path(dirpath, d).relative_to(root))] = None
        for f in filenames:
            p = Path(dirpath, f)
            out[str(p.relative_to(root))] = p.stat().st_size if not f.startswith("mlflow.db") else "db"
    return out


def _all_runs(work: Path) -> list:
    """Every run of every experiment in the working directory's MLflow store, deleted ones too."""
    if not (work / "mlflow.db").exists():
        return []
    import mlflow
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return [r.info.run_id for r in client.search_runs(experiments, run_view_type=ViewType.ALL, max_results=1000)]


@pytest.fixture(scope="module")
def earlier_workdir(tmp_path_factory):
    """A working directory as an earlier run leaves it: an MLflow store holding that run (in the
    experiment `kdray train` uses), a log file, a run folder; copied for each test."""
    from kdray.core.guards import stores_initialising
    from kdray.tracking.runs import finish_run, start_run
    from kdray.tracking.store import default_uri, experiment_id
    from kdray.training.config import RunConfig

    work = tmp_path_factory.mktemp("earlier") / "w"
    uri = default_uri(work)
    work.mkdir()
    with stores_initialising(work):  # as kdray makes its stores: .locks/ beside them
        exp_id = experiment_id(uri, "kdray", work)
    run_id = start_run(uri, exp_id, run_name="earlier", cfg=RunConfig(), kind="train")
    finish_run(uri, run_id, "completed")
    (work / "logs").mkdir()
    (work / "logs" / "earlier.log").write_text("an earlier run's log\n")
    (work / "runs" / "earlier").mkdir(parents=True)
    (work / "runs" / "earlier" / "student.pt").write_bytes(b"an earlier run's student")
    return work


@pytest.fixture
def teachers(tmp_path, fake_teachers):
    """A copy of the session's teacher set, for a test to damage."""
    out = tmp_path / "teachers"
    shutil.copytree(fake_teachers, out)
    return out


def _hostile_teachers(teachers: Path, marker: Path) -> Path:
    from kdray.core.io import sha256_file

    torch.save({"weight": _RunsCode(marker)}, teachers / "teacher_0.pt")
    manifest = json.loads((teachers / "manifest.json").read_text())
    manifest["teachers"][0]["sha256"] = sha256_file(teachers / "teacher_0.pt")  # its checksum "verifies"
    (teachers / "manifest.json").write_text(json.dumps(manifest))
    return teachers


def _hostile_checkpoint(folder: Path, marker: Path) -> Path:
    """A run folder whose latest checkpoint holds code (as --resume would continue from)."""
    epoch = folder / "checkpoints" / "epoch_0001"
    epoch.mkdir(parents=True)
    torch.save({"format": "kdray-checkpoint/1", "module": _RunsCode(marker)}, epoch / "checkpoint.pt")
    torch.save({"arch": "resnet8"}, epoch / "student.pt")
    return folder


def _fails_in_its_first_epoch(monkeypatch):
    """A data set that fails in the first batches of the first epoch (an image that does not decode,
    met once training has started): after the run's folder and MLflow run were made."""
    from kdray.core.errors import KdrayError

    def train_epoch(*args, **kwargs):
        raise KdrayError("imagefolder: /data/cls0/broken.jpg cannot be decoded (truncated JPEG); "
                         "fix or remove it, or pass --bad-images skip")

    monkeypatch.setattr("kdray.training.fit.train_epoch", train_epoch)


#: name -> (arguments after `train`, given tmp_path, the teachers' folder and a marker file; the error's text)
CASES = {
    "unknown student": (lambda d, t, m: ["--method", "ce", *FAKE, "--student", "resnet9"], "unknown model 'resnet9'"),
    "unknown data set": (lambda d, t, m: ["--method", "ce", *FAKE, "--dataset", "mnist"], "unknown dataset 'mnist'"),
    "missing image folder": (lambda d, t, m: ["--method", "ce", *FAKE, "--dataset", "imagefolder",
                                              "--data-dir", str(d / "no-such-tree")], "does not exist"),
    "image folder without classes": (lambda d, t, m: (d / "empty").mkdir() or [
        "--method", "ce", *FAKE, "--dataset", "imagefolder", "--data-dir", str(d / "empty")], "no class folders"),
    "missing cifar without download": (lambda d, t, m: ["--method", "ce", *FAKE, "--dataset", "cifar10",
                                                        "--data-dir", str(d / "no-cifar"), "--no-download"],
                                       "download is off"),
    "missing teacher set": (lambda d, t, m: ["--method", "kd", *FAKE, "--teachers", str(d / "no-teachers")],
                            "manifest.json not found"),
    "broken manifest": (lambda d, t, m: (t / "manifest.json").write_text("{not json") and [
        "--method", "kd", *FAKE, "--teachers", str(t)], "not a valid kdray teacher manifest"),
    "corrupt teacher file": (lambda d, t, m: (t / "teacher_1.pt").write_bytes(b"not a torch file") and [
        "--method", "kd", *FAKE, "--teachers", str(t)], "does not match the manifest"),
    "hostile teacher pickle": (lambda d, t, m: ["--method", "kd", *FAKE, "--teachers", str(_hostile_teachers(t, m))],
                               "could run code"),
    "hostile checkpoint on --resume": (lambda d, t, m: ["--method", "ce", *FAKE, "--resume",
                                                        "--out", str(_hostile_checkpoint(d / "run", m))],
                                       "could run code"),
    "non-finite lr": (lambda d, t, m: ["--method", "ce", *FAKE, "--set", "lr=nan"], "must be a finite float"),
    "negative --max-failures": (lambda d, t, m: ["--method", "ce", *FAKE, "--max-failures", "-1"],
                                "--max-failures -1 is out of range"),
    "zero --teacher-store-budget": (lambda d, t, m: ["--method", "kd", *FAKE, "--teachers", str(t),
                                                     "--teacher-store", "auto", "--teacher-store-budget", "0"],
                                    "--teacher-store-budget 0 is out of range"),
    "method without its teachers": (lambda d, t, m: ["--method", "ekd", *FAKE], "needs teachers"),
    "data failing in the first epoch": (None, "cannot be decoded"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_refused_train_leaves_the_working_directory_as_it_was(tmp_path, capsys, monkeypatch, teachers,
                                                                 earlier_workdir, case):
    work = tmp_path / "w"
    shutil.copytree(earlier_workdir, work)
    marker = tmp_path / "pwned"
    argv, expected = CASES[case]
    if argv is None:
        _fails_in_its_first_epoch(monkeypatch)
        argv = lambda d, t, m: ["--method", "ce", *FAKE]  # noqa: E731
    args = argv(tmp_path, teachers, marker)
    outside = _tree(tmp_path / "run")  # a --out folder the user made: as it was, too
    before, runs_before = _tree(work), _all_runs(work)
    assert len(runs_before) == 1
    code, out, err = run_cli(capsys, "--workdir", work, "train", *args, "--name", "refused")
    assert code == 2, err
    assert expected in error_line(err)
    lines = err.strip().splitlines()
    if CASES[case][0] is not None:  # refused at the door: nothing else said
        assert lines == [error_line(err)], err
    else:  # refused in its first epoch: the error comes last
        assert lines[-1] == error_line(err) and "Traceback" not in err, err
    assert "weights_only=False" not in err
    assert not marker.exists()
    assert _tree(work) == before
    assert _all_runs(work) == runs_before  # no new run, not even a deleted one
    assert _tree(tmp_path / "run") == outside


@pytest.mark.parametrize("case", ["unknown student", "missing image folder", "hostile teacher pickle",
                                  "data failing in the first epoch"])
def test_a_refused_train_creates_no_working_directory(tmp_path, capsys, monkeypatch, teachers, case):
    """Without a working directory, a refused run makes none (nor its MLflow store, logs or runs)."""
    work = tmp_path / "fresh" / "w"
    argv, expected = CASES[case]
    if argv is None:
        _fails_in_its_first_epoch(monkeypatch)
        argv = lambda d, t, m: ["--method", "ce", *FAKE]  # noqa: E731
    code, _, err = run_cli(capsys, "--workdir", work, "train", *argv(tmp_path, teachers, tmp_path / "pwned"))
    assert code == 2 and expected in error_line(err), err
    if case == "data failing in the first epoch":
        # refused after its MLflow run was made: the run is gone; the store it needed stays, empty
        assert _all_runs(work) == []
        assert sorted(p.name for p in work.iterdir()) == [".locks", "mlflow.db"]
    else:
        assert not (tmp_path / "fresh").exists()


def test_a_refused_resume_keeps_the_run_folder_and_its_log(tmp_path, capsys, monkeypatch):
    """A run that began stays whole: a later --resume refused at the door (its data gone) removes
    nothing of it, and its log file is as it was."""
    work = tmp_path / "w"
    args = ["--workdir", work, "train", "--method", "ce", *FAKE, "--no-track", "--name", "kept"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    (work / "logs").mkdir(exist_ok=True)
    (work / "logs" / "kept.log").write_text("what the first attempt logged\n")
    before = _tree(work)
    code, _, err = run_cli(capsys, *args, "--resume", "--dataset", "imagefolder", "--data-dir", tmp_path / "gone")
    assert code == 2 and "does not exist" in error_line(err), err
    assert _tree(work) == before
