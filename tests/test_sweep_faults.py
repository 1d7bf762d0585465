"""A sweep whose MLflow tracking server dies under it, as a user meets it: a real `kdray tune`
subprocess on digits with a local Ray, tracked by a real `mlflow server` on loopback that is
killed mid-trial and later started again on the same port. Once one trial has failed on the lost
server no trial starts, the sweep ends with one line naming the server and the exact `--resume`
command, and that command, run once the server is back, closes the runs left RUNNING."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time

import optuna
import pytest
from tune_driver import Driver

pytestmark = [pytest.mark.slow, pytest.mark.mlflow_server]

KDRAY = [sys.executable, "-m", "kdray.cli"]
SPACE = ("name: {name}\nsamples: 2\n"
         "base: {{dataset: digits, image_size: 16, student: resnet8, batch_size: 32, device: cpu, method: ce, "
         "epochs: {epochs}}}\n"
         "params:\n  lr: {{type: float, low: 0.01, high: 0.1}}\n")


def runs_of(uri: str, name: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], max_results=100) if exp else []


def trial_states(work, name: str) -> list:
    storage = optuna.storages.RDBStorage(f"sqlite:///{work.resolve() / 'optuna.db'}")
    return sorted(t.state.name for t in optuna.load_study(study_name=name, storage=storage).get_trials())


def restart_on_port(root, port: int, monkeypatch):
    """The server again, on its old port (the sweep's runs name that URL) and with its old store."""
    import mlflow_support

    monkeypatch.setattr(mlflow_support, "free_port", lambda: port)
    return mlflow_support.start_mlflow_server(root)


def test_lost_server_stops_the_sweep_with_one_line_and_resume_closes_its_runs(tmp_path, monkeypatch):
    from mlflow_support import start_mlflow_server

    name = "server-lost"
    space, work = tmp_path / "s.yaml", tmp_path / "w"
    space.write_text(SPACE.format(name=name, epochs=200))
    server = start_mlflow_server(tmp_path / "mlflow")
    try:
        drv = Driver(["--workdir", str(work), "tune", "--space", str(space), "--tracking-uri", server.url],
                     cwd=tmp_path)
        drv.wait_for(" epoch 2/200", timeout=300)
        seen, killed_at = len(drv.lines), time.monotonic()
        server.stop()
        rc = drv.finish(timeout=180)
        took = time.monotonic() - killed_at
    finally:
        server.stop()
    # no trial after the first failure; one line for it and one for the sweep; nothing else
    assert rc == 1, "\n".join(drv.lines[-20:])
    assert sum(" started: " in ln for ln in drv.lines) == 1, drv.lines
    after = [ln for ln in drv.lines[seen:] if not re.search(r" epoch \d+/200: ", ln)]
    assert len(after) == 2, after
    assert re.search(r"trial 1/2 \(\w+\) failed: TrackingLost: the MLflow tracking server at "
                     + re.escape(server.url), after[0]), after[0]
    assert after[1].startswith(f"kdray: error: sweep {name!r} stopped: the MLflow tracking server at {server.url} "
                               "stopped answering"), after[1]
    assert "no trial was started after" in after[1] and "1 trial(s) queued to run again" in after[1]
    assert took < 90, f"the sweep ended {took:.0f}s after its server died"
    command = re.search(r"`(kdray [^`]*--resume)`", after[1]).group(1)
    assert f"--tracking-uri {server.url}" in command and f"--workdir {work.resolve()}" in command, command
    # what it leaves: the trial queued again in Optuna, its run and the sweep's run RUNNING
    assert trial_states(work, name) == ["FAIL", "WAITING"]
    left_open = [r for r in runs_of(server.backend_uri, name) if r.info.status == "RUNNING"]
    assert {r.data.tags.get("kdray.kind") for r in left_open} == {"sweep", "trial"}, left_open

    # the server is back: the printed command closes those runs and finishes the sweep
    server = restart_on_port(tmp_path / "mlflow", server.port, monkeypatch)
    try:
        space.write_text(SPACE.format(name=name, epochs=1))  # the reruns are short
        argv = shlex.split(command)
        proc = subprocess.run(KDRAY + argv[1:], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resume: 2 MLflow run(s) an earlier driver left running closed as interrupted" in proc.stderr
        runs = {r.info.run_id: r for r in runs_of(server.url, name)}
    finally:
        server.stop()
    for r in left_open:
        assert runs[r.info.run_id].data.tags["kdray.state"] == "interrupted"
        assert runs[r.info.run_id].info.status == "KILLED"
    assert not [r for r in runs.values() if r.info.status == "RUNNING" or r.data.tags.get("kdray.state") == "running"]
    states = trial_states(work, name)
    assert "RUNNING" not in states and "WAITING" not in states
    assert states.count("COMPLETE") + states.count("PRUNED") == 2, states
