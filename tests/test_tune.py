"""Sweeps end to end on real Ray (a local instance, then a two-node ray.cluster_utils.Cluster) with a
real Optuna sqlite study: pruning is recorded as PRUNED, teachers are trained once per sweep, bad
input fails fast with one `kdray: error:` line, a NaN trial fails with its reason while the sweep
goes on, all-failed sweeps exit 1, `--resume` after a killed sweep counts every trial once, trials
land on both nodes of a two-node cluster, and a 2-worker DDP run matches a 1-worker run.

Tiny configs (dataset `fake` at 16 px, resnet8, 1-3 epochs): each trial costs mostly Ray's fixed
start-up (see README, "Sweeps"), so the tests use as few trials as can show each property.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from kdray.cli import main
from kdray.teachers.store import STORES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KDRAY = [sys.executable, "-m", "kdray.cli"]
BASE = "base: {dataset: fake, image_size: 16, student: resnet8, batch_size: 64, device: cpu, method: %s, epochs: %d}\n"
NAN_LR = 1.0e12  # SGD at this rate blows the loss up to inf/NaN in the first epoch


def write_space(tmp_path: Path, name: str, body: str, *, method="ce", epochs=2, samples=2) -> Path:
    """A space with sampler seed 0: the tests below count on the trials it proposes."""
    f = tmp_path / f"{name}.yaml"
    f.write_text(f"name: {name}\nsamples: {samples}\nseed: 0\n" + BASE % (method, epochs) + body)
    return f


def tune(capsys, workdir: Path, *args: str):
    """`kdray tune` through the real CLI entry point; returns (exit code, stdout, stderr)."""
    rc = main(["--workdir", str(workdir), "tune", "--no-track", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def study_trials(workdir: Path, name: str):
    storage = optuna.storages.RDBStorage(f"sqlite:///{workdir.resolve() / 'optuna.db'}")
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def states(trials) -> dict:
    out: dict = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


# ------------------------------------------------------------------------------------------------
# no Ray cluster needed
# ------------------------------------------------------------------------------------------------
def test_asha_stopped_trial_is_pruned_in_optuna_study(tmp_path):
    """The searcher Tune talks to: a trial stopped before its last epoch lands as PRUNED (TPE then
    ignores its partial score), a trial that ran every epoch as COMPLETE, an errored one as FAIL."""
    from optuna.samplers import TPESampler

    from kdray.tune.search import make_searcher_class
    from kdray.tune.space import load_space

    space = load_space(write_space(tmp_path, "p", "params:\n  lr: {type: float, low: 0.01, high: 0.1}\n"))
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    searcher = make_searcher_class()(space=space.define_by_run(), metric="val_acc", mode="max",
                                     sampler=TPESampler(seed=0), study_name="p", storage=storage)
    for tid in ("a", "b", "c"):
        assert searcher.suggest(tid) is not None
    searcher.on_trial_complete("a", {"val_acc": 0.9, "epoch": 1, "total_epochs": 4})
    searcher.on_trial_complete("b", {"val_acc": 0.5, "epoch": 4, "total_epochs": 4})
    searcher.on_trial_complete("c", {"val_acc": 0.1, "epoch": 1, "total_epochs": 4}, error=True)
    trials = optuna.load_study(study_name="p", storage=storage).get_trials(deepcopy=False)
    by_state = {t.state.name: t for t in trials}
    assert sorted(by_state) == ["COMPLETE", "FAIL", "PRUNED"]
    # the result Tune stopped it on is its last intermediate value and so its value (as in MLflow);
    # TPE ranks PRUNED trials below every COMPLETE one by intermediate values, never by this value
    # (optuna/samplers/_tpe/sampler.py, _split_trials)
    assert by_state["PRUNED"].intermediate_values == {1: 0.9} and by_state["PRUNED"].value == pytest.approx(0.9)
    assert by_state["COMPLETE"].value == pytest.approx(0.5)


@pytest.mark.parametrize("text, needle", [
    ("params: {lr: {type: float, low: 0.01, high: [}\n", "malformed YAML"),
    ("params:\n  learning_rate: {type: float, low: 0.01, high: 0.1}\n", "unknown key 'learning_rate'"),
    ("params:\n  lr: {type: float, low: 0.5, high: 0.1}\n", "params.lr: low 0.5 > high 0.1"),
], ids=["malformed", "unknown-param", "low-gt-high"])
def test_bad_space_fails_before_ray_with_one_error_line(tmp_path, capsys, text, needle):
    import ray

    f = tmp_path / "bad.yaml"
    f.write_text(text)
    was_up = ray.is_initialized()
    t0 = time.monotonic()
    rc, out, err = tune(capsys, tmp_path / "w", "--space", str(f))
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdray: error: ") and needle in lines[0] and str(f) in lines[0]
    assert time.monotonic() - t0 < 10 and ray.is_initialized() == was_up  # no Ray started for it


# ------------------------------------------------------------------------------------------------
# one local Ray instance (2 CPUs)
# ------------------------------------------------------------------------------------------------
def test_more_gpus_than_the_cluster_has_is_a_clear_error(tmp_path, capsys, local_ray):
    space = write_space(tmp_path, "g", "params:\n  lr: {type: float, low: 0.01, high: 0.1}\n")
    t0 = time.monotonic()
    rc, _, err = tune(capsys, tmp_path / "w", "--space", str(space), "--gpus-per-worker", "1", "--workers", "2")
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("kdray: error: asked for 2 worker(s) x 1")
    assert "= 2 GPUs per trial, but the Ray cluster has 0" in line
    assert time.monotonic() - t0 < 30  # an error, not a wait for GPUs that never come
    with pytest.raises(KeyError):  # no trial (not even the study) was started
        study_trials(tmp_path / "w", "g")


def test_sweep_teachers_once_concurrency_clamped_nan_trial_fails_sweep_goes_on(tmp_path, capsys, local_ray):
    """kd on fake data, 3 trials, lr either sane or NaN-inducing; asks for 3 trials at once with a
    1-CPU worker each on a 2-CPU Ray: must run 2 at a time, overlapping (the trial drivers take no
    CPU; with 0.01 CPU each, 2 trials needed 2.02 CPUs and the second one's workers never started:
    WorkerGroupStartupTimeoutError), and finish every trial."""
    space = write_space(
        tmp_path, "sw",
        "teachers: {arch: [resnet8], count: 1, epochs: 1}\n"
        f"params:\n  lr: {{type: categorical, choices: [0.05, {NAN_LR}]}}\n"
        "  temperature: {type: float, low: 1, high: 8, log: true}\n"
        "scheduler: {grace_period: 1, reduction_factor: 2}\n", method="kd", epochs=2, samples=3)
    work = tmp_path / "w"
    rc, out, err = tune(capsys, work, "--space", str(space), "--concurrency", "3", "--workers", "1", "--json")
    result = json.loads(out)  # stdout holds the JSON only: progress goes to stderr
    rows = result["trials"]
    assert "running 2 at a time" in err and "3 trial(s), 2 at a time" in err
    spans = sorted((r["timing"]["started_at_s"], r["timing"]["ended_at_s"]) for r in rows)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans  # two trials ran at once
    assert err.count(" started: ") == 3 and "epoch 1/2" in err  # progress while it runs
    assert err.count("teachers: training") == 1 and len(list((work / "teachers").glob("*/manifest.json"))) == 1
    assert "WorkerGroupStartupTimeoutError" not in json.dumps(rows)
    assert len(rows) == 3
    nan_rows = [r for r in rows if r["config"]["lr"] == NAN_LR]
    ok_rows = [r for r in rows if r["config"]["lr"] != NAN_LR]
    assert nan_rows and ok_rows, "seed 0 should sample both learning rates; pick another seed if the sampler changed"
    for r in nan_rows:  # failed with its reason ...
        assert r["error"].startswith("NonFiniteLoss: loss became non-finite in epoch 1"), r["error"]
    for r in ok_rows:  # ... and the others ran to their end (or were pruned)
        assert r["error"] is None and r["metrics"]["epoch"] >= 1 and r["metrics"]["val_acc"] >= 0
    assert rc == 0  # not every trial failed
    trials = study_trials(work, "sw")
    pruned_rows = [r for r in ok_rows if r["metrics"]["epoch"] < r["metrics"]["total_epochs"]]
    assert states(trials) == {k: v for k, v in {"FAIL": len(nan_rows), "PRUNED": len(pruned_rows),
                                                "COMPLETE": len(ok_rows) - len(pruned_rows)}.items() if v}
    best = result["best"]
    assert best["config"]["lr"] != NAN_LR and Path(best["student_path"]).is_file()
    full = [r["metrics"]["val_acc"] for r in ok_rows if r["metrics"]["epoch"] == r["metrics"]["total_epochs"]]
    assert full and best["metrics"]["val_acc"] == max(full)  # ASHA lets the first trial at a rung go on
    assert result["timing"]["trials"] == 3 and result["timing"]["startup_s_mean"] > 0
    # the teachers ran once per view, before the trials, into the sweep's store: no trial ran them
    assert "teacher store: computing" in err and len(list((work / "teachers").glob(f"*/{STORES}/*/meta.json"))) == 1
    assert all(r["metrics"]["teacher_images"] == 0 for r in ok_rows), [r["metrics"] for r in ok_rows]


def test_no_teacher_store_runs_the_teachers_in_every_trial_with_the_same_result(tmp_path, capsys, local_ray):
    """One kd trial with the store (the default) and one with --no-teacher-store, both on 2 DDP
    workers (the TorchTrainer path; 1-worker trials train in the trial itself): the same sampled
    trial gives the same validation accuracy; only the live one ran its teachers."""
    body = ("teachers: {arch: [resnet8], count: 2, epochs: 1}\n"
            "params:\n  temperature: {type: float, low: 1, high: 8}\n")
    results = {}
    for flag in ("", "--no-teacher-store"):
        space = write_space(tmp_path, "ts", body, method="kd", epochs=2, samples=1)
        rc, out, err = tune(capsys, tmp_path / f"w{flag}", "--space", str(space), "--workers", "2", "--json",
                            *([flag] if flag else []))
        assert rc == 0, err[-3000:]
        results[flag] = json.loads(out)["trials"][0]["metrics"]
    stored, live = results[""], results["--no-teacher-store"]
    assert stored["teacher_images"] == 0 and live["teacher_images"] > 0
    assert stored["val_acc"] == pytest.approx(live["val_acc"], abs=1e-6) and stored["epoch"] == live["epoch"] == 2
    assert stored["train_loss"] == pytest.approx(live["train_loss"], rel=1e-5)


def test_multi_worker_trials_record_failed_and_finished_trials_in_optuna_and_mlflow(tmp_path, capsys, local_ray):
    """The TorchTrainer path (2 DDP workers per trial) with the teacher store: a NaN trial is FAIL in
    the study and `failed` in its MLflow child run with the reason; the others are COMPLETE or
    PRUNED there and in their runs, each with an epoch checkpoint and its store tag."""
    import mlflow

    space = write_space(
        tmp_path, "mw", "teachers: {arch: [resnet8], count: 1, epochs: 1}\n"
        f"params:\n  lr: {{type: categorical, choices: [0.05, {NAN_LR}]}}\n"
        "scheduler: {grace_period: 1, reduction_factor: 2}\n", method="kd", epochs=2, samples=3)
    work = tmp_path / "w"
    rc = main(["--workdir", str(work), "tune", "--space", str(space), "--workers", "2", "--address", local_ray,
               "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    rows = json.loads(out)["trials"]
    nan_rows = [r for r in rows if r["config"]["lr"] == NAN_LR]
    assert nan_rows and len(nan_rows) < 3, "seed 0 should sample both learning rates"
    by_state = states(study_trials(work, "mw"))
    assert by_state.get("FAIL") == len(nan_rows) and sum(by_state.values()) == 3, by_state
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mw")
    runs = client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'")
    assert len(runs) == 3
    run_states = sorted(r.data.tags["kdray.state"] for r in runs)
    assert run_states.count("failed") == len(nan_rows) and set(run_states) <= {"failed", "completed", "pruned"}
    for r in runs:
        assert "kdray.teacher_store" in r.data.tags
        if r.data.tags["kdray.state"] == "failed":
            assert "NonFiniteLoss" in r.data.tags.get("kdray.failure_reason", "")
        else:
            assert r.data.metrics["teacher_images"] == 0 and r.data.metrics["epoch"] >= 1


def test_killed_trial_resumes_in_the_trial_from_its_last_checkpoint_with_max_failures(tmp_path, capsys, local_ray):
    """A 1-worker trial trains in Tune's trial process; that process is SIGKILLed after two epoch
    checkpoints; with --max-failures 1 Tune starts the trial again from its last checkpoint (not
    epoch 1): the trial's MLflow run has every epoch, epoch 1 once, and the trial is COMPLETE."""

    import mlflow

    work = tmp_path / "w"
    space = write_space(tmp_path, "kt", "params:\n  lr: {type: float, low: 0.02, high: 0.05}\n", epochs=12,
                        samples=1)
    killed, stop, th = kill_after_checkpoints(lambda: (work / "ray_results").glob("kt/*/checkpoint_*"),
                                              "ImplicitFunc", settle_s=1)
    try:
        rc = main(["--workdir", str(work), "tune", "--space", str(space), "--address", local_ray,
                   "--max-failures", "1", "--json"])
    finally:
        stop.set()
        th.join(10)
    out, err = capsys.readouterr()
    assert killed, "no trial process was killed: the trial ended before two checkpoints were seen?"
    assert rc == 0, err[-3000:]
    row = json.loads(out)["trials"][0]
    assert row["error"] is None and row["metrics"]["epoch"] == 12
    assert states(study_trials(work, "kt")) == {"COMPLETE": 1}
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kt")
    (run,) = client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
    assert set(steps) == set(range(1, 13)) and steps.count(1) == 1, steps
    assert run.info.status == "FINISHED"


def test_every_trial_failed_exits_1_naming_the_reason(tmp_path, capsys, local_ray):
    space = write_space(tmp_path, "nan", f"params:\n  lr: {NAN_LR}\n  seed: {{type: int, low: 0, high: 9}}\n",
                        epochs=1, samples=1)
    rc, out, err = tune(capsys, tmp_path / "w", "--space", str(space))
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("kdray: error: all 1 trial(s) of sweep 'nan' failed: ") and "NonFiniteLoss" in last
    assert "sweep nan: 1 fail" in out and "failed: " in out  # the summary is still printed
    assert states(study_trials(tmp_path / "w", "nan")) == {"FAIL": 1}


def test_two_workers_match_one_worker_accuracy(tmp_path, capsys, local_ray):
    """The same config trained by 1 process and by 2 DDP workers (gloo, global batch split in two):
    the gradient is the same mean over the same global batch; only BatchNorm statistics (per
    worker on CPU: SyncBatchNorm is CUDA-only) and float reduction order differ, so the test
    accuracies must agree within 0.03 (measured: 0.967 vs 0.972 at 5 epochs). Fewer epochs are
    not a fair comparison: at 3 epochs with lr 0.1 the running BatchNorm averages still lag the
    fast-moving weights, and a 32-image per-worker batch lags differently from a 64-image one
    (0.94 vs 0.74 in eval mode; recomputing the statistics gives 0.955 for both)."""
    accs = {}
    for w in (1, 2):
        rc = main(["--workdir", str(tmp_path), "train", "--method", "ce", "--student", "resnet8", "--dataset", "digits",
                   "--image-size", "16", "--epochs", "5", "--batch-size", "64", "--lr", "0.1", "--device", "cpu",
                   "--workers", str(w), "--no-track", "--json", "--out", str(tmp_path / f"w{w}")])
        out, _ = capsys.readouterr()
        assert rc == 0
        accs[w] = json.loads(out.strip().splitlines()[-1])["test_acc"]
    assert accs[1] > 0.5, accs  # both actually learnt (10 classes: chance is 0.1)
    assert abs(accs[1] - accs[2]) <= 0.03, accs


def test_sync_bn_on_cpu_workers_is_a_clear_error(tmp_path, capsys):
    """Caught before Ray starts when --device cpu says so (the engine checks again on workers whose
    device was `auto`)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sync_bn: true\n")
    rc = main(["--workdir", str(tmp_path), "train", "--method", "ce", "--student", "resnet8", "--dataset", "fake",
               "--epochs", "1", "--device", "cpu", "--workers", "2", "--no-track", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc != 0
    assert "sync_bn: true needs GPU workers" in err


def test_multi_objective_sweep_prints_and_returns_the_pareto_front(tmp_path, capsys, local_ray):
    """objectives: val_acc max and params min over two student sizes: the front holds exactly the
    non-dominated finished trials, is printed, and is in --json."""
    space = write_space(
        tmp_path, "po",
        "objectives:\n  - {metric: val_acc, mode: max}\n  - {metric: params, mode: min}\n"
        "params:\n  student: {type: categorical, choices: [resnet8, resnet14]}\n"
        "  lr: {type: float, low: 0.01, high: 0.1, log: true}\n", epochs=1, samples=2)
    rc, out, err = tune(capsys, tmp_path / "w", "--space", str(space), "--concurrency", "2", "--json")
    assert rc == 0, err
    result = json.loads(out)
    front = result["pareto_front"]
    done = [t for t in study_trials(tmp_path / "w", "po") if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and front

    def dominates(a, b):  # (val_acc max, params min)
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])

    expected = {t.number for t in done if not any(dominates(o.values, t.values) for o in done if o is not t)}
    assert {t["number"] for t in front} == expected
    for t in front:
        assert set(t["params"]) == {"student", "lr"} and len(t["values"]) == 2
    rc, text, err = tune(capsys, tmp_path / "w", "--space", str(space), "--resume")
    assert rc == 0 and "Pareto front (val_acc max, params min):" in text
    assert text.count("  trial #") == len(front)


def kill_after_checkpoints(checkpoints, needle: str, settle_s: float):
    """A thread that SIGKILLs this process's descendant whose command line holds ``needle``
    ``settle_s`` after ``checkpoints()`` has shown two checkpoint folders: (killed, stop, thread)."""
    import threading

    killed: list[str] = []
    stop = threading.Event()

    def killer():
        seen: set[str] = set()
        deadline = time.monotonic() + 240
        while not stop.is_set() and time.monotonic() < deadline:
            seen |= {p.name for p in checkpoints()}
            if len(seen) >= 2:
                time.sleep(settle_s)
                for pid in sorted(_descendants(os.getpid())):
                    if needle in _cmdline(pid):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(_cmdline(pid) or str(pid))
                        return
            time.sleep(0.1)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    return killed, stop, th


def _descendants(pid: int) -> set[int]:
    """pids below ``pid`` in the process tree (from /proc; no psutil here)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_killed_worker_resumes_from_last_checkpoint_with_max_failures(tmp_path, capsys, local_ray):
    """`kdray train --workers 2 --max-failures 1`: a Ray Train worker process is SIGKILLed a few
    seconds after two epoch checkpoints; Ray Train restarts the worker group, which resumes from the latest checkpoint
    (not epoch 1): the MLflow history has every epoch, epoch 1 only once, and the run completes."""

    import mlflow

    out_dir = tmp_path / "run"
    # the controller learns of a checkpoint when it next polls the workers (every 2 s by default):
    # a kill right after the files appear could restart from scratch, by design
    killed, stop, th = kill_after_checkpoints(lambda: (out_dir / "ray").glob("*/checkpoint_*"), "RayTrainWorker",
                                              settle_s=5)
    epochs = 16
    try:
        rc = main(["--workdir", str(tmp_path), "train", "--method", "ce", "--student", "resnet8", "--dataset", "fake",
                   "--image-size", "16", "--epochs", str(epochs), "--device", "cpu", "--workers", "2",
                   "--max-failures", "1", "--experiment", "ft", "--name", "ft", "--out", str(out_dir),
                   "--address", local_ray, "--json"])
    finally:
        stop.set()
        th.join(10)
    out, err = capsys.readouterr()
    assert killed, "no Ray Train worker was killed: the run ended before two checkpoints were seen?"
    assert rc == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["epoch"] == epochs
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(summary["run_id"], "val_acc")]
    assert set(steps) == set(range(1, epochs + 1)), steps
    assert steps.count(1) == 1, f"epoch 1 trained twice: the restart did not resume ({steps})"


def test_resume_after_killed_sweep_counts_every_trial_once(tmp_path, capsys, local_ray):
    """A sweep of 2 trials is killed (SIGKILL of its driver) while its second trial runs; `--resume`
    marks that trial FAIL(interrupted), runs its parameters again, and the study ends with exactly 2
    finished trials."""
    # 10 epochs that ASHA does not cut: a trial lasts a few seconds, long enough to be caught running
    space = write_space(tmp_path, "rs", "params:\n  lr: {type: float, low: 0.01, high: 0.1, log: true}\n"
                        "scheduler: {grace_period: 10}\n", epochs=10, samples=2)
    work = tmp_path / "w"
    db = work / "optuna.db"
    proc = subprocess.Popen(KDRAY + ["--workdir", str(work), "tune", "--no-track", "--space", str(space),
                                     "--address", local_ray], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            if db.exists():  # read-only peek: an RDBStorage here would race the sweep's schema set-up
                try:
                    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                        st = [(r[0], r[1]) for r in con.execute(
                            "SELECT t.state, COUNT(p.param_id) FROM trials t "
                            "LEFT JOIN trial_params p ON p.trial_id = t.trial_id GROUP BY t.trial_id")]
                except sqlite3.Error:
                    continue
                # the second trial runs with its parameters stored (a kill between Optuna's ask and
                # its parameters leaves nothing to re-run: resume then samples afresh)
                if ("RUNNING", 1) in st and any(s in ("COMPLETE", "PRUNED") for s, _ in st):
                    break
        assert proc.poll() is None, "the sweep ended before it could be interrupted: " + proc.stderr.read()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # only the driver we started; its trials die with its job
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()
    before = states(study_trials(work, "rs"))
    assert before.get("RUNNING") == 1 and sum(before.values()) == 2, before

    rc, out, err = tune(capsys, work, "--space", str(space), "--resume", "--address", local_ray)
    assert rc == 0, err
    assert "resume: 1 trial(s) finished before, 1 to run" in err
    trials = study_trials(work, "rs")
    finished = [t for t in trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(finished) == 2 and not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(failed) == 1 and failed[0].user_attrs.get("interrupted") is True
    assert failed[0].params == finished[-1].params  # the interrupted trial ran again, once
    # a second --resume finds nothing left to do and starts no trial
    rc, out, err = tune(capsys, work, "--space", str(space), "--resume", "--address", local_ray)
    assert rc == 0 and "every trial is done already" in err and len(study_trials(work, "rs")) == 3


# ------------------------------------------------------------------------------------------------
# two Ray nodes on this machine
# ------------------------------------------------------------------------------------------------
def test_one_sweep_places_trials_on_both_nodes(tmp_path, capsys):
    """Head and worker node with 1 CPU each and 1-CPU workers: no node can host two workers, so the
    two concurrent trials must use both nodes (told apart by node id: on one machine both nodes
    have the same IP)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    from kdray.distributed.local_ray import free_port

    cluster = Cluster(initialize_head=True, head_node_args={  # the dashboard serves the state API PG cleanup needs
        "num_cpus": 1, "include_dashboard": True, "dashboard_port": free_port()})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        space = write_space(tmp_path, "two", "teachers: {arch: [resnet8], count: 2, epochs: 1}\n"
                            "params:\n  lr: {type: float, low: 0.01, high: 0.1}\n", method="kd", epochs=1, samples=2)
        rc, out, err = tune(capsys, tmp_path / "w", "--space", str(space), "--address", cluster.address,
                            "--concurrency", "2", "--workers", "1", "--json")
        assert rc == 0, err
        rows = json.loads(out)["trials"]
        assert len(rows) == 2 and not [r for r in rows if r["error"]]
        node_ids = {r["metrics"]["node_id"] for r in rows}
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(node_ids) == 2 and node_ids <= alive, (node_ids, alive)
        assert states(study_trials(tmp_path / "w", "two")) == {"COMPLETE": 2}
        # both nodes' trials read the one store through Ray's object store: no teacher ran in either
        assert "teacher store: computing" in err and all(r["metrics"]["teacher_images"] == 0 for r in rows)
        assert len(list((tmp_path / "w" / "teachers").glob(f"*/{STORES}/*/meta.json"))) == 1
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_sfeed_sweep_trains_every_generation_and_is_complete(tmp_path, capsys, local_ray):
    """ASHA's max_t is the whole epoch axis (epochs x generations): an sfeed trial is not cut at the
    end of generation 1 and recorded as PRUNED (the bug: "epoch 2/4 ... pruned by ASHA after epoch 2")."""
    space = write_space(tmp_path, "sf", "teachers: {arch: [resnet8], count: 1, epochs: 1}\n"
                        "params:\n  generations: 2\n  lr: {type: float, low: 0.04, high: 0.06}\n"
                        "scheduler: {grace_period: 1, reduction_factor: 2}\n", method="sfeed", epochs=1, samples=1)
    rc, out, err = tune(capsys, tmp_path / "w", "--space", str(space), "--json")
    assert rc == 0, err
    row = json.loads(out)["trials"][0]
    assert row["error"] is None and row["state"] == "completed"
    assert row["metrics"]["epoch"] == row["metrics"]["total_epochs"] == 2 and row["metrics"]["generation"] == 1
    assert "gen2_test_acc" in row["metrics"] and "pruned" not in err
    assert states(study_trials(tmp_path / "w", "sf")) == {"COMPLETE": 1}


@pytest.mark.parametrize("change", ["lr: 0.1", "seed: 5"])
def test_teacher_recipes_that_differ_only_in_lr_or_seed_get_different_folders(tmp_path, change):
    """Teachers a sweep trains are found again by their whole recipe (inherited from `base`), so
    two spaces that differ in lr or seed never share the first one's teachers; the same recipe reuses them."""
    from kdray.tune.space import load_space
    from kdray.tune.teachers import teachers_for

    teach = "teachers: {arch: [resnet8], count: 1, epochs: 1}\n"
    a = write_space(tmp_path, "a", teach, method="kd", epochs=1)
    b = tmp_path / "b.yaml"
    b.write_text(a.read_text().replace("name: a", "name: b").replace("epochs: 1}\n", f"epochs: 1, {change}}}\n", 1))
    assert load_space(b).base != load_space(a).base
    lines: list = []
    first = teachers_for(load_space(a), tmp_path / "w", lines.append)
    again = teachers_for(load_space(a), tmp_path / "w", lines.append)
    other = teachers_for(load_space(b), tmp_path / "w", lines.append)
    assert first == again and first != other
    assert sum("teachers: training" in ln for ln in lines) == 2
    manifest = json.loads((Path(other) / "manifest.json").read_text())
    key, value = change.split(": ")
    assert manifest["recipe"][key] == pytest.approx(float(value))
