"""Faults and hostile input, as a demanding user meets them: every run kdray opens ends in a true
state, nothing is deleted or left running that the user did not ask for, and each failure is one
line. Real components throughout: `kdray` subprocesses, a local Ray, sqlite Optuna and MLflow
stores, a real `mlflow server` killed mid-sweep, a real tmpfs filled up."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
from tune_driver import Driver

from kdray.cli import main

ROOT = Path(__file__).resolve().parents[1]
KDRAY = [sys.executable, "-m", "kdray.cli"]
FAKE = ["--dataset", "fake", "--image-size", "16", "--student", "resnet8", "--device", "cpu"]


# ------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing created
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", ["lr=inf", "weight_decay=nan", "momentum=nan", "lr=-inf"])
def test_non_finite_numbers_are_refused_at_the_door(tmp_path, capsys, setting):
    rc = main(["--workdir", str(tmp_path), "train", "--method", "ce", "--no-track", "--set", setting, *FAKE])
    err = capsys.readouterr().err.strip().splitlines()
    key = setting.split("=")[0]
    assert rc == 2 and len(err) == 1 and f"key {key!r} must be a finite float" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_per_branch_block_for_a_method_without_branches_is_refused(tmp_path, capsys):
    space = tmp_path / "ce.yaml"
    space.write_text("name: ce\nbase: {dataset: fake, method: ce}\n"
                     "per_branch:\n  branch_alpha: {type: float, low: 0, high: 1}\n")
    rc = main(["--workdir", str(tmp_path / "w"), "tune", "--no-track", "--space", str(space)])
    err = capsys.readouterr().err
    assert rc == 2 and "per_branch.branch_alpha is read by no method of this space (ce)" in err
    assert "methods that read it: ekd" in err


class _RunsCode:
    """A pickle payload that would create a marker file if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_teacher_is_refused_before_anything_is_created(tmp_path, capsys, fake_teachers):
    """A teacher file holding code (with a matching sha256 in its manifest) is refused with a line
    that never suggests weights_only=False; the refused run leaves no run folder and no MLflow run."""
    import torch

    from kdray.core.io import sha256_file

    teachers = tmp_path / "teachers"
    shutil.copytree(fake_teachers, teachers)
    marker = tmp_path / "pwned"
    torch.save({"weight": _RunsCode(marker)}, teachers / "teacher_0.pt")
    manifest = json.loads((teachers / "manifest.json").read_text())
    manifest["teachers"][0]["sha256"] = sha256_file(teachers / "teacher_0.pt")
    (teachers / "manifest.json").write_text(json.dumps(manifest))
    work = tmp_path / "w"
    rc = main(["--workdir", str(work), "train", "--method", "kd", "--teachers", str(teachers), *FAKE,
               "--epochs", "1", "--name", "evil"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "was refused" in err[0] and "could run code" in err[0] and "weights_only=False" not in err[0]
    assert not marker.exists()
    assert not (work / "runs" / "evil").exists()
    if (work / "mlflow.db").exists():  # created by the store check at most, with no run in it
        import mlflow

        runs = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}").search_runs(
            [e.experiment_id for e in mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}").search_experiments()])
        assert runs == []


def test_train_out_on_an_earlier_run_is_refused_without_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "ce", "--no-track", "--out", str(out), "--epochs", "1", *FAKE]
    assert main(args) == 0
    before = (out / "student.pt").read_bytes()
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "holds an earlier run; pass --resume" in err
    assert (out / "student.pt").read_bytes() == before


def test_credentials_are_masked_in_what_kdray_logs(tmp_path):
    """A storage URL with a password goes into no tag, param or line (real sqlite MLflow store)."""
    import mlflow

    from kdray.core.values import mask_credentials
    from kdray.tracking.store import experiment_id
    from kdray.tracking.sweeps import start_sweep_run
    from kdray.training.config import RunConfig

    assert mask_credentials("postgresql://kd:s3cret@db:5432/optuna") == "postgresql://kd:***@db:5432/optuna"
    assert mask_credentials("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"
    space_file = tmp_path / "s.yaml"
    space_file.write_text("name: s\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = experiment_id(uri, "masked", tmp_path)
    run_id = start_sweep_run(uri, exp, name="masked", space_path=str(space_file), base=RunConfig().to_dict(),
                             metrics=[("val_acc", "max")], samples=1,
                             storage_url="postgresql://kd:s3cret@db:5432/optuna", teachers=None)
    run = mlflow.MlflowClient(uri).get_run(run_id)
    text = json.dumps([run.data.tags, run.data.params])
    assert "s3cret" not in text and "postgresql://kd:***@db:5432/optuna" in text


def test_a_second_sweep_of_the_same_experiment_is_refused(tmp_path, capsys):
    """One sweep per experiment and working directory: a second driver gets one line, and the
    first one's study is untouched (no trial marked interrupted under it)."""
    work = tmp_path / "w"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom kdray.core.guards import one_sweep_at_a_time\n"
        f"with one_sweep_at_a_time({str(work)!r}, 'busy'):\n    print('locked', flush=True)\n    time.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        space = tmp_path / "busy.yaml"
        space.write_text("name: busy\nsamples: 1\nbase: {dataset: fake, image_size: 16, method: ce, epochs: 1}\n")
        rc = main(["--workdir", str(work), "tune", "--no-track", "--space", str(space), "--resume"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "sweep 'busy' is running already" in err[0], err
        assert f"pid {holder.pid}" in err[0]
        assert not (work / "optuna.db").exists()  # refused before the study was opened
    finally:
        holder.kill()
        holder.wait(10)


# ------------------------------------------------------------------------------------------------
# signals: a real `kdray tune` stopped by SIGINT / SIGTERM / SIGKILL
# ------------------------------------------------------------------------------------------------
SLOW_SPACE = ("name: {name}\nsamples: 2\n"
              "base: {{dataset: fake, image_size: 16, student: resnet8, batch_size: 32, device: cpu, method: ce, "
              "epochs: {epochs}}}\n"
              "params:\n  lr: {{type: float, low: 0.01, high: 0.1}}\n")


def alive(procs) -> list:
    """Processes still running (a zombie has ended; a reused pid is not the same process)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(procs, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(procs):
        time.sleep(0.5)
    return [(p.pid, " ".join(p.cmdline()[:3])) for p in alive(procs)]


def mlflow_runs(work: Path, experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=100) if exp else []


def study(work: Path, name: str):
    storage = optuna.storages.RDBStorage(f"sqlite:///{work.resolve() / 'optuna.db'}")
    return optuna.load_study(study_name=name, storage=storage)


def sweep_in_its_first_epoch(tmp_path: Path, name: str) -> tuple:
    """A real `kdray tune` of two slow trials at once, once it reports its first epoch; with the
    Ray processes it started under it."""
    space = tmp_path / "s.yaml"
    space.write_text(SLOW_SPACE.format(name=name, epochs=200))
    work = tmp_path / "w"
    drv = Driver(["--workdir", str(work), "tune", "--space", str(space), "--concurrency", "2"], cwd=tmp_path)
    drv.wait_for(" epoch 1/200", timeout=240)
    return drv, space, work, drv.descendants()


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_on_a_sweep_records_interrupted_trials_and_leaves_nothing_running(tmp_path, sig, code):
    name = f"stop-{sig.name.lower()}"
    drv, _, work, procs = sweep_in_its_first_epoch(tmp_path, name)
    assert procs, "a local sweep starts Ray processes under its driver"
    drv.proc.send_signal(sig)
    rc = drv.finish(timeout=120)
    assert rc == code, "\n".join(drv.lines[-30:])
    last = drv.lines[-1]
    assert last.startswith(f"kdray: sweep {name!r} interrupted by {sig.name}: ") and "--resume" in last, last
    assert "running trial(s) recorded as interrupted" in last
    states = [t.state.name for t in study(work, name).get_trials(deepcopy=False)]
    interrupted = [t for t in study(work, name).get_trials(deepcopy=False) if t.user_attrs.get("interrupted")]
    assert "RUNNING" not in states and interrupted and all(t.state.name == "FAIL" for t in interrupted), states
    runs = mlflow_runs(work, name)
    assert runs and not [r for r in runs if r.info.status == "RUNNING" or r.data.tags.get("kdray.state") == "running"]
    parent = [r for r in runs if r.data.tags.get("kdray.kind") == "sweep"]
    assert parent and parent[0].data.tags["kdray.state"] == "interrupted" and parent[0].info.status == "KILLED"
    assert wait_gone(procs, timeout=30) == []


@pytest.mark.slow
def test_sigkilled_sweep_leaves_nothing_and_resume_closes_what_it_left_open(tmp_path):
    name = "killed"
    drv, space, work, procs = sweep_in_its_first_epoch(tmp_path, name)
    drv.proc.kill()
    drv.finish(timeout=30)
    assert wait_gone(procs, timeout=30) == []
    left_open = [r for r in mlflow_runs(work, name) if r.data.tags.get("kdray.state") == "running"]
    assert left_open  # what a SIGKILL leaves: the sweep and its trials' runs still say running
    space.write_text(SLOW_SPACE.format(name=name, epochs=1))  # the rerun of each trial is short
    proc = subprocess.run(KDRAY + ["--workdir", str(work), "tune", "--space", str(space), "--resume", "--json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MLflow run(s) an earlier driver left running closed as interrupted" in proc.stderr
    runs = {r.info.run_id: r for r in mlflow_runs(work, name)}
    for r in left_open:
        assert runs[r.info.run_id].data.tags["kdray.state"] == "interrupted"
        assert runs[r.info.run_id].info.status == "KILLED"
    assert not [r for r in runs.values() if r.data.tags.get("kdray.state") == "running"]
    trials = study(work, name).get_trials(deepcopy=False)
    assert "RUNNING" not in {t.state.name for t in trials}
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 2  # every trial counted once


# ------------------------------------------------------------------------------------------------
# a lost tracking server, a full disk
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.mlflow_server
def test_lost_tracking_server_fails_the_trial_within_a_minute_naming_it(tmp_path):
    from mlflow_support import start_mlflow_server

    server = start_mlflow_server(tmp_path / "mlflow")
    name = "lost"
    space = tmp_path / "s.yaml"
    space.write_text(SLOW_SPACE.format(name=name, epochs=200).replace("samples: 2", "samples: 1"))
    work = tmp_path / "w"
    try:
        drv = Driver(["--workdir", str(work), "tune", "--space", str(space), "--tracking-uri", server.url],
                     cwd=tmp_path)
        drv.wait_for(" epoch 2/200", timeout=240)
        killed_at = time.monotonic()
        server.stop()
        failed_at = drv.wait_for("failed: TrackingLost: the MLflow tracking server at " + server.url, timeout=90)
        rc = drv.finish(timeout=300)
    finally:
        server.stop()
    assert failed_at - killed_at <= 60, f"trial failed {failed_at - killed_at:.0f}s after the server died"
    assert rc == 1, "\n".join(drv.lines[-20:])
    errors = [ln for ln in drv.lines if ln.startswith("kdray: error: ")]
    assert len(errors) == 1 and server.url in errors[0] and "--resume" in errors[0], drv.lines[-12:]
    own = [ln for ln in drv.lines if "pid=" not in ln]  # not a Ray worker's forwarded log line
    assert "Traceback" not in "\n".join(own)
    # the server returns: --resume closes the child run left RUNNING and runs the trial again
    server = start_mlflow_server(tmp_path / "mlflow")
    try:
        space.write_text(SLOW_SPACE.format(name=name, epochs=1).replace("samples: 2", "samples: 1"))
        proc = subprocess.run(KDRAY + ["--workdir", str(work), "tune", "--space", str(space), "--resume",
                                       "--tracking-uri", server.url, "--json"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        import mlflow

        client = mlflow.MlflowClient(server.url)
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id])
        assert not [r for r in runs if r.data.tags.get("kdray.state") == "running" or r.info.status == "RUNNING"]
        assert sum(r.data.tags.get("kdray.state") == "interrupted" for r in runs) >= 1
        assert [t.state.name for t in study(work, name).get_trials(deepcopy=False)].count("COMPLETE") == 1
    finally:
        server.stop()


@contextlib.contextmanager
def tmpfs(mnt: Path, size: str):
    """A tmpfs of ``size`` at ``mnt`` while inside (root only; the test is skipped otherwise)."""
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 400 KiB tmpfs (root only): too small for one checkpoint of the test's student."""
    with tmpfs(tmp_path / "full", "400k") as mnt:
        yield mnt


@pytest.fixture
def roomy_tmpfs(tmp_path):
    """An 8 MiB tmpfs (root only): room for a short run, its MLflow store and more, until filled."""
    with tmpfs(tmp_path / "disk", "8m") as mnt:
        yield mnt


def test_full_disk_is_one_line_naming_the_path_and_leaves_no_corrupt_file(small_tmpfs):
    proc = subprocess.run(KDRAY + ["--workdir", str(small_tmpfs), "train", "--method", "ce", "--no-track",
                                   "--epochs", "2", "--name", "full", *FAKE],
                          capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert err[-1].startswith("kdray: error: no space left on the device writing " + str(small_tmpfs)), err[-1]
    assert "Traceback" not in proc.stderr
    from kdray.core.io import safe_load

    for f in small_tmpfs.rglob("*.pt"):
        safe_load(f)  # anything kdray left there loads: no half-written checkpoint
    assert not list(small_tmpfs.rglob(".*.pt.*"))  # no temporary file left behind


def test_a_log_file_that_takes_no_write_is_dropped_without_a_logging_error(capfd):
    """A library record the run's log file cannot take (/dev/full: every write is ENOSPC) is dropped:
    no "--- Logging error ---" block of tracebacks on stderr; the run's own line says what failed."""
    import logging

    from kdray.core.console import library_output_to

    with library_output_to(Path("/dev/full"), stdout=False):
        logging.getLogger("mlflow.store.db.utils").error("SQLAlchemy database error: database or disk is full")
        logging.getLogger("ray").warning("a second record, after the first failed")
    assert capfd.readouterr().err == ""


def fill_up(path: Path) -> None:
    """Write zeros to ``path`` until its disk is full (what another program does to a shared disk)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def train_until_its_disk_fills(mnt: Path, args: list, cwd: Path) -> tuple:
    """`kdray train ARGS` (run name "fill") with its working directory on ``mnt``, filled up by
    another writer once the first epoch's checkpoint is there; (exit code, stderr lines)."""
    proc = subprocess.Popen(KDRAY + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = mnt / "runs" / "fill" / "checkpoints" / "epoch_0001" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not first.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no first checkpoint; stderr:\n" + proc.communicate()[1][-3000:])
        time.sleep(0.05)
    fill_up(mnt / "filler")
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def runs_at(uri: str, experiment: str = "kdray") -> list:
    """The experiment's runs, oldest first."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time) if exp else []


def assert_one_line_naming(err: str, mnt: Path) -> str:
    """The run's failure is one last line naming a file on ``mnt``: no traceback, no logging error."""
    assert "Traceback" not in err and "Logging error" not in err, err[-4000:]
    lines = err.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("kdray: error:")] == lines[-1:], lines[-6:]
    assert lines[-1].startswith(f"kdray: error: no space left on the device writing {mnt}/"), lines[-1]
    return lines[-1]


def resume_after_freeing(mnt: Path, args: list, cwd: Path) -> str:
    """Free the disk, then `kdray train ARGS --resume`: it continues from the first epoch; its stderr."""
    (mnt / "filler").unlink()
    proc = subprocess.run(KDRAY + args + ["--resume"], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "epoch 2/2" in proc.stderr, proc.stderr[-3000:]
    assert (mnt / "runs" / "fill" / "student.pt").is_file()
    return proc.stderr


@pytest.mark.slow
def test_disk_filling_mid_run_fails_the_run_in_one_line_and_resume_continues(roomy_tmpfs, tmp_path):
    """The working directory's disk fills after the first epoch; the MLflow store is elsewhere: one
    line naming the file, the MLflow run FAILED at once, and --resume finishes the training."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    args = ["--workdir", str(roomy_tmpfs), "--tracking-uri", uri, "train", "--method", "ce", "--epochs", "2",
            "--name", "fill", *FAKE]
    rc, err = train_until_its_disk_fills(roomy_tmpfs, args, tmp_path)
    assert rc == 1, err[-3000:]
    line = assert_one_line_naming(err, roomy_tmpfs)
    assert "could not be marked" not in line
    [failed] = runs_at(uri)
    assert failed.info.status == "FAILED" and failed.data.tags["kdray.state"] == "failed"
    assert "No space left on device" in failed.data.tags["kdray.failure_reason"]
    resume_after_freeing(roomy_tmpfs, args, tmp_path)
    first, resumed = runs_at(uri)
    assert first.info.run_id == failed.info.run_id and first.info.status == "FAILED"
    assert resumed.info.status == "FINISHED" and resumed.data.tags["kdray.state"] == "completed"


@pytest.mark.slow
def test_disk_filling_under_the_mlflow_store_too_leaves_the_run_for_resume_to_close(roomy_tmpfs, tmp_path):
    """The disk that fills holds the MLflow store too, which then takes no write: the one line names
    the file and says so when the run could not be marked failed; --resume (space freed) marks it
    failed, and continues the training in a new run."""
    args = ["--workdir", str(roomy_tmpfs), "train", "--method", "ce", "--epochs", "2", "--name", "fill", *FAKE]
    uri = f"sqlite:///{roomy_tmpfs / 'mlflow.db'}"
    rc, err = train_until_its_disk_fills(roomy_tmpfs, args, tmp_path)
    assert rc == 1, err[-3000:]
    line = assert_one_line_naming(err, roomy_tmpfs)
    [first] = runs_at(uri)
    if first.info.status == "RUNNING":  # what the store could not take, the line says
        assert f"MLflow run {first.info.run_id} could not be marked failed" in line and "--resume closes it" in line
    else:
        assert first.info.status == "FAILED"
    resumed_err = resume_after_freeing(roomy_tmpfs, args, tmp_path)
    first, resumed = runs_at(uri)
    assert first.info.status == "FAILED" and first.data.tags["kdray.state"] == "failed"
    assert resumed.info.status == "FINISHED" and resumed.data.tags["kdray.state"] == "completed"
    if "could not be marked" in line:
        assert f"MLflow run(s) {first.info.run_id} that an earlier attempt left running closed" in resumed_err
        assert resumed.info.run_id in first.data.tags["kdray.failure_reason"]


def test_drivers_starting_together_create_the_stores_once(tmp_path):
    """Three processes creating the same fresh sqlite MLflow and Optuna stores at once, as kdray
    drivers of one working directory do: none dies on the schema migration race."""
    work = tmp_path / "w"
    code = (
        "import sys, optuna\nfrom pathlib import Path\nfrom kdray.tracking.store import default_uri, experiment_id\n"
        "from kdray.core.guards import stores_initialising\n"
        f"work = Path({str(work)!r})\n"
        "with stores_initialising(work):\n"
        "    optuna.storages.RDBStorage(f'sqlite:///{work / \"optuna.db\"}')\n"
        "    print(experiment_id(default_uri(work), 'exp-' + sys.argv[1], work))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(3)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-800:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 3  # three experiments in one store
