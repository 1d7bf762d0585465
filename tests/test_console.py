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
    epochs = [ln for ln in lines if " epoch " in ln]
    assert epochs and all("best val_acc=" in ln for ln in epochs)
    assert any("ETA <= " in ln for ln in epochs) and lines[-1].endswith("done")


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
