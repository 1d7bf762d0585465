"""Search spaces: every shipped file loads; bad files fail before any trial with file + key."""

from pathlib import Path

import optuna
import pytest

from kdray.core.errors import KdrayError
from kdray.tune.space import load_space

SPACES = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_spaces_load(path):
    space = load_space(path)
    assert space.samples >= 1 and space.metrics


def test_shipped_set_is_complete():
    assert {"quick.yaml", "ekd.yaml", "feed.yaml", "baselines.yaml"} <= {p.name for p in SPACES}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("params: {temperature: {type: float, low: 1, high: [}\n", "malformed YAML"),
        (
            "params:\n  temprature: {type: float, low: 1, high: 10}\n",
            "unknown key 'temprature' (did you mean 'temperature'?)",
        ),
        ("params:\n  temperature: {type: float, low: 10, high: 1}\n", "params.temperature: low 10 > high 1"),
        ("params:\n  lr: {type: float, low: 0, high: 1, log: true}\n", "log range needs low > 0"),
        ("params:\n  lr: {type: beta, low: 0, high: 1}\n", "type 'beta' is not allowed"),
        ("params:\n  branches: {type: int, low: 1, high: 12}\n", "branches=12 is out of range"),
        ("base: {method: ekd, epochs: 0}\n", "epochs=0 is out of range"),
        ("sweeps: 3\n", "unknown top-level key 'sweeps'"),
        ("per_branch:\n  lr: {type: float, low: 0, high: 1}\n", "per_branch.lr is not a per-branch key"),
    ],
)
def test_bad_space_names_file_and_key(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(KdrayError) as err:
        load_space(f)
    assert needle in str(err.value) and str(f) in str(err.value)


def test_per_branch_parameters_follow_branch_count(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("params:\n  branches: {type: int, low: 1, high: 4}\n  lr: 0.1\n"
                 "per_branch:\n  branch_alpha: {type: float, low: 0, high: 1}\n")
    space = load_space(f)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        trial = study.ask()
        constants = space.define_by_run()(trial)
        cfg = space.trial_config({**trial.params, **constants})
        assert cfg.lr == 0.1
        assert len(cfg.branch_alpha) == cfg.branches == trial.params["branches"]
        assert sorted(k for k in trial.params if k.startswith("branch_alpha_")) == [
            f"branch_alpha_{b}" for b in range(cfg.branches)]
        study.tell(trial, 0.5)
