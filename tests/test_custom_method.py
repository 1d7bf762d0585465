"""A method written in this one file -- its ``@register`` and its declared hyperparameter -- trains
from ``kdray train --method NAME --set its_param=...``, gets a CLI flag, and is searched from a
space file on real Ray workers, with no other file of kdray edited."""

from __future__ import annotations

import json

import optuna
import pytest
import torch.nn.functional as F
from conftest import sweep_in_process

from kdray.cli import main
from kdray.cli.parser import build_parser
from kdray.distill import HParam, Method, get_method, register, unregister
from kdray.distill.losses import kd_kl, soften

pytestmark = pytest.mark.slow


@register
class SmoothKD(Method):
    """KD from the mean teacher plus label smoothing on the CE term."""

    name = "smooth_kd"
    hparams = (HParam("smoothing", float, 0.0, "label smoothing of the CE term", low=0, high=0.5),)

    def forward(self, y, s_out, t_out):
        z = s_out["logits"]
        terms = {"ce": F.cross_entropy(z, y, label_smoothing=self.cfg.smoothing)}
        terms["kd"] = kd_kl(z, soften(t_out["logits"].float().mean(0), self.T), self.T)
        return z, terms


@pytest.fixture(scope="module", autouse=True)
def _forget_the_method_afterwards():
    """The method is registered at import, as a user's would be; later test modules expect kdray's
    own methods and keys only."""
    yield
    unregister("smooth_kd")


BASE = ["--dataset", "fake", "--image-size", "16", "--student", "resnet8", "--device", "cpu", "--epochs", "1"]


def test_declared_hyperparameter_is_a_config_key_a_flag_and_range_checked(capsys):
    assert get_method("smooth_kd") is SmoothKD
    assert "--smoothing" in _train_help() and "label smoothing of the CE term (smooth_kd" in _train_help()
    rc = main(["train", "--method", "smooth_kd", "--set", "smoothing=0.9", "--no-track", *BASE])
    err = capsys.readouterr().err
    assert rc == 2 and "smoothing=0.9 is out of range; allowed: 0..0.5" in err


def _train_help() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["train"].format_help()


def test_trains_from_the_cli_with_set(tmp_path, capsys, fake_teachers):
    rc = main(["--workdir", str(tmp_path), "train", "--method", "smooth_kd", "--set", "smoothing=0.2",
               "--teachers", str(fake_teachers), "--no-track", "--json", *BASE])
    out, err = capsys.readouterr()
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["method"] == "smooth_kd" and 0 <= summary["test_acc"] <= 1
    assert "kd=" in err and "ce=" in err  # both of the method's terms were trained and reported


def test_searched_from_a_space_file_on_ray_workers(tmp_path, capsys, fake_teachers):
    rows = sweep_in_process(tmp_path, capsys, (
        "name: smooth\nsamples: 2\n"
        f"base: {{dataset: fake, image_size: 16, student: resnet8, device: cpu, method: smooth_kd, epochs: 1, "
        f"teachers: {fake_teachers}}}\n"
        "params:\n  smoothing: {type: float, low: 0.05, high: 0.4}\n"), "smooth")
    assert len(rows) == 2
    storage = optuna.storages.RDBStorage(f"sqlite:///{(tmp_path / 'w').resolve() / 'optuna.db'}")
    trials = optuna.load_study(study_name="smooth", storage=storage).get_trials(deepcopy=False)
    assert all(0.05 <= t.params["smoothing"] <= 0.4 for t in trials) and len(trials) == 2


def test_other_methods_still_run_on_ray_workers_while_it_is_registered(tmp_path, capsys):
    """Every config carries every declared hyperparameter (`smoothing` too): the workers of a ce
    run get the method's declaration with it, or they would refuse the config's keys."""
    import ray

    try:
        rc = main(["--workdir", str(tmp_path), "train", "--method", "ce", "--workers", "2", "--no-track",
                   "--json", *BASE])
    finally:
        ray.shutdown()
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["method"] == "ce"
