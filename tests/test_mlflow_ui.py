"""A real `mlflow server` on loopback, runs logged over HTTP, the MLflow UI in headless Chromium.

No mocks: the server is `mlflow server` from this venv (sqlite backend, artifacts served over
HTTP), the client is `mlflow.MlflowClient`, the browser is Debian's `chromium` (installed by
ensure_chromium() when missing). The screenshot is kept at
$KDRAY_TEST_ARTIFACTS/mlflow-ui-experiment.png (default /tmp/kdray-shots/).
"""

from __future__ import annotations

import socket
import time

import pytest
from mlflow_support import _cmdline, artifacts_dir, check_experiment_page, start_mlflow_server

pytest_plugins = ["mlflow_support"]  # the mlflow_server fixture

pytestmark = pytest.mark.mlflow_server

PARENT = "kdray-ui-sweep-parent"
CHILDREN = ["kdray-ui-trial-0", "kdray-ui-trial-1"]


def _log_small_experiment(url: str, tmp_path) -> tuple[str, str, list[str]]:
    """A parent run and two child runs (tagged mlflow.parentRunId) with params, metrics and
    an artifact, logged over HTTP. Returns (experiment_id, parent_id, child_ids)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=url)
    exp_id = client.create_experiment(f"kdray-ui-test-{int(time.time())}")
    parent = client.create_run(exp_id, run_name=PARENT, tags={"kdray.role": "sweep"})
    pid = parent.info.run_id
    client.log_param(pid, "search_space", "lr in {0.01, 0.1}")
    child_ids = []
    for i, (name, lr) in enumerate(zip(CHILDREN, [0.01, 0.1])):
        child = client.create_run(exp_id, run_name=name,
                                  tags={"mlflow.parentRunId": pid, "kdray.trial": str(i)})
        cid = child.info.run_id
        client.log_param(cid, "lr", lr)
        for step, acc in enumerate([0.3, 0.5 + lr, 0.6 + lr]):
            client.log_metric(cid, "val_acc", acc, step=step)
        client.set_terminated(cid)
        child_ids.append(cid)
    client.log_metric(pid, "best_val_acc", 0.7)
    note = tmp_path / "summary.txt"
    note.write_text("best trial: kdray-ui-trial-1\n")
    client.log_artifact(pid, str(note))  # uploaded over HTTP (mlflow-artifacts:)
    client.set_terminated(pid)
    return exp_id, pid, child_ids


def test_ui_lists_parent_and_child_runs(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    import mlflow

    exp_id, pid, child_ids = _log_small_experiment(mlflow_server.url, tmp_path)

    # the runs are there through the tracking API, children linked to the parent
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    kids = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{pid}'")
    assert sorted(r.info.run_name for r in kids) == CHILDREN
    assert sorted(r.info.run_id for r in kids) == sorted(child_ids)
    parent = client.get_run(pid)
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [f.path for f in client.list_artifacts(pid)] == ["summary.txt"]
    # and the server stored the artifact in its own destination
    assert list(mlflow_server.artifacts_dir.rglob("summary.txt"))

    png_path = artifacts_dir() / "mlflow-ui-experiment.png"
    r = check_experiment_page(mlflow_server.url, exp_id, [PARENT, *CHILDREN], png_path)
    assert not r["missing"], f"not listed on {r['url']}: {r['missing']}"

    st = r["png_stats"]
    print(f"screenshot {r['png']}: {st}")
    assert (st["width"], st["height"]) == (1400, 900)
    assert st["bytes"] > 20_000, st        # a blank 1400x900 PNG is a few kB
    assert st["stddev"] > 5, st            # not a single flat colour
    assert st["distinct_colors"] > 100, st  # text, icons, anti-aliasing
    assert st["extrema"][0] < 80 and st["extrema"][1] > 200, st  # dark text on light page


def test_stop_leaves_no_process_behind(tmp_path):
    server = start_mlflow_server(tmp_path / "srv")
    try:
        procs = server.processes()
        mem = server.memory()
        print(f"started in {server.start_seconds}s; {mem['processes']} processes, "
              f"RSS {mem['rss_mb']} MB, PSS {mem['pss_mb']} MB")
        for pid, rss, cmd in mem["per_process"]:
            print(f"  {pid} {rss} MB {cmd}")
        assert len(procs) >= 2  # the mlflow CLI and its uvicorn worker
        assert all(p["sid"] == server.pid for p in procs)
        # job-execution runner disabled: no huey consumer / job workers
        assert not any("huey" in _cmdline(p["pid"]) for p in procs)
        assert server.health()
    finally:
        server.stop()

    assert server.leftovers() == []
    assert server.proc.poll() is not None
    # none of the pids seen (same start time) is alive, and the port is closed
    from mlflow_support import _is_same_process

    assert not [p for p in server._known if _is_same_process(p)]
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex(("127.0.0.1", server.port)) != 0
    server.stop()  # idempotent
