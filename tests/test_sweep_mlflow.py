"""A real sweep tracked by a real `mlflow server` on loopback, read the way a user reads it: `kdray
tune` on digits (local Ray, trials logging over HTTP; one trial completes, one is pruned by ASHA,
one fails), then what MLflow holds (experiment, parent, trials, logged models), the first screen
of the sweep's experiment in headless Chromium, and `kdray best --register` + loading the champion
from raw scikit-learn digits in a fresh process.

Screenshots for the notes: /tmp/kdray-shots/first-screen.png and champion.png ($KDRAY_TEST_ARTIFACTS
overrides the folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow_support import artifacts_dir, grid_rows, mlflow_server, screenshot, wait_for_names  # noqa: F401

pytestmark = pytest.mark.mlflow_server

# Sampler seed 29 proposes lr 0.05 (learns), then 1e-5 (ASHA stops it: below the first trial at
# epoch 2), then 1e12 (the loss turns NaN: failed) -- one trial of each state.
SPACE = """\
name: story
metric: val_acc
mode: max
samples: 3
seed: 29
base: {dataset: digits, image_size: 16, method: ekd, student: resnet8, epochs: 4, batch_size: 64, device: cpu}
teachers: {arch: [resnet8], count: 2, epochs: 2, train_fraction: 1.0}
params:
  lr: {type: categorical, choices: [0.05, 0.00001, 1.0e+12]}
  branches: {type: int, low: 1, high: 2}
per_branch:
  branch_alpha: {type: float, low: 0.3, high: 1.0}
scheduler: {grace_period: 1, reduction_factor: 2}
"""
SEARCHED = ["lr", "branches", "branch_alpha_0", "branch_alpha_1"]
WIDE = (3000, 1200)  # the runs table renders only the columns in the window: all of them here


def kdray(*argv, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("kdray")
    return subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "MLFLOW_TRACKING_URI": ""})


@pytest.fixture(scope="module")
def sweep(mlflow_server, tmp_path_factory):  # noqa: F811
    import mlflow

    wd = tmp_path_factory.mktemp("sweep-work")
    space = wd / "story.yaml"
    space.write_text(SPACE)
    proc = kdray("--workdir", str(wd), "tune", "--space", str(space), "--concurrency", "1",
                 "--tracking-uri", mlflow_server.url, "--json", cwd=wd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = mlflow.MlflowClient(mlflow_server.url)
    exp = c.get_experiment_by_name("story")
    runs = c.search_runs([exp.experiment_id], max_results=100)
    trials = {r.data.tags["kdray.state"]: r for r in runs if r.data.tags.get("kdray.kind") == "trial"}
    (parent,) = [r for r in runs if r.data.tags.get("kdray.kind") == "sweep"]
    return {"result": json.loads(proc.stdout.strip().splitlines()[-1]), "workdir": wd, "url": mlflow_server.url,
            "stderr": proc.stderr, "client": c, "exp": exp, "parent": parent, "trials": trials}


def test_experiment_opens_on_a_saved_view_of_the_ranked_trials(sweep):
    from kdray.tracking.tags import TRIALS_VIEW, VIEW_TAG_PREFIX
    from kdray.tracking.view import ui_path

    tags = sweep["exp"].tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags[VIEW_TAG_PREFIX + TRIALS_VIEW])
    state = json.loads(view["state"])
    assert view["name"] == "kdray: trials by val_acc"
    assert state["orderByKey"] == "metrics.`val_acc`" and state["orderByAsc"] is False
    assert state["searchFilter"] == "tags.`kdray.kind` = 'trial'"
    assert state["selectedColumns"][:4] == ["tags.`kdray.state`", "params.`method`", "metrics.`val_acc`",
                                            "metrics.`test_acc`"]
    assert {f"params.`{p}`" for p in SEARCHED} <= set(state["selectedColumns"])
    assert ui_path(sweep["exp"].experiment_id) in tags["mlflow.note.content"]
    assert ui_path(sweep["exp"].experiment_id) in sweep["stderr"]  # printed at the end of the sweep


def test_trials_one_per_state_with_their_own_params_and_no_bookkeeping(sweep):
    c, trials, wd = sweep["client"], sweep["trials"], sweep["workdir"]
    assert set(trials) == {"completed", "pruned", "failed"}
    status = {s: r.info.status for s, r in trials.items()}
    assert status == {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}
    # named after their Optuna trial: method-number, in the order the sampler proposed them
    assert [trials[s].info.run_name for s in ("completed", "pruned", "failed")] == ["ekd-0", "ekd-1", "ekd-2"]
    assert trials["completed"].data.tags["mlflow.note.content"].startswith("Completed after epoch 4: val_acc")
    pruned_note = trials["pruned"].data.tags["mlflow.note.content"]
    assert pruned_note.startswith("Pruned after epoch ") and "(stopped early by the sweep's scheduler)" in pruned_note
    assert trials["failed"].data.tags["mlflow.note.content"].startswith("Failed in its first epoch: NonFiniteLoss")
    for state, r in trials.items():
        p, t, m = r.data.params, r.data.tags, r.data.metrics
        assert "feed_weight" not in p and "generations" not in p  # FEED's / SFEED's, not EKD's
        assert "branch_alpha" not in p and {f"branch_alpha_{b}" for b in range(int(p["branches"]))} <= set(p)
        assert all(len(p[k]) <= 6 for k in ("lr", "branch_alpha_0"))  # 4 significant digits
        assert p["teachers"].startswith("teachers/")  # relative to the workdir
        assert not [v for v in (*p.values(), *t.values()) if str(wd) in v or "/tmp/" in v]
        assert not {"epochs", "generation", "generations", "total_epochs", "branch_params", "done"} & set(m)
        assert r.inputs.dataset_inputs[0].dataset.name == "digits"
    completed = trials["completed"]
    hist = c.get_metric_history(completed.info.run_id, "val_acc")
    assert sorted(h.step for h in hist) == [1, 2, 3, 4]
    assert completed.data.metrics["latency_ms"] > 0 and "test_acc" in completed.data.metrics
    assert trials["pruned"].data.metrics["epoch"] < 4


def test_every_trial_that_trained_has_a_logged_student_model(sweep):
    c, trials = sweep["client"], sweep["trials"]
    models = c.search_logged_models([sweep["exp"].experiment_id], filter_string="model_type = 'kdray-student'")
    by_run = {m.source_run_id: m for m in models}
    for state in ("completed", "pruned"):
        model = by_run[trials[state].info.run_id]
        assert model.name == "ekd-resnet8" and str(model.status.value) == "READY"
        assert model.tags["kdray.state"] == state and "val_acc" in {x.key for x in model.metrics}
        assert [a.path for a in c.list_logged_model_artifacts(model.model_id)] == ["student.pt"]
    assert trials["failed"].info.run_id not in by_run  # it failed before its first epoch


def test_parent_run_carries_the_best_trial(sweep):
    c, parent, best = sweep["client"], sweep["parent"], sweep["trials"]["completed"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep-story"
    assert parent.data.tags["kdray.best_run_id"] == best.info.run_id
    hours = {k: v for k, v in parent.data.metrics.items() if k.startswith("trial_hours_")}
    assert {k: v for k, v in parent.data.metrics.items() if k not in hours} == best.data.metrics
    assert set(hours) == {"trial_hours_completed", "trial_hours_pruned", "trial_hours_failed"}  # by state
    assert all(v > 0 for v in hours.values()), hours  # one trial of each
    assert {k: v for k, v in parent.data.params.items() if k in best.data.params} == best.data.params
    assert not [k for k in parent.data.params if k.startswith("base.")]
    assert parent.data.tags["kdray.optuna_storage"] == "sqlite:///optuna.db"  # relative to the workdir
    assert not [v for v in (*parent.data.params.values(), *parent.data.tags.values()) if str(sweep["workdir"]) in v]
    note = parent.data.tags["mlflow.note.content"]
    assert "1 completed, 1 pruned, 1 failed" in note and f"runs/{best.info.run_id})" in note
    assert sweep["result"]["best"]["mlflow_run_id"] == best.info.run_id
    plots = {a.path for a in c.list_artifacts(parent.info.run_id, "plots")}
    # one completed trial: nothing varied among completed trials (no parallel coordinates), no
    # parameter importances; learning curves are MLflow's own chart view
    assert plots == {"plots/optimization_history.png"}


def test_first_screen_shows_the_trials_ranked_with_their_state(sweep):
    from kdray.tracking.view import ui_path

    names = [sweep["trials"][s].info.run_name for s in ("completed", "pruned", "failed")]
    words = [*names, "completed", "pruned", "failed", "ekd", "val_acc", "test_acc", "params", *SEARCHED, "Models"]
    url = f"{sweep['url']}/{ui_path(sweep['exp'].experiment_id)}"
    dom = wait_for_names(url, words, size=WIDE)
    shown = set().union(*grid_rows(dom, words).values()) | {w for w in words if f">{w}<" in dom}
    assert set(words) <= shown, set(words) - shown
    rows = grid_rows(dom, [*names, "completed", "pruned", "failed"])
    # best first: the completed trial, then the pruned one (a partial score), the failed one last
    assert [rows[i] for i in range(3)] == [{names[0], "completed"}, {names[1], "pruned"}, {names[2], "failed"}]
    # wide enough for every column next to MLflow's assistant panel (open on a first visit)
    screenshot(url, artifacts_dir() / "first-screen.png", size=(2560, 1080), wait_ms=30000)


def test_register_champion_leaves_the_run_as_it_was_and_loads_from_raw_digits(sweep, tmp_path):
    from sklearn.datasets import load_digits

    from kdray.data.splits import TEST_FRACTION, split_indices

    c, best = sweep["client"], sweep["trials"]["completed"]
    before = c.get_run(best.info.run_id)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = kdray("--workdir", str(sweep["workdir"]), "best", "--experiment", "story", "--tracking-uri", sweep["url"],
                 "--register", "digits-student", "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reg = json.loads(proc.stdout)["registered"]
    assert reg["run_id"] == best.info.run_id
    after = c.get_run(best.info.run_id)
    assert (after.info.start_time, after.info.end_time, after.info.status) == (
        before.info.start_time, before.info.end_time, before.info.status)
    assert after.data.to_dictionary() == before.data.to_dictionary()

    version = c.get_model_version_by_alias("digits-student", "champion")
    assert "sklearn.datasets.load_digits().images" in version.description
    assert version.tags["test_acc"] == f"{best.data.metrics['test_acc']:.4f}"
    assert version.tags["trial"] == best.info.run_name and version.tags["sweep"] == "sweep-story"
    assert version.tags["teachers"] == "resnet8,resnet8" and version.run_id == best.info.run_id

    # a fresh process, no kdray: the README's lines with this store's URI, on raw sklearn digits
    # (kdray's held-out test split of them, to compare with the logged test accuracy)
    test = split_indices(load_digits().target, val_fraction=0.1, test_fraction=TEST_FRACTION)["test"].tolist()
    code = ("import sys; sys.modules['kdray'] = None  # any import of kdray fails\n"
            f"import mlflow, torch; mlflow.set_tracking_uri({sweep['url']!r}); "
            "m = mlflow.pytorch.load_model('models:/digits-student@champion')\n"
            "from sklearn.datasets import load_digits\n"
            f"d = load_digits(); test = {test}\n"
            "x = torch.tensor(d.images[test], dtype=torch.float32)\n"
            "print((m(x).argmax(1) == torch.tensor(d.target[test])).double().mean().item())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    load = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": ""})
    assert load.returncode == 0, load.stderr[-2000:]
    acc = float(load.stdout.strip().splitlines()[-1])
    assert acc == pytest.approx(best.data.metrics["test_acc"], abs=1.0 / len(test))
    assert not list(cwd.iterdir())  # no stray mlflow.db (or mlruns) where it ran

    url = f"{sweep['url']}/#/models/digits-student/versions/{version.version}"
    dom = wait_for_names(url, ["champion", "load_digits"], size=(1920, 1080))
    assert "champion" in dom and "load_digits" in dom
    screenshot(url, artifacts_dir() / "champion.png", size=(1920, 1080), wait_ms=20000)
