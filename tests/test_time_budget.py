"""`kdray tune --time-budget`: durations parsed as a user writes them (bad ones are one line, exit
2), the console's ETA never promises beyond the budget, and, through the real CLI on digits with a
local Ray, a real Optuna sqlite study and a real MLflow sqlite store, a budget stops a 20-trial
sweep with trials left: no trial starts after it, the running one finishes (default) or is stopped
and recorded as interrupted (--at-budget stop, here from the space file), the summary, the JSON
and the MLflow sweep run say the budget ended it, and --resume goes on with the study.

Digits at 16 px, resnet8, 3 epochs of about a second: each session costs its budget plus the
start-up and the last trial's end."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import error_line, run_cli

from kdray.core.errors import KdrayError
from kdray.tune.budget import SweepBudget, duration_text, parse_duration
from kdray.tune.options import SweepOptions
from kdray.tune.report import SweepEta

SPACE = ("name: budget\nmetric: val_acc\nmode: max\nsamples: 20\nseed: 3\n"
         "base: {dataset: digits, image_size: 16, method: ce, student: resnet8, batch_size: 64, device: cpu, "
         "precise_bn: true, epochs: 3}\n"
         "params:\n  lr: {type: float, low: 0.05, high: 0.2, log: true}\n"
         "  weight_decay: {type: float, low: 0.0001, high: 0.001, log: true}\n"
         "scheduler: {grace_period: 1, reduction_factor: 2}\n")


# --- durations -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400),
                                           ("1h0m30s", 3630), ("5400", 5400), ("2.5", 2.5), ("1.5h", 5400),
                                           (" 2H ", 7200), (" 1h 30m ", 5400), (45, 45), (0.5, 0.5)])
def test_durations_as_a_user_writes_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["2 hours", "h", "", "1m2h", "-5", "0", "0s", "2d", "1:30", "inf", "nan", True, [1],
                                 datetime.timedelta(minutes=2)])
def test_a_bad_duration_is_one_line_naming_what_is_allowed(bad):
    with pytest.raises(KdrayError) as err:
        parse_duration(bad)
    line = str(err.value)
    assert "\n" not in line and line.startswith("--time-budget") and "allowed: 90s, 30m, 2h, 1h30m" in line


def test_duration_text_and_options():
    assert [duration_text(s) for s in (90, 5400, 7200, 3630, 5)] == ["1m30s", "1h30m", "2h", "1h30s", "5s"]
    SweepOptions(time_budget="1h30m", at_budget="stop").check()
    with pytest.raises(KdrayError, match=r"--at-budget 'later' is not allowed; allowed: finish, stop"):
        SweepOptions(at_budget="later").check()


def test_bad_duration_on_the_command_line_or_in_the_space_file_exits_2_with_one_line(tmp_path, capsys):
    space = tmp_path / "s.yaml"
    space.write_text(SPACE)
    code, out, err = run_cli(capsys, "--workdir", tmp_path / "w", "tune", "--space", space, "--time-budget", "2 hours")
    assert code == 2 and out == ""
    assert error_line(err) == ("kdray: error: --time-budget '2 hours' is not a duration; "
                               "allowed: 90s, 30m, 2h, 1h30m or plain seconds (> 0)")
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "--workdir", tmp_path / "w", "tune", "--space", space, "--at-budget", "pause")
    assert code == 2 and "--at-budget 'pause' is not allowed; allowed: finish, stop" in error_line(err)
    space.write_text(SPACE + "time_budget: soon\n")
    code, _, err = run_cli(capsys, "--workdir", tmp_path / "w", "tune", "--space", space)
    assert code == 2 and f"{space}: time_budget 'soon' is not a duration" in error_line(err)
    assert not (tmp_path / "w" / "optuna.db").exists()  # refused before anything started


# --- the ETA -----------------------------------------------------------------------------------------
def eta_at(budget, now: float) -> SweepEta:
    """20 trials of 2 epochs, 2 running with 1 epoch left each, 4 epochs done in 10 s (0.4 epoch/s)."""
    eta = SweepEta(20, budget)
    eta.t0, eta.started, eta.epochs_done, eta.epochs_per_trial = now - 10, 2, 4, 2
    eta.epochs_left = {"a": 1, "b": 1}
    return eta


def test_the_eta_never_promises_beyond_the_budget():
    now = 1_000_000.0
    assert eta_at(None, now).seconds(now) == pytest.approx((2 + 18 * 2) / 0.4)  # 95 s without a budget
    stop, finish = SweepBudget(60, "stop"), SweepBudget(60, "finish")
    for b in (stop, finish):
        b.start(now - 10)  # 50 s left
    assert eta_at(stop, now).seconds(now) == pytest.approx(50)  # the running trials stop at the budget
    assert eta_at(finish, now).seconds(now) == pytest.approx(50 + 2 * 2 / 0.4)  # ... or finish: one trial more
    assert eta_at(SweepBudget(3600, "finish"), now).seconds(now) == pytest.approx(95)  # not binding: no change
    spent = SweepBudget(5, "finish")
    spent.start(now - 10)
    assert eta_at(spent, now).seconds(now) == pytest.approx(2 / 0.4)  # only the running trials' epochs
    spent.at = "stop"
    assert eta_at(spent, now).seconds(now) == 0 and eta_at(spent, now).text() == "done"


def test_the_budget_counts_from_its_start_and_the_space_file_sets_it():
    b = SweepBudget(10, "stop")
    assert b.left() is None and not b.spent() and not b.stop_all()  # not started: nothing to stop
    b.start(0.0)
    assert b.spent() and b.stop_all() and b.stopped_running
    space = type("S", (), {"time_budget": 120.0, "at_budget": "stop"})()
    assert (SweepBudget.of(SweepOptions(), space).seconds, SweepBudget.of(SweepOptions(), space).at) == (120, "stop")
    given = SweepBudget.of(SweepOptions(time_budget="2h", at_budget="finish"), space)
    assert (given.seconds, given.at) == (7200, "finish")  # the command line wins
    assert SweepBudget.of(SweepOptions(), type("S", (), {"time_budget": None, "at_budget": None})()) is None


# --- a real sweep ------------------------------------------------------------------------------------
def stores(work: Path):
    return (optuna.storages.RDBStorage(f"sqlite:///{work / 'optuna.db'}"),
            mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}"))


def sweep_runs(client):
    exp = client.get_experiment_by_name("budget")
    return exp, client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'sweep'",
                                   order_by=["attributes.start_time ASC"])


def no_run_left_running(client, exp) -> None:
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert runs and not [r.info.run_name for r in runs if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_the_time_budget_stops_a_sweep_with_trials_left_and_resume_goes_on(tmp_path, capsys, local_ray):
    space, work = tmp_path / "budget.yaml", tmp_path / "w"
    space.write_text(SPACE)
    # 1. finish (default): no trial starts after the budget, the running one finishes
    code, out, err = run_cli(capsys, "--workdir", work, "tune", "--space", space, "--time-budget", "8s")
    assert code == 0, err[-3000:]
    spent = [i for i, ln in enumerate(err.splitlines()) if "time budget 8s spent: no new trial starts" in ln]
    assert len(spent) == 1, err[-3000:]
    assert not [ln for ln in err.splitlines()[spent[0]:] if ": started: " in ln]  # none started after it
    storage, client = stores(work)
    trials = optuna.load_study(study_name="budget", storage=storage).get_trials(deepcopy=False)
    assert 1 <= len(trials) < 20 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}  # none RUNNING
    line = re.search(r"sweep budget: the time budget 8s ended the sweep: (\d+) trial\(s\) left unstarted; "
                     r"the running trials finished; `(kdray .* --resume)` runs them", out)
    assert line and int(line.group(1)) == 20 - len(trials), out
    assert "--time-budget 8s" in line.group(2)
    exp, parents = sweep_runs(client)
    no_run_left_running(client, exp)
    tags, params = parents[0].data.tags, parents[0].data.params
    assert tags["kdray.ended_by"] == "time_budget" and tags["kdray.budget_unstarted"] == str(20 - len(trials))
    assert tags["kdray.budget_stopped"] == "0" and params["time_budget_s"] == "8.0" and params["at_budget"] == "finish"

    # 2. --resume, the budget from the space file with `at_budget: stop`: the running trial is stopped
    space.write_text(SPACE + "time_budget: 6s\nat_budget: stop\n")
    code, out, err = run_cli(capsys, "--workdir", work, "tune", "--space", space, "--resume", "--json")
    assert code == 0, err[-3000:]
    assert f"resume: {len(trials)} trial(s) finished before, {20 - len(trials)} to run" in err
    summary = json.loads(out)
    budget = summary["time_budget"]
    assert budget["ended_sweep"] and budget["at_budget"] == "stop" and budget["seconds"] == 6
    assert budget["queued_again"] >= max(budget["stopped"], 1)  # stopped, or proposed and not started yet
    assert [r["state"] for r in summary["trials"]].count("interrupted") == budget["stopped"]
    study = optuna.load_study(study_name="budget", storage=storage)
    now = study.get_trials(deepcopy=False)
    interrupted = [t for t in now if t.user_attrs.get("interrupted")]
    assert len(interrupted) == budget["queued_again"] and all(t.state.name == "FAIL" for t in interrupted)
    assert not [t for t in now if t.state.name == "RUNNING"]
    waiting = [t for t in now if t.state.name == "WAITING"]  # queued to run again
    assert len(waiting) == len([t for t in interrupted if t.params])
    finished = [t for t in now if t.state.name in ("COMPLETE", "PRUNED")]
    assert budget["left_unstarted"] == 20 - len(finished) - budget["stopped"]  # a trial proposed, not started: both
    exp, parents = sweep_runs(client)
    no_run_left_running(client, exp)
    assert parents[1].data.tags["kdray.budget_stopped"] == str(budget["stopped"])
    assert parents[1].data.params["at_budget"] == "stop"
    # a stopped trial's run, once it had one (a trial makes it a moment after it starts), is interrupted
    stopped = client.search_runs([exp.experiment_id], "tags.`kdray.state` = 'interrupted'")
    assert len(stopped) <= budget["stopped"] and all(r.info.status == "KILLED" for r in stopped)

    # 3. --resume without a budget runs the queued trial first
    space.write_text(SPACE)
    code, out, err = run_cli(capsys, "--workdir", work, "tune", "--space", space, "--resume",
                             "--samples", len(finished) + 1)
    assert code == 0, err[-3000:]
    after = optuna.load_study(study_name="budget", storage=storage).get_trials(deepcopy=False)
    rerun = [t for t in after if t.user_attrs.get("rerun_of") is not None and t.state.name in ("COMPLETE", "PRUNED")]
    source = {t.number: t for t in interrupted}
    assert len(rerun) == 1 and rerun[0].params == source[rerun[0].user_attrs["rerun_of"]].params
    assert "ended the sweep" not in out
