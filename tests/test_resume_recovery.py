"""A driver killed between a trial's end (recorded by the trial in its MLflow run) and Optuna's tell
(the driver's): ``--resume`` tells the study what the run recorded instead of training it again
(benchmarks/sweep_load.py found a doubled trial: 201 finished runs for 200 trials). Real Optuna and
MLflow sqlite stores."""

from __future__ import annotations

import mlflow
import optuna

from kdray.tune.recover import RECOVERED_ATTR, recover_finished_trials
from kdray.tune.search import prepare_study


def test_resume_tells_the_study_what_runs_recorded_after_the_driver_died(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("s")
    lr = {"lr": optuna.distributions.FloatDistribution(0.01, 0.1)}

    def trial_with_run(state: str, values: list, linked: bool = True) -> tuple:
        trial = study.ask(lr)
        trial.set_user_attr("ray_trial_id", f"t{trial.number}")
        run_id = client.create_run(exp, tags={"kdray.trial_id": f"t{trial.number}"}).info.run_id
        for step, v in enumerate(values, 1):
            client.log_metric(run_id, "val_acc", v, step=step)
        client.set_tag(run_id, "kdray.state", state)
        if state == "completed" and linked:
            client.set_terminated(run_id, "FINISHED")
        if linked:
            trial.set_user_attr("mlflow_run_id", run_id)
        return trial.number, run_id

    done, _ = trial_with_run("completed", [0.5, 0.7, 0.8])
    pruned, _ = trial_with_run("pruned", [0.2])
    # killed before the driver linked it, and between its state and its end: found by its Tune id, closed
    unlinked, open_run = trial_with_run("completed", [0.4, 0.6], linked=False)
    still_running, _ = trial_with_run("running", [0.3])
    no_run = study.ask(lr).number  # stopped before its run was made
    logs = []
    assert recover_finished_trials(storage, "s", None, [("val_acc", "max")], logs.append) == 0  # no MLflow
    assert recover_finished_trials(storage, "s", uri, [("val_acc", "max")], logs.append) == 3
    t = {x.number: x for x in study.get_trials()}
    assert t[done].state.name == "COMPLETE" and t[done].value == 0.8
    assert t[done].intermediate_values == {1: 0.5, 2: 0.7, 3: 0.8} and t[done].user_attrs[RECOVERED_ATTR]
    assert t[pruned].state.name == "PRUNED" and t[pruned].intermediate_values == {1: 0.2}
    assert t[unlinked].state.name == "COMPLETE" and t[unlinked].user_attrs["mlflow_run_id"] == open_run
    run = client.get_run(open_run)
    assert run.info.status == "FINISHED" and run.data.tags["optuna.trial_number"] == str(unlinked)
    assert t[still_running].state.name == "RUNNING" and t[no_run].state.name == "RUNNING"
    assert "3 trial(s) had finished in MLflow" in logs[-1]
    # then resume closes the others as interrupted and queues them: 6 samples, 3 finished, 3 to run
    assert prepare_study(storage, "s", 6, True, logs.append) == 3
    t = {x.number: x for x in study.get_trials()}
    assert {t[still_running].state.name, t[no_run].state.name} == {"FAIL"}
    assert t[still_running].user_attrs["interrupted"] and t[done].state.name == "COMPLETE"


def test_resume_of_a_sweep_that_never_started_starts_it(tmp_path, capsys, local_ray):
    """`kdray tune --resume` before any session made the study (benchmarks/cifar_table.py always
    passes --resume): the sweep starts, rather than failing on the study it has not made yet."""
    from conftest import run_cli

    space = tmp_path / "s.yaml"
    space.write_text("name: fresh\nsamples: 1\nbase: {dataset: digits, image_size: 16, student: resnet8, epochs: 1, "
                     "batch_size: 64, device: cpu, method: ce}\nparams:\n  lr: {type: float, low: 0.01, high: 0.1}\n")
    rc, out, err = run_cli(capsys, "--workdir", tmp_path / "w", "tune", "--space", space, "--resume", "--no-track",
                           "--json")
    assert rc == 0 and "no study 'fresh' yet; starting it" in err, err
