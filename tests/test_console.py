"""What a person sees in the terminal: one kdray line per event (trial n/N, best so far, ETA), the
libraries' own output in the sweep's log file; `kdray train`'s start-up, ETA and closing lines;
global options before or after the command; reading commands that never create a store."""

from __future__ import annotations

import json
import re

import pytest

from kdray.cli import main

FAKE = "{dataset: fake, image_size: 16, student: resnet8, device: cpu, method: ce, epochs: 2}"


@pytest.fixture(scope="module")
def sweep_console(tmp_path_factory):
    """A 2-trial sweep's stderr, stdout and workdir (captured by hand: capsys is per test)."""
    import ray

    tmp = tmp_path_factory.mktemp("console")
    space = tmp / "tiny.yaml"
    space.write_text(f"name: tiny\nsamples: 2\nbase: {FAKE}\nparams:\n  lr: {{type: float, low: 0.01, high: 0.1}}\n")
    import contextlib
    import io

    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(["tune", "--space", str(space), "--no-track", "--workdir", str(tmp / "w")])
    finally:
        ray.shutdown()
    assert rc == 0, err.getvalue()
    return {"err": err.getvalue(), "out": out.getvalue(), "workdir": tmp / "w"}


def test_sweep_lines_carry_trial_number_best_and_eta(sweep_console):
    lines = [ln for ln in sweep_console["err"].splitlines() if re.match(r"\[ *\d+[smh]", ln)]
    assert any(re.search(r"trial 1/2 \(\w+\) started: lr=", ln) for ln in lines), lines
    assert any(re.search(r"trial 2/2 \(\w+\) epoch 1/2: val_acc=", ln) for ln in lines), lines
    first = re.search(r"trial 1/2 \((\w+)\)", lines[0]).group(1)
    # the best so far is the winner among the trials that ended: none while trial 1 runs, then
    # trial 1 (or trial 2 once it ends better), named as MLflow names its run beside Tune's id
    ended = next(i for i, ln in enumerate(lines) if f"({first}) completed" in ln or f"({first}) pruned" in ln)
    assert not any("best val_acc=" in ln for ln in lines[:ended])
    assert all("best val_acc=" in ln for ln in lines[ended:]), lines
    assert "best val_acc=" in lines[ended] and f"(ce-0, {first})" in lines[ended], lines[ended]
    assert any("ETA <= " in ln for ln in lines if " epoch " in ln) and lines[-1].endswith("done")


class _Trial:
    """What ProgressLines reads of a Tune trial."""

    def __init__(self, trial_id: str, method: str = "ekd"):
        self.trial_id, self.config, self.last_result = trial_id, {"lr": 0.1, "method": method}, {}


def _best_shown(line: str):
    found = re.search(r"best val_acc=([\d.]+) \(([^)]*)\)", line)
    return (float(found.group(1)), found.group(2)) if found else None


def test_best_so_far_never_goes_down_and_is_the_sweeps_winner():
    """A running trial's value goes down (0.8741, then 0.8601): the best so far is the winner by
    the summary's rule (:func:`best_trial`) over the trials that ended, so it never goes down,
    and names the trial as MLflow does (``ekd-N``, the Optuna trial number) beside Tune's id."""
    from kdray.tune.report import ProgressLines, best_trial

    lines: list = []
    progress = ProgressLines(lines.append, "val_acc", "max", total=3, method="ekd")
    trials = {tid: _Trial(tid) for tid in ("a_00000", "a_00001", "a_00002")}
    progress.trial_numbers.update({"a_00000": 0, "a_00001": 1, "a_00002": 2})
    events = [("start", "a_00000", None), ("start", "a_00001", None),
              ("result", "a_00000", (1, 0.8741)), ("result", "a_00001", (1, 0.80)),
              ("result", "a_00000", (2, 0.8601)), ("result", "a_00001", (2, 0.83)),
              ("result", "a_00000", (3, 0.8650)), ("complete", "a_00000", None),
              ("start", "a_00002", None), ("result", "a_00001", (3, 0.82)), ("complete", "a_00001", None),
              ("result", "a_00002", (1, 0.95)), ("result", "a_00002", (2, 0.70)), ("error", "a_00002", None)]
    for kind, tid, value in events:
        trial = trials[tid]
        if kind == "start":
            progress.on_trial_start(0, [], trial)
        elif kind == "result":
            result = {"epoch": value[0], "total_epochs": 3, "val_acc": value[1], "epoch_time_s": 0.1}
            trial.last_result = result
            progress.on_trial_result(0, [], trial, result)
        elif kind == "complete":
            progress.on_trial_complete(0, [], trial)
        else:
            trial.pickled_error_file = None
            trial.get_pickled_error = lambda: RuntimeError("boom")
            progress.on_trial_error(0, [], trial)
    shown = [_best_shown(ln) for ln in lines]
    assert shown[:7] == [None] * 7, lines  # nothing ended yet: no winner to name
    values = [v for v, _ in filter(None, shown)]
    assert values == sorted(values) and values[0] == 0.8650, lines  # never goes down
    assert shown[-1] == (0.8650, "ekd-0, a_00000"), lines[-1]  # not 0.8741 (seen), not a_00002's 0.95 (failed)
    rows = [{"trial": tid, "metrics": trials[tid].last_result, "error": None} for tid in ("a_00000", "a_00001")]
    rows.append({"trial": "a_00002", "metrics": trials["a_00002"].last_result, "error": "RuntimeError: boom"})
    assert best_trial(rows, "val_acc", "max")["trial"] == "a_00000"  # the summary's winner is the same


def test_best_so_far_counts_an_earlier_sessions_winner_and_prefers_finished_trials():
    from kdray.tune.report import ProgressLines

    lines: list = []
    progress = ProgressLines(lines.append, "val_loss", "min", total=2, method="kd")
    progress.earlier = {"trial": "old_00003", "name": "kd-3", "earlier_session": True, "error": None,
                        "metrics": {"val_loss": 0.40, "epoch": 3, "total_epochs": 3}}
    trial = _Trial("b_00000", method="kd")
    progress.trial_numbers["b_00000"] = 5
    progress.on_trial_start(0, [], trial)
    assert _best_shown(lines[-1]) is None  # val_loss is not val_acc: the metric named is the sweep's
    assert "best val_loss=0.4000 (kd-3, old_00003, earlier session)" in lines[-1]
    trial.last_result = {"epoch": 1, "total_epochs": 3, "val_loss": 0.10}
    progress.on_trial_complete(0, [], trial)  # pruned at epoch 1: a finished trial still wins
    assert "best val_loss=0.4000 (kd-3" in lines[-1]


def test_a_pruned_trial_is_the_best_only_until_a_trial_trains_to_its_end():
    """The one step of the winner rule that can go down, shown as the summary would pick it."""
    from kdray.tune.report import ProgressLines

    lines: list = []
    progress = ProgressLines(lines.append, "val_acc", "max", total=2, method="ekd")
    progress.trial_numbers.update({"c_00000": 0, "c_00001": 1})
    pruned, full = _Trial("c_00000"), _Trial("c_00001")
    pruned.last_result = {"epoch": 1, "total_epochs": 4, "val_acc": 0.90}
    full.last_result = {"epoch": 4, "total_epochs": 4, "val_acc": 0.88}
    progress.on_trial_complete(0, [], pruned)
    assert "best val_acc=0.9000 (ekd-0, c_00000)" in lines[-1]
    progress.on_trial_complete(0, [], full)
    assert "best val_acc=0.8800 (ekd-1, c_00001)" in lines[-1]


def test_library_chatter_goes_to_the_sweep_log(sweep_console):
    text = sweep_console["err"] + sweep_console["out"]
    for chatter in ("Configuration for experiment", "tensorboard", "View detailed results", "A new study created"):
        assert chatter not in text, chatter
    assert not re.search(r"^\[[IW] \d{4}-", text, re.M)  # Optuna's own log format
    log = (sweep_console["workdir"] / "logs" / "tiny.log").read_text()
    assert "Configuration for experiment" in log and "A new study created" in log
    assert f"output goes to {sweep_console['workdir'] / 'logs' / 'tiny.log'}" in sweep_console["err"]


def test_train_shows_startup_eta_and_next_steps(tmp_path, capsys):
    rc = main(["--workdir", str(tmp_path), "train", "--method", "ce", "--dataset", "fake", "--image-size", "16",
               "--device", "cpu", "--epochs", "3", "--experiment", "console"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err.splitlines()[0].startswith("starting: ce resnet8 on fake, 3 epochs")
    assert re.search(r"^ready in [\d.]+s: \d+ train / \d+ val / \d+ test images, 10 classes; cpu", err, re.M)
    epochs = [ln for ln in err.splitlines() if ln.startswith("epoch ")]
    assert len(epochs) == 3 and all(" ETA " in ln for ln in epochs[:2]) and " ETA " not in epochs[2]
    assert re.search(r"MLflow run (\w{32}): `kdray export --run \1 --out DIR`", out)
    assert "kdray best --experiment console" in out


@pytest.mark.parametrize("before", [True, False])
def test_workdir_and_tracking_uri_before_or_after_the_command(tmp_path, capsys, before):
    train = ["train", "--method", "ce", "--dataset", "fake", "--image-size", "16", "--device", "cpu",
             "--epochs", "1", "--json"]
    glob = ["--workdir", str(tmp_path / "w"), "--tracking-uri", f"sqlite:///{tmp_path / 'elsewhere.db'}"]
    rc = main(glob + train if before else train + glob)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["student_path"].startswith(str(tmp_path / "w" / "runs"))
    assert (tmp_path / "elsewhere.db").is_file() and not (tmp_path / "w" / "mlflow.db").exists()


@pytest.mark.parametrize("argv", [["best", "--experiment", "x"], ["export", "--run", "0" * 32, "--out", "o"]])
def test_reading_commands_never_create_a_store(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KDRAY_WORKDIR")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no MLflow store at" in err[0] and "--workdir" in err[0]
    assert list(tmp_path.iterdir()) == []
