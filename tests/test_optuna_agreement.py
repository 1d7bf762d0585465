"""Optuna and MLflow tell the same story of a sweep (real Ray, a real Optuna sqlite study and a
real MLflow sqlite store, all under tmp_path): every trial's intermediate value per epoch and its
final value equal its MLflow run's metric history, pruned trials included; the objective is named;
each Optuna trial holds its MLflow run id and each run its Optuna trial number; each sweep draws its
own sampler seed unless one is given, records it in both stores, and a resumed sweep keeps it.

Digits at 16 px, resnet8, 1-3 epochs of about a second: the cost is Ray's start-up and the trials'
fixed cost, so the sweeps are as small as each property allows.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest

from kdray.api import sweep
from kdray.cli import main

pytestmark = pytest.mark.slow

BASE = ("base: {dataset: digits, image_size: 16, method: ce, student: resnet8, batch_size: 64, device: cpu, "
        "precise_bn: true, epochs: %d}\n")

# Sampler seed 6 proposes lr 0.1, then 1e-6, then 0.1 (the first three random start-up trials of
# TPE): the second trial is still at chance after its first epoch, below the first, and ASHA
# (grace period 1) stops it there; the third may be stopped at epoch 2.
AGREE = ("name: agree\nmetric: val_acc\nmode: max\nsamples: 3\nseed: 6\n" + BASE % 3 +
         "params:\n  lr: {type: categorical, choices: [0.1, 0.000001]}\n"
         "  weight_decay: {type: float, low: 0.0001, high: 0.001, log: true}\n"
         "scheduler: {grace_period: 1, reduction_factor: 2}\n")

ONE_TRIAL = ("metric: val_acc\nmode: max\nsamples: 1\n" + BASE % 1 +
             "params:\n  lr: {type: float, low: 0.01, high: 0.2, log: true}\n"
             "  weight_decay: {type: float, low: 0.0001, high: 0.001, log: true}\n")


def stores(work: Path):
    return (optuna.storages.RDBStorage(f"sqlite:///{work / 'optuna.db'}"),
            mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}"))


def sweep_run(client, name: str, session: int = 0):
    """The MLflow sweep run of ``name``'s ``session``-th session."""
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs(
        [exp.experiment_id], "tags.`kdray.kind` = 'sweep'", order_by=["attributes.start_time ASC"]
    )
    return runs[session]


def test_optuna_and_mlflow_agree_on_every_epoch_of_every_trial_pruned_ones_included(tmp_path, local_ray):
    space = tmp_path / "agree.yaml"
    space.write_text(AGREE)
    work = tmp_path / "w"
    sweep(str(space), workdir=work, tracking_uri=f"sqlite:///{work / 'mlflow.db'}", log=lambda s: None)
    storage, client = stores(work)
    study = optuna.load_study(study_name="agree", storage=storage)
    assert study.metric_names == ["val_acc"]  # optuna-dashboard names the objective
    trials = study.get_trials(deepcopy=False)
    by_state = {s: [t for t in trials if t.state.name == s] for s in ("COMPLETE", "PRUNED")}
    assert len(trials) == 3 and by_state["COMPLETE"] and by_state["PRUNED"], [t.state.name for t in trials]
    exp = client.get_experiment_by_name("agree")
    parent = sweep_run(client, "agree")
    for t in trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])  # Optuna -> MLflow ...
        assert run.data.tags["optuna.trial_number"] == str(t.number)  # ... and back
        assert run.data.tags["optuna.study_name"] == "agree"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["kdray.trial_id"] == t.user_attrs["ray_trial_id"]
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc")}
        last = max(history)
        assert t.intermediate_values == history, (t.number, t.state.name)  # every epoch, the last one included
        assert t.value == history[last]  # a pruned trial's too: its last epoch, not the one before
        assert run.data.tags["kdray.state"] == {"COMPLETE": "completed", "PRUNED": "pruned"}[t.state.name]
        assert (last == 3) == (t.state.name == "COMPLETE")
    runs = client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'")
    assert sorted(r.data.tags["optuna.trial_number"] for r in runs) == ["0", "1", "2"]  # one run per trial
    assert study.user_attrs["seed"] == 6 and study.user_attrs["seed_source"] == "space"
    assert parent.data.params["optuna_seed"] == "6" and parent.data.params["optuna_seed_source"] == "space"


def first_params(work: Path, name: str) -> dict:
    storage, _ = stores(work)
    return optuna.load_study(study_name=name, storage=storage).trials[0].params


def test_each_sweep_draws_its_own_seed_unless_given_and_records_it(tmp_path, local_ray, capsys):
    """Two sweeps of one space without a seed propose different first trials; `--seed` with the
    seed the first recorded proposes the first one's again; the seed is in the study and the run."""
    space = tmp_path / "one.yaml"
    space.write_text(ONE_TRIAL)
    work = tmp_path / "w"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    for name in ("a", "b"):
        sweep(str(space), experiment=name, workdir=work, tracking_uri=uri, log=lambda s: None)
    storage, client = stores(work)
    seeds = {n: optuna.load_study(study_name=n, storage=storage).user_attrs for n in ("a", "b")}
    assert seeds["a"]["seed_source"] == seeds["b"]["seed_source"] == "random"
    assert seeds["a"]["seed"] != seeds["b"]["seed"]
    assert first_params(work, "a") != first_params(work, "b")
    for n in ("a", "b"):
        params = sweep_run(client, n).data.params
        assert params["optuna_seed"] == str(seeds[n]["seed"]) and params["optuna_seed_source"] == "random"

    rc = main(["--workdir", str(work), "tune", "--space", str(space), "--experiment", "c",
               "--seed", str(seeds["a"]["seed"]), "--tracking-uri", uri])
    assert rc == 0, capsys.readouterr().err[-3000:]
    assert f"sampler seed {seeds['a']['seed']} (--seed)" in capsys.readouterr().err
    assert first_params(work, "c") == first_params(work, "a")  # the recorded seed repeats the proposals
    assert optuna.load_study(study_name="c", storage=storage).user_attrs["seed_source"] == "--seed"
    assert sweep_run(client, "c").data.params["optuna_seed"] == str(seeds["a"]["seed"])


def test_resumed_sweep_keeps_its_seed_without_replaying_its_first_trials(tmp_path, local_ray):
    """--resume with another --seed: the study keeps its seed (recorded on the new sweep run too);
    the session's sampler starts from (seed, trials so far), so it does not propose the first
    session's trial again, as a sampler seeded alike in a new process would."""
    space = tmp_path / "one.yaml"
    space.write_text(ONE_TRIAL)
    work = tmp_path / "w"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    sweep(str(space), experiment="r", workdir=work, tracking_uri=uri, seed=5, log=lambda s: None)
    lines: list = []
    sweep(str(space), experiment="r", workdir=work, tracking_uri=uri, seed=9, resume=True, samples=2,
          log=lines.append)
    assert any("--seed 9 ignored: the resumed sweep 'r' keeps its seed 5" in ln for ln in lines), lines
    storage, client = stores(work)
    study = optuna.load_study(study_name="r", storage=storage)
    assert study.user_attrs["seed"] == 5 and study.user_attrs["seed_source"] == "--seed"
    t0, t1 = study.trials
    assert t0.params != t1.params
    again = sweep_run(client, "r", session=1).data.params
    assert again["optuna_seed"] == "5" and again["optuna_seed_source"] == "study"
    assert again["optuna_sampler_seed"] != "5"


def test_seed_out_of_range_is_refused_before_anything_starts(tmp_path):
    from kdray.core.errors import KdrayError
    from kdray.tune.space import load_space

    bad = tmp_path / "bad.yaml"
    bad.write_text(ONE_TRIAL + f"seed: {2**32}\n")
    with pytest.raises(KdrayError, match="seed must be an integer in 0 .. 4294967295"):
        load_space(bad)
    space = tmp_path / "ok.yaml"
    space.write_text(ONE_TRIAL)
    with pytest.raises(KdrayError, match="--seed -1 is out of range"):
        sweep(str(space), workdir=tmp_path / "w", seed=-1, track=False, log=lambda s: None)
