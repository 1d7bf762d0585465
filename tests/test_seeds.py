"""Seeds as a first-class axis (issue 25 item 2), through the real CLI on digits with a real sqlite
MLflow store: `kdray train --seeds` makes one group run with one child per seed and the mean / std
of their scores; bad seed lists are one line and create nothing; a failed seed fails the group;
Ctrl-C (a real SIGINT) records the group interrupted and `--resume` trains only what is missing;
`kdray best --retrain --seeds` re-trains the best run's exact configuration; kdray.api.train_seeds."""

import contextlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import error_line, run_cli

from kdray.cli import main

mlflow = pytest.importorskip("mlflow")

# one epoch of resnet8 on a quarter of digits at 16 px, fp32: about a second a seed on 2 cores
DIGITS = ["--method", "ce", "--dataset", "digits", "--image-size", "16", "--device", "cpu", "--amp", "off",
          "--train-fraction", "0.25", "--epochs", "1"]


def store(workdir: Path):
    return mlflow.MlflowClient(f"sqlite:///{workdir.resolve() / 'mlflow.db'}")


def runs_of(workdir: Path, experiment: str) -> list:
    c = store(workdir)
    return c.search_runs([c.get_experiment_by_name(experiment).experiment_id], max_results=100)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """`kdray train --seeds 0,1,2` once: its workdir, stdout, stderr and the group's runs."""
    wd = tmp_path_factory.mktemp("kdray-work")
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", "")  # the embedded default: sqlite in the workdir
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--workdir", str(wd), "train", *DIGITS, "--seeds", "0,1,2", "--experiment", "seeds",
                         "--name", "grp"])
    assert code == 0, err.getvalue()
    runs = runs_of(wd, "seeds")
    (group,) = [r for r in runs if r.data.tags["kdray.kind"] == "seeds"]
    children = sorted((r for r in runs if r.data.tags["kdray.kind"] == "train"), key=lambda r: r.info.run_name)
    return {"workdir": wd, "stdout": out.getvalue(), "stderr": err.getvalue(), "group": group, "children": children}


def test_train_seeds_makes_one_group_with_a_child_per_seed(seeded):
    group, children = seeded["group"], seeded["children"]
    gid = group.info.run_id
    assert len(runs_of(seeded["workdir"], "seeds")) == 4  # the group and its three seeds, nothing else
    assert group.info.run_name == "grp" and group.info.status == "FINISHED"
    assert group.data.tags["kdray.state"] == "completed" and group.data.tags["kdray.seeds"] == "0,1,2"
    assert [c.info.run_name for c in children] == ["grp-s0", "grp-s1", "grp-s2"]
    for seed, child in enumerate(children):
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == gid and tags["kdray.seed_group"] == gid
        assert tags["kdray.kind"] == "train" and tags["kdray.state"] == "completed"
        assert child.data.params["seed"] == str(seed)
        assert {k: v for k, v in child.data.params.items() if k != "seed"} == {
            k: v for k, v in group.data.params.items() if k != "seeds"}
        assert tags["kdray.run_folder"] == f"runs/grp/s{seed}"
        assert (seeded["workdir"] / "runs" / "grp" / f"s{seed}" / "student.pt").is_file()
    assert "seed" not in group.data.params and group.data.params["seeds"] == "0,1,2"
    m = group.data.metrics
    for name in ("test_acc", "val_acc"):
        values = [c.data.metrics[name] for c in children]
        assert m[f"{name}_mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
        assert m[f"{name}_std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert m["n"] == 3
    note = group.data.tags["mlflow.note.content"]
    assert note.startswith("Completed: 3 seed(s) finished.") and "| seed | run | val_acc | test_acc |" in note
    assert all(c.info.run_id in note for c in children)
    folder = json.loads((seeded["workdir"] / "runs" / "grp" / "group.json").read_text())
    assert folder["run_id"] == gid and folder["seeds"] == [0, 1, 2]


def test_train_seeds_console(seeded):
    err, out = seeded["stderr"], seeded["stdout"]
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("seed ")] == [
        "seed 1/3", "seed 2/3", "seed 3/3"]
    lines = out.splitlines()
    for seed, child in enumerate(seeded["children"]):
        assert f"  seed {seed}: test acc {child.data.metrics['test_acc']:.4f}" in out and child.info.run_id in out
    (summary,) = [ln for ln in lines if "mean ± std over 3 seeds" in ln]
    assert f"test acc {seeded['group'].data.metrics['test_acc_mean']:.4f} ± " in summary and "val acc" in summary
    assert f"kdray compare --run-id {seeded['group'].info.run_id}" in out


@pytest.mark.parametrize("value", ["0,x", "0,1,0", "", "-1", "1,,2"])
def test_bad_seeds_are_one_line_and_create_nothing(capsys, tmp_path, value):
    code, _, err = run_cli(capsys, "--workdir", tmp_path / "w", "train", *DIGITS, f"--seeds={value}")
    assert code == 2
    assert "allowed: a comma-separated list of distinct whole numbers >= 0" in error_line(err)
    assert not (tmp_path / "w").exists()


def test_seeds_with_seed_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--workdir", tmp_path / "w", "train", *DIGITS, "--seeds", "0,1", "--seed", "3")
    assert code == 2 and "--seeds and --seed exclude each other" in error_line(err)
    assert not (tmp_path / "w").exists()


def test_a_failed_seed_fails_the_group(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--workdir", tmp_path, "train", *DIGITS, "--seeds", "0,1", "--lr", "1e12",
                           "--experiment", "nan", "--name", "bad")
    assert code == 2 and "non-finite" in error_line(err)
    runs = runs_of(tmp_path, "nan")
    (group,) = [r for r in runs if r.data.tags["kdray.kind"] == "seeds"]
    (child,) = [r for r in runs if r.data.tags["kdray.kind"] == "train"]  # seed 1 never started
    assert group.info.status == "FAILED" and group.data.tags["kdray.state"] == "failed"
    assert group.data.tags["kdray.failure_reason"].startswith("seed 0 failed: ")
    assert "non-finite" in group.data.tags["kdray.failure_reason"]
    assert child.data.tags["kdray.state"] == "failed" and child.data.tags["kdray.seed_group"] == group.info.run_id


def test_resume_after_a_real_interrupt_trains_only_what_is_missing(capsys, tmp_path):
    """SIGINT while seed 1 trains: the group and seed 1's run are recorded interrupted; --resume
    skips seed 0, continues seed 1 from its checkpoint, in the same group run."""
    argv = ["--workdir", str(tmp_path), "train", *DIGITS, "--epochs", "5", "--seeds", "0,1", "--experiment", "r",
            "--name", "g"]
    kdray = Path(sys.executable).with_name("kdray")
    proc = subprocess.Popen([str(kdray), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    first = tmp_path / "runs" / "g" / "s1" / "checkpoints" / "epoch_0001" / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT during seed 1" in err and "--resume" in err
    (group,) = [r for r in runs_of(tmp_path, "r") if r.data.tags["kdray.kind"] == "seeds"]
    assert group.data.tags["kdray.state"] == "interrupted" and group.info.status == "KILLED"

    code, out, err = run_cli(capsys, *argv, "--resume", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["run_id"] == group.info.run_id and result["skipped"] == [0]
    assert "seed 0 finished earlier" in err and "resuming from" in err and "epoch 1/5" not in err
    runs = runs_of(tmp_path, "r")
    group = store(tmp_path).get_run(group.info.run_id)
    assert group.data.tags["kdray.state"] == "completed" and group.data.metrics["n"] == 2
    children = [(r.data.params["seed"], r.data.tags["kdray.state"]) for r in runs
                if r.data.tags["kdray.kind"] == "train"]
    assert sorted(children) == [("0", "completed"), ("1", "completed"), ("1", "interrupted")]
    assert len([r for r in runs if r.data.tags["kdray.kind"] == "seeds"]) == 1


def test_best_retrain_retrains_the_best_runs_configuration(capsys, seeded):
    wd = seeded["workdir"]
    code, out, err = run_cli(capsys, "--workdir", wd, "best", "--experiment", "seeds", "--retrain", "--seeds", "0,1",
                             "--json")
    assert code == 0, err
    result = json.loads(out)
    (item,) = result["retrained"]  # --retrain alone re-trains the winner only
    best = max(seeded["children"], key=lambda r: r.data.metrics["val_acc"])
    assert item["source"]["run_id"] == best.info.run_id
    c = store(wd)
    group = c.get_run(item["group"]["run_id"])
    assert group.data.tags["kdray.retrain_of"] == best.info.run_id
    assert group.info.run_name == f"retrain-{best.info.run_name}" and group.data.tags["kdray.state"] == "completed"
    children = c.search_runs([group.info.experiment_id], f"tags.`kdray.seed_group` = '{group.info.run_id}'")
    assert sorted(r.data.params["seed"] for r in children) == ["0", "1"]
    source = {k: v for k, v in best.data.params.items() if k != "seed"}
    for child in children:
        assert {k: v for k, v in child.data.params.items() if k != "seed"} == source
    assert group.data.metrics["test_acc_mean"] == pytest.approx(
        statistics.mean(r.data.metrics["test_acc"] for r in children), abs=1e-12)
    assert all(r.data.tags["kdray.retrain_of"] == best.info.run_id for r in children)
    # the same command again: the same source (a retrain's runs are no candidates, however they
    # scored), its earlier group continued, nothing trained again
    code, out, err = run_cli(capsys, "--workdir", wd, "best", "--experiment", "seeds", "--retrain", "--seeds", "0,1",
                             "--json")
    assert code == 0, err
    (again,) = json.loads(out)["retrained"]
    assert again["source"]["run_id"] == best.info.run_id and again["group"]["run_id"] == group.info.run_id
    assert "continuing the earlier retrain" in err and err.count("finished earlier") == 2
    assert len(c.search_runs([group.info.experiment_id], f"tags.`kdray.seed_group` = '{group.info.run_id}'")) == 2


def test_retrain_needs_seeds_and_a_student(capsys, seeded):
    wd = seeded["workdir"]
    code, _, err = run_cli(capsys, "--workdir", wd, "best", "--experiment", "seeds", "--retrain")
    assert code == 2 and "--retrain needs --seeds" in error_line(err)
    c = store(wd)
    exp = c.create_experiment("nostudent")
    run = c.create_run(exp, run_name="bare", tags={"kdray.kind": "train", "kdray.state": "completed"})
    c.log_metric(run.info.run_id, "val_acc", 0.5)
    c.set_terminated(run.info.run_id)
    code, _, err = run_cli(capsys, "--workdir", wd, "best", "--experiment", "nostudent", "--retrain", "--seeds", "0")
    assert code == 2 and f"run {run.info.run_id} has no student/student.pt artifact" in error_line(err)
    assert len(c.search_runs([exp])) == 1  # nothing trained


def test_api_train_seeds(tmp_path, monkeypatch):
    import kdray.api

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    group = kdray.api.train_seeds({"method": "ce", "dataset": "digits", "image_size": 16, "device": "cpu",
                                   "amp": "off", "train_fraction": 0.25, "epochs": 1}, seeds=[3], workdir=tmp_path,
                                  experiment="api", name="one", log=lambda line: None)
    assert [r.config.seed for r in group.runs] == [3] and group.runs[0].run_id
    summary = group.summary()
    assert summary["n"] == 1 and summary["test_acc_mean"] == group.runs[0].metrics["test_acc"]
    assert "test_acc_std" not in summary  # one seed has no spread
    parent = store(tmp_path).get_run(group.run_id)
    assert parent.data.tags["kdray.kind"] == "seeds" and "test_acc_std" not in parent.data.metrics
