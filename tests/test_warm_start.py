"""Warm start (`kdray tune --warm-start SWEEP [--warm-start-top N]`), through the real CLI on
digits with a local Ray, a real Optuna sqlite study and a real MLflow sqlite store: a new study
holds the earlier sweep's finished trials that fit its space as its starting history (their
values, marked as history, never counted as its own trials), out-of-range ones left out and
counted; ``--warm-start-top 2`` runs the earlier best two configurations first; the MLflow sweep
run names and links its source; bad requests are one line. The fit rules on plain values."""

from __future__ import annotations

import json

import mlflow
import optuna
import pytest
from conftest import error_line, run_cli

from kdray.tune.space import load_space
from kdray.tune.warm_start import FROM_ATTR, TOP_ATTR, fit_params, space_distributions

BASE = ("metric: val_acc\nmode: max\nseed: 3\n"
        "base: {dataset: digits, image_size: 16, method: ce, student: resnet8, batch_size: 64, device: cpu, "
        "epochs: 2}\nscheduler: {grace_period: 2, reduction_factor: 2}\n")
WIDE = "params:\n  lr: {type: float, low: 0.01, high: 0.3, log: true}\n  weight_decay: 0.0005\n"
NARROW_LOW, NARROW_HIGH = 0.04, 0.3


def narrow(samples: int) -> str:
    return (f"samples: {samples}\nparams:\n  lr: {{type: float, low: {NARROW_LOW}, high: {NARROW_HIGH}, log: true}}\n"
            "  weight_decay: {type: float, low: 0.0001, high: 0.001, log: true}\n")


def tune(capsys, work, space, *flags):
    code, out, err = run_cli(capsys, "--workdir", work, "tune", "--space", space, "--json", *flags)
    assert code == 0, err
    return json.loads(out), err


def study(work, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{work / 'optuna.db'}")


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, local_ray):
    """A finished 5-trial sweep `first` over a wide lr range (weight_decay held at 0.0005)."""
    work = tmp_path_factory.mktemp("warm")
    space = work / "first.yaml"
    space.write_text("name: first\nsamples: 5\n" + BASE + WIDE)
    from kdray.cli import main

    assert main(["--workdir", str(work), "tune", "--space", str(space)]) == 0
    return work


def test_a_warm_started_study_starts_from_the_earlier_trials_that_fit(earlier, tmp_path, capsys):
    work, space = earlier, tmp_path / "second.yaml"
    space.write_text("name: second\n" + BASE + narrow(2))
    before = study(work, "first").get_trials()
    done = [t for t in before if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    fits = [t for t in done if NARROW_LOW <= t.params["lr"] <= NARROW_HIGH]
    assert 0 < len(fits) < len(done), "the earlier sweep's lr values should fall both in and out of the new range"
    summary, err = tune(capsys, work, space, "--warm-start", "first")
    assert f"warm start: {len(fits)} earlier trial(s) given to the study as its starting history" in err
    assert f"left out: {len(done) - len(fits)} outside this space's ranges or constants" in err
    s = study(work, "second")
    history = [t for t in s.trials if FROM_ATTR in t.user_attrs]
    # the history: the fitting trials, their states and values, weight_decay from the earlier constant
    assert [t.user_attrs[FROM_ATTR] for t in history] == [f"first#{t.number}" for t in fits]
    assert [(t.state, t.value, t.params["lr"]) for t in history] == [(t.state, t.value, t.params["lr"]) for t in fits]
    assert all(t.params["weight_decay"] == 0.0005 for t in history)
    assert [t.number for t in history] == list(range(len(fits)))  # before this sweep's first trial
    # never counted as this sweep's trials
    assert sum(summary["study_counts"].values()) == 2 == len(summary["trials"])
    assert summary["warm_start"]["sources"] == ["first"] and summary["warm_start"]["history"] == len(fits)
    assert summary["best"]["metrics"]["trial_id"] in {r["trial"] for r in summary["trials"]}
    # the MLflow sweep run names its source and links to the source's sweep run
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    c = mlflow.MlflowClient()
    source = c.search_runs([c.get_experiment_by_name("first").experiment_id], "tags.`kdray.kind` = 'sweep'")[0]
    parent = c.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.data.tags["kdray.warm_start"] == "first" and parent.data.params["warm_start"] == "first"
    assert parent.data.tags["kdray.warm_start_runs"] == source.info.run_id
    assert f"#/experiments/{source.info.experiment_id}/runs/{source.info.run_id}" in parent.data.tags[
        "mlflow.note.content"]
    trials = c.search_runs([parent.info.experiment_id], "tags.`kdray.kind` = 'trial'")
    assert len(trials) == 2  # MLflow holds this sweep's trials only


def test_warm_start_top_runs_the_earlier_best_configurations_first(earlier, tmp_path, capsys):
    work, space = earlier, tmp_path / "third.yaml"
    space.write_text("name: third\n" + BASE + narrow(3))
    done = [t for t in study(work, "first").get_trials() if t.state == optuna.trial.TrialState.COMPLETE
            and NARROW_LOW <= t.params["lr"] <= NARROW_HIGH]
    best = sorted(done, key=lambda t: t.value, reverse=True)[:2]
    summary, err = tune(capsys, work, space, "--warm-start", "first", "--warm-start-top", "2")
    assert f"warm start: the best {len(best)} configuration(s) of sweep 'first' queued" in err
    s = study(work, "third")
    assert not any(FROM_ATTR in t.user_attrs for t in s.trials)  # no history: the configurations run
    first = sorted(s.trials, key=lambda t: t.number)[:len(best)]
    assert [t.user_attrs[TOP_ATTR] for t in first] == [f"first#{t.number}" for t in best]
    assert [t.params for t in first] == [{**t.params, "weight_decay": 0.0005} for t in best]
    assert sum(summary["study_counts"].values()) == 3
    assert summary["warm_start"]["queued"] == [f"first#{t.number}" for t in best]


@pytest.mark.parametrize("flags, line", [
    (["--warm-start", "nosuch"], "--warm-start 'nosuch': no sweep of that name in the Optuna storage; "
                                 "sweeps there: first"),
    (["--warm-start-top", "2"], "--warm-start-top 2 needs --warm-start SWEEP"),
    (["--warm-start", "first", "--warm-start-top", "0"], "--warm-start-top 0 is out of range; allowed: >= 1"),
    (["--warm-start", "fourth"], "--warm-start 'fourth' names this sweep itself"),
])
def test_a_bad_warm_start_is_one_line_and_starts_nothing(earlier, tmp_path, capsys, flags, line):
    space = tmp_path / "fourth.yaml"
    space.write_text("name: fourth\n" + BASE + narrow(2))
    code, out, err = run_cli(capsys, "--workdir", earlier, "tune", "--space", space, *flags)
    assert code == 2 and out == "" and line in error_line(err)
    assert "fourth" not in optuna.get_all_study_names(f"sqlite:///{earlier / 'optuna.db'}")


def test_other_objectives_are_refused(earlier, tmp_path, capsys):
    space = tmp_path / "loss.yaml"
    space.write_text("name: loss\n" + BASE.replace("metric: val_acc\nmode: max", "metric: val_loss\nmode: min")
                     + narrow(1))
    code, _, err = run_cli(capsys, "--workdir", earlier, "tune", "--space", space, "--warm-start", "first")
    assert code == 2 and "that sweep optimises val_acc (maximize), this one val_loss (minimize)" in error_line(err)


def test_fit_rules(tmp_path):
    """Ranges, constants, methods, per-branch parameters and constants filled in."""
    path = tmp_path / "s.yaml"
    path.write_text("metric: val_acc\nbase: {dataset: digits, method: ekd, epochs: 2}\n"
                    "params:\n  temperature: {type: float, low: 2, high: 8}\n  branches: {type: int, low: 1, high: 2}\n"
                    "  lr: 0.05\nper_branch:\n  branch_alpha: {type: float, low: 0.2, high: 1.0}\n")
    space = load_space(path)
    dists = space_distributions(space)
    assert sorted(dists) == ["branch_alpha_0", "branch_alpha_1", "branches", "temperature"]
    ok = {"temperature": 4.0, "branches": 2, "branch_alpha_0": 0.5, "branch_alpha_1": 0.9}
    assert fit_params(ok, {"method": "ekd"}, space, dists) == (None, ok)
    assert fit_params({**ok, "temperature": 9.0}, {}, space, dists)[0] == "outside"  # beyond the range
    assert fit_params({**ok, "branches": 3, "branch_alpha_2": 0.5}, {}, space, dists)[0] == "outside"
    assert fit_params({**ok, "lr": 0.1}, {}, space, dists)[0] == "outside"  # searched then, held at 0.05 now
    assert fit_params({**ok, "lr": 0.05}, {}, space, dists)[0] is None
    assert fit_params(ok, {"method": "kd"}, space, dists)[0] == "other_method"
    assert fit_params({**ok, "method": "feed"}, {}, space, dists)[0] == "other_method"
    # a parameter this space searches and the earlier sweep held constant takes that constant
    held = {"temperature": 4.0, "branch_alpha_0": 0.5}
    assert fit_params(held, {"branches": 1}, space, dists) == (None, {**held, "branches": 1})
    assert fit_params(held, {}, space, dists)[0] == "lacking"
    assert fit_params(held, {"branches": 5}, space, dists)[0] == "outside"


def test_warm_start_from_the_space_file_through_the_api(earlier, tmp_path):
    """`warm_start:` / `warm_start_top:` in the space file, run through kdray.sweep."""
    import kdray

    space = tmp_path / "api.yaml"
    space.write_text("name: api\n" + BASE + narrow(1) + "warm_start: first\nwarm_start_top: 1\n")
    done = [t for t in study(earlier, "first").get_trials() if t.state == optuna.trial.TrialState.COMPLETE
            and NARROW_LOW <= t.params["lr"] <= NARROW_HIGH]
    best = max(done, key=lambda t: t.value)
    result = kdray.sweep(str(space), workdir=earlier, track=False, log=lambda line: None)
    (trial,) = result.study.trials
    assert trial.user_attrs[TOP_ATTR] == f"first#{best.number}"
    assert trial.params == {**best.params, "weight_decay": 0.0005}
    assert result.summary["warm_start"]["sources"] == ["first"] and result.summary["warm_start"]["top"] == 1
