"""MLflow tracking of `kdray train`, `kdray best` (+ registry) and `kdray export`, on a real sqlite
store in the test's working directory, and every bad input the issue names."""

import json
import socket

import pytest
from conftest import error_line, run_cli

from kdray.cli import main

mlflow = pytest.importorskip("mlflow")

FAST = ["--dataset", "fake", "--image-size", "16", "--device", "cpu", "--batch-size", "64"]


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more
    return port


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, fake_teachers):
    """Two tracked `kdray train` runs (ce, and ekd with 2 branches) in one sqlite store."""
    import contextlib
    import io

    wd = tmp_path_factory.mktemp("kdray-work")
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", "")  # the embedded default: sqlite in the workdir
        for method, extra in (("ce", []), ("ekd", ["--branches", "2", "--teachers", str(fake_teachers)])):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = main(["--workdir", str(wd), "train", "--method", method, *FAST, "--epochs", "3",
                             "--experiment", "unit", "--name", f"{method}-run", "--json", *extra])
            assert code == 0
            results[method] = json.loads(out.getvalue().strip().splitlines()[-1])
    return {"workdir": wd, "uri": f"sqlite:///{wd.resolve() / 'mlflow.db'}", "runs": results}


def test_train_run_is_tracked(tracked):
    c = mlflow.MlflowClient(tracked["uri"])
    summary = tracked["runs"]["ekd"]
    run = c.get_run(summary["run_id"])
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert c.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["kdray.state"] == "completed" and tags["kdray.kind"] == "train"
    assert tags["kdray.method"] == "ekd" and tags["kdray.dataset"] == "fake"
    assert tags["kdray.teacher_archs"] == "resnet8,resnet14"
    assert tags["mlflow.note.content"].startswith("Completed after epoch 3: val_acc ")
    # the config as params: EKD's own hyperparameters, not every method's; nothing of the runtime
    assert params["branches"] == "2" and params["method"] == "ekd" and params["temperature"] == "4"
    assert {"feat_weight", "ens_ce_weight", "split_stage"} <= set(params)
    assert not {"feed_weight", "generations", "checkpoint_dir", "resume", "branch_alpha"} & set(params)
    assert not [v for v in params.values() if str(tracked["workdir"]) in v]
    # per-epoch histories of every loss term, accuracies (ensemble and branches), lr, time, images/s
    for key in ("loss_ce", "loss_kd", "loss_ens_ce", "val_acc", "val_acc_b0", "val_acc_b1", "val_acc_best_branch",
                "lr", "epoch_time_s", "images_per_s", "train_acc"):
        hist = c.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in hist) == [1, 2, 3], key
    assert not {"epochs", "generation", "generations", "total_epochs", "branch_params", "epoch_wall_s"} & set(metrics)
    assert metrics["test_acc"] == pytest.approx(summary["test_acc"])
    assert metrics["latency_ms"] > 0
    arts = {a.path for a in c.list_artifacts(run.info.run_id, "student")} | {
        a.path for a in c.list_artifacts(run.info.run_id, "teachers")}
    assert arts == {"student/student.pt", "teachers/manifest.json"}
    assert run.inputs.dataset_inputs[0].dataset.name == "fake"
    (model,) = c.search_logged_models([run.info.experiment_id],
                                      filter_string=f"source_run_id = '{run.info.run_id}'")
    assert model.name == "ekd-resnet8" and model.status.value == "READY"
    assert {m.key for m in model.metrics} >= {"val_acc", "test_acc", "latency_ms"}
    # artifacts live beside the local store, not in ./mlruns of the caller
    assert (tracked["workdir"] / "mlartifacts").is_dir()


def test_best_table_ranks_by_metric(capsys, tracked):
    code, out, _ = run_cli(capsys, "--workdir", str(tracked["workdir"]), "best", "--experiment", "unit",
                           "--metric", "test_acc", "--json")
    assert code == 0
    res = json.loads(out)
    accs = [r["test_acc"] for r in res["runs"]]
    assert accs == sorted(accs, reverse=True) and len(accs) == 2
    # --max-params keeps only the single-branch student
    small = min(r["params"] for r in res["runs"])
    code, out, _ = run_cli(capsys, "--workdir", str(tracked["workdir"]), "best", "--experiment", "unit",
                           "--max-params", str(int(small)), "--json")
    assert code == 0
    assert [r["method"] for r in json.loads(out)["runs"]] == ["ce"]


def test_register_champion_leaves_the_run_alone_and_takes_raw_images(capsys, tracked, tmp_path, monkeypatch):
    import torch

    from kdray.core.io import safe_load
    from kdray.data.sources import load_data
    from kdray.training.config import from_dict

    c = mlflow.MlflowClient(tracked["uri"])
    run_id = tracked["runs"]["ekd"]["run_id"]
    before = c.get_run(run_id)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "--workdir", str(tracked["workdir"]), "best", "--experiment", "unit",
                             "--metric", "test_acc", "--register", "unit-student", "--json")
    assert code == 0, err
    reg = json.loads(out)["registered"]
    assert reg["model_uri"] == "models:/unit-student@champion" and reg["run_id"] == run_id
    assert not list(tmp_path.iterdir())  # no ./mlflow.db from MLflow's global defaults
    after = c.get_run(run_id)
    assert (after.info.start_time, after.info.end_time, after.info.status) == (
        before.info.start_time, before.info.end_time, before.info.status)
    assert after.data.to_dictionary() == before.data.to_dictionary()

    version = c.get_model_version_by_alias("unit-student", "champion")
    assert version.tags["input"].startswith("uint8 [N, 16, 16, 3]") and version.tags["dataset"] == "fake"
    assert version.tags["test_acc"] == f"{after.data.metrics['test_acc']:.4f}" and "val_acc" in version.tags
    assert version.tags["teachers"] == "resnet8,resnet14" and version.description
    mlflow.set_tracking_uri(tracked["uri"])
    try:
        model = mlflow.pytorch.load_model("models:/unit-student@champion")
    finally:
        mlflow.set_tracking_uri("")
    record = safe_load(c.download_artifacts(run_id, "student/student.pt", str(tmp_path)), "student")
    data = load_data(from_dict(record["config"]))
    images = data.test.x.permute(0, 2, 3, 1).contiguous()  # the raw layout: uint8 HWC
    with torch.no_grad():
        pred = model(images).argmax(1)
    acc = int((pred == data.test.y).sum()) / len(data.test.y)
    assert acc == pytest.approx(after.data.metrics["test_acc"], abs=1e-9)


def test_readme_load_line_works_as_written(capsys, tracked, tmp_path):
    """The README's `python -c ...load_model(...)` line, verbatim, from a folder holding the
    workdir as `kdray-work` (as after `make demo`): it loads the champion and leaves no mlflow.db."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if "load_model('models:/digits-student@champion')" in ln]
    snippet = re.fullmatch(r'python -c "(.*)"', line.split("  #")[0].strip()).group(1)
    code, _, err = run_cli(capsys, "--workdir", str(tracked["workdir"]), "best", "--experiment", "unit",
                           "--register", "digits-student")
    assert code == 0, err
    (tmp_path / "kdray-work").symlink_to(tracked["workdir"])
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([sys.executable, "-c", snippet + "; print(type(m).__name__)"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["kdray-work"]


def _param(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return None if v == "None" else v


def test_export_run(capsys, tracked, tmp_path):
    run_id = tracked["runs"]["ekd"]["run_id"]
    code, out, err = run_cli(capsys, "--workdir", str(tracked["workdir"]), "export", "--run", run_id,
                             "--branch", "all", "--out", str(tmp_path / "exp"), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["test_acc_rechecked"] == pytest.approx(tracked["runs"]["ekd"]["test_acc"], abs=1e-9)
    assert (tmp_path / "exp" / "state_dict.pt").is_file()


def test_failed_run_is_tagged_with_reason(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--workdir", str(tmp_path), "train", "--method", "ce", *FAST, "--epochs", "2",
                           "--lr", "1e12", "--experiment", "nan")
    assert code == 2 and "non-finite" in error_line(err)
    c = mlflow.MlflowClient(f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    exp = c.get_experiment_by_name("nan")
    (run,) = c.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["kdray.state"] == "failed"
    assert "non-finite" in run.data.tags["kdray.failure_reason"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["best", "--experiment", "no-such-experiment"], "MLflow experiment 'no-such-experiment' does not exist"),
        (["export", "--run", "0123456789abcdef0123456789abcdef", "--out", "X"],
         "MLflow run '0123456789abcdef0123456789abcdef' does not exist"),
        (["best", "--experiment", "unit", "--max-params", "1"], "no run in 'unit' has params <= 1; the smallest has"),
        (["best", "--experiment", "unit", "--max-latency-ms", "0.000001"], "no run in 'unit' has latency_ms <= 1e-06"),
        (["best", "--experiment", "unit", "--metric", "nonsense"], "no run in 'unit' logged metric 'nonsense'"),
    ],
)
def test_bad_tracking_input(capsys, tracked, argv, needle, tmp_path):
    argv = [a if a != "X" else str(tmp_path / "x") for a in argv]
    code, _, err = run_cli(capsys, "--workdir", str(tracked["workdir"]), *argv)
    assert code == 2
    assert needle in error_line(err)
    assert not (tmp_path / "x").exists()


def test_unreachable_tracking_server_stops_before_training(capsys, tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    code, _, err = run_cli(capsys, "--workdir", str(tmp_path), "train", "--method", "ce", *FAST, "--epochs", "1",
                           "--tracking-uri", uri)
    assert code == 2
    assert f"the MLflow tracking server at {uri} does not answer" in error_line(err)
    assert not (tmp_path / "runs").exists()
    code, _, err = run_cli(capsys, "--workdir", str(tmp_path), "best", "--experiment", "x", "--tracking-uri", uri)
    assert code == 2 and "does not answer" in error_line(err)


def test_no_track_writes_no_store(capsys, tmp_path):
    code, _, _ = run_cli(capsys, "--workdir", str(tmp_path), "train", "--method", "ce", *FAST, "--epochs", "1",
                         "--no-track")
    assert code == 0
    assert not (tmp_path / "mlflow.db").exists()
