import os
import sys
from pathlib import Path

import pytest

from kdray.core.procexit import exit_after_atexit
from kdray.training.config import RunConfig

# This process starts and stops Ray many times (module fixtures, ray.cluster_utils.Cluster, in-process
# `kdray tune`); Ray's native client threads outlive ray.shutdown() and once crashed the interpreter's
# teardown after every test had passed (SIGSEGV, exit 139). Registered here, before any test module
# imports ray, the handler runs after Ray's and MLflow's atexit handlers and leaves with pytest's own
# exit status. See kdray/core/procexit.py.
_set_exit_status = exit_after_atexit()


def pytest_sessionfinish(session, exitstatus):
    cwd = session.config._kdray_cwd
    new = sorted(_tree(cwd) - session.config._kdray_tree)
    if new:  # a test wrote outside its temporary directories
        print(f"\nERROR: the tests left {len(new)} new path(s) in {cwd}: {', '.join(new[:10])}", file=sys.stderr)
        session.exitstatus = exitstatus = pytest.ExitCode.TESTS_FAILED
    _set_exit_status(exitstatus)  # an ExitCode; the handler keeps int(exitstatus)


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI", ""))


@pytest.fixture(autouse=True)
def _workdir_in_tmp(monkeypatch, tmp_path_factory):
    """A command a test runs without --workdir writes into a temporary kdray working directory,
    never into ./kdray-work of whoever runs the tests (subprocesses inherit it)."""
    monkeypatch.setenv("KDRAY_WORKDIR", str(tmp_path_factory.mktemp("kdray-work")))


# -- the test run leaves the directory it runs in as it found it ----------------------------------
IGNORED_ENTRIES = {".pytest_cache", "__pycache__", ".git", ".venv", "build", "kdray.egg-info"}


def _tree(root: Path) -> set:
    """Every path under ``root`` (relative), except caches and the environment."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in IGNORED_ENTRIES and not d.endswith(".egg-info")]
        rel = Path(dirpath).relative_to(root)
        out.update(str(rel / n) for n in dirnames + filenames if n not in IGNORED_ENTRIES)
    return out


def pytest_configure(config):
    config._kdray_cwd = Path.cwd()
    config._kdray_tree = _tree(config._kdray_cwd)


def small_cfg(**kw) -> RunConfig:
    """A config that trains in about a second on 2 CPU cores."""
    base = dict(dataset="fake", image_size=16, student="resnet8", epochs=2, batch_size=64,
                eval_batch_size=256, lr=0.05, device="cpu")
    base.update(kw)
    return RunConfig().replace(**base)


def sweep_in_process(workdir: Path, capsys, space_yaml: str, name: str) -> list[dict]:
    """`kdray tune --no-track` on a space written from ``space_yaml``, in this process (so what the
    test registered must travel to the Ray workers by value); the trials' rows, each without error."""
    import json

    import ray

    from kdray.cli import main

    space = workdir / f"{name}.yaml"
    space.parent.mkdir(parents=True, exist_ok=True)
    space.write_text(space_yaml)
    try:
        rc = main(["--workdir", str(workdir / "w"), "tune", "--no-track", "--space", str(space), "--json"])
    finally:
        ray.shutdown()
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = json.loads(out)["trials"]
    assert all(r["error"] is None for r in rows), rows
    return rows


@pytest.fixture(scope="session")
def fake_teachers(tmp_path_factory):
    """Two tiny trained teachers on the fake dataset (different archs)."""
    from kdray.training.teacher_set import train_teachers

    out = tmp_path_factory.mktemp("teachers")
    train_teachers(small_cfg(epochs=2), ["resnet8", "resnet14"], 2, out, log=lambda s: None)
    return out


# --- shared helpers ---------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    """``kdray`` in this process: (exit code, stdout, stderr)."""
    from kdray.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one ``kdray: error:`` line of ``err`` (asserts there is exactly one)."""
    lines = [line for line in err.strip().splitlines() if line.startswith("kdray: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs, as on CI) shared by the single-node tests of a module; its GCS address."""
    import ray

    from kdray.distributed.local_ray import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(None)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()

