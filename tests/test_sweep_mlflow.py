"""A real sweep tracked by a real `mlflow server` on loopback: `kdray tune` (local Ray, trials logging
from their Ray workers over HTTP), then MlflowClient checks of the parent and every child run,
the MLflow UI in headless Chromium, and `kdray best --register` + `load_model` of the champion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlflow_support import artifacts_dir, check_experiment_page, mlflow_server  # noqa: F401

pytestmark = pytest.mark.mlflow_server

SPACE = """\
name: trk
metric: val_acc
mode: max
samples: 3
base: {dataset: fake, image_size: 16, method: ekd, student: resnet8, epochs: 3, batch_size: 64, device: cpu}
teachers: {arch: [resnet8], count: 2, epochs: 1}
params:
  temperature: {type: float, low: 1, high: 10, log: true}
  branches: {type: int, low: 1, high: 2}
per_branch:
  branch_alpha: {type: float, low: 0.3, high: 1.0}
scheduler: {grace_period: 1, reduction_factor: 2}
"""


def kdray(*argv, env=None, timeout=900) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("kdray")
    return subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "MLFLOW_TRACKING_URI": "", **(env or {})})


@pytest.fixture(scope="module")
def sweep(mlflow_server, tmp_path_factory):  # noqa: F811
    wd = tmp_path_factory.mktemp("sweep-work")
    space = wd / "trk.yaml"
    space.write_text(SPACE)
    proc = kdray("--workdir", str(wd), "tune", "--space", str(space), "--concurrency", "1",
                 "--tracking-uri", mlflow_server.url, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"result": json.loads(proc.stdout.strip().splitlines()[-1]), "workdir": wd, "url": mlflow_server.url,
            "stderr": proc.stderr}


def test_parent_and_every_child_run(sweep):
    import mlflow

    from kdray.config import RunConfig

    c = mlflow.MlflowClient(sweep["url"])
    exp = c.get_experiment_by_name("trk")
    assert exp is not None
    runs = c.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("kdray.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("kdray.kind") == "trial"]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    pt = parent.data.tags
    assert parent.info.status == "FINISHED" and pt["kdray.state"] == "completed"
    assert pt["kdray.study_name"] == "trk" and pt["kdray.optuna_storage"].startswith("sqlite:///")
    assert {"version.kdray", "version.ray", "version.torch"} <= set(pt)
    p_arts = {a.path for d in ("space", "config", "plots", "teachers") for a in c.list_artifacts(parent.info.run_id, d)}
    assert {"space/trk.yaml", "config/base.yaml", "teachers/manifest.json", "plots/optimization_history.png",
            "plots/parallel_coordinate.png", "plots/learning_curves.png"} <= p_arts, p_arts
    # artifacts went over HTTP to the server, not into a local folder of the client
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    assert not (sweep["workdir"] / "mlartifacts").exists()

    states = {}
    for r in children:
        t, p = r.data.tags, r.data.params
        assert t["mlflow.parentRunId"] == parent.info.run_id
        assert t["kdray.method"] == "ekd" and t["kdray.dataset"] == "fake" and t["kdray.teachers"]
        assert set(RunConfig().to_dict()) <= set(p)  # every hyperparameter
        assert t["node_ip"]
        states[r.info.run_id] = t["kdray.state"]
        epochs = int(r.data.metrics["epoch"])
        for key in ("val_acc", "loss_ce", "lr", "epoch_time_s", "images_per_s", "train_acc"):
            hist = c.get_metric_history(r.info.run_id, key)
            assert sorted(m.step for m in hist) == list(range(1, epochs + 1)), key
        if int(p["branches"]) > 1:
            assert c.get_metric_history(r.info.run_id, "val_acc_b1")
        arts = {a.path for d in ("student", "teachers") for a in c.list_artifacts(r.info.run_id, d)}
        assert "student/student.pt" in arts
        if t["kdray.state"] == "completed":
            assert epochs == 3 and "teachers/manifest.json" in arts and r.data.metrics["latency_ms"] > 0
        else:
            assert t["kdray.state"] == "pruned" and epochs < 3
    assert set(states.values()) <= {"completed", "pruned"} and "completed" in states.values()
    # Optuna agrees: pruned trials are PRUNED there too
    counts = sweep["result"]["study_counts"]
    assert counts.get("PRUNED", 0) == list(states.values()).count("pruned")
    assert sweep["result"]["mlflow"]["parent_run_id"] == parent.info.run_id


def test_ui_lists_the_sweep(sweep):
    import mlflow

    c = mlflow.MlflowClient(sweep["url"])
    exp = c.get_experiment_by_name("trk")
    names = [r.info.run_name for r in c.search_runs([exp.experiment_id])]
    res = check_experiment_page(sweep["url"], exp.experiment_id, names, artifacts_dir() / "mlflow-ui-sweep.png")
    assert not res["missing"], res


def test_best_register_and_load_champion_over_http(sweep):
    import mlflow
    import torch

    from kdray.checkpoint import safe_load
    from kdray.config import from_dict
    from kdray.data import load_data

    proc = kdray("--workdir", str(sweep["workdir"]), "best", "--experiment", "trk", "--tracking-uri", sweep["url"],
                 "--register", "trk-student", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    reg = out["registered"]
    assert reg["run_id"] == out["runs"][0]["run_id"]
    c = mlflow.MlflowClient(sweep["url"])
    run = c.get_run(reg["run_id"])
    mlflow.set_tracking_uri(sweep["url"])
    try:
        model = mlflow.pytorch.load_model("models:/trk-student@champion")
        record = safe_load(c.download_artifacts(reg["run_id"], "student/student.pt", str(sweep["workdir"])))
    finally:
        mlflow.set_tracking_uri("")
    data = load_data(from_dict(record["config"]))
    with torch.no_grad():
        pred = model(data.test.x.float() / 255.0).argmax(1)
    acc = int((pred == data.test.y).sum()) / len(data.test.y)
    assert acc == pytest.approx(run.data.metrics["test_acc"], abs=1.0 / len(data.test.y))
