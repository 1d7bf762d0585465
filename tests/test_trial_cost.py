"""What a trial cost (issue 25, item 4): every epoch of every trial logs its wall time, images/s,
CPU utilisation, peak memory and the share of step time spent waiting for data, all measured by
the training process without a thread of its own; the sweep's parent run sums trial-hours by the
state the trials ended in; `kdray best` shows the costs.

The sweep: digits at 16 px, resnet8 (built through a registered builder that also notes the trial
process's threads), 3 trials of up to 3 epochs one at a time, ASHA grace period 1, sampler seed 6
(its second trial, at lr 1e-6, is pruned after its first epoch; cf. test_optuna_agreement.py),
real local Ray, a real Optuna sqlite study and a real MLflow sqlite store.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import time

import mlflow
import pytest
import torch
from conftest import small_cfg

from kdray.cli import main
from kdray.training.cost import EpochCost, peak_rss_mb, reset_peak_rss

#: logged every epoch, each > 0 (on a CPU; gpu_util and gpu_peak_mb only on CUDA)
COSTS = ("epoch_time_s", "images_per_s", "cpu_cores", "cpu_util", "peak_rss_mb")
#: logged every epoch, >= 0 (on digits in memory the wait for a batch is tiny but measured)
WAITS = ("data_wait_s", "data_wait_share")


def thread_module(t: threading.Thread) -> str:
    """The module of the code a thread runs (its target, else its class's run)."""
    fn = getattr(t, "_target", None) or type(t).run
    return getattr(fn, "__module__", None) or ""


def kdray_threads() -> list:
    return [t.name for t in threading.enumerate()
            if t.name.lower().startswith("kdray") or thread_module(t).startswith("kdray")]


# ---------------------------------------------------------------------------------------------
# the measurement
# ---------------------------------------------------------------------------------------------
def test_an_epochs_costs_are_measured_by_the_process_with_no_thread():
    threads = threading.active_count()
    cost = EpochCost(torch.device("cpu"))

    def batches(n: int, wait_s: float):
        for i in range(n):
            time.sleep(wait_s)  # the loader: waiting, not computing
            yield i

    cost.start()
    ballast = None
    for _ in cost.batches(batches(4, 0.05)):
        ballast = b"\x01" * (96 * 2**20)  # the step: 96 MiB written, and CPU work
        sum(range(200_000))
    big = cost.stop()
    del ballast
    assert threading.active_count() == threads  # nothing started
    assert set(big) == {"cpu_cores", "cpu_util", "peak_rss_mb", "data_wait_s", "data_wait_share"}  # no GPU here
    assert big["data_wait_s"] >= 0.2 and 0.2 < big["data_wait_share"] <= 1.0
    assert big["cpu_cores"] > 0 and 0 < big["cpu_util"] <= big["cpu_cores"]
    assert big["peak_rss_mb"] > 96

    cost.start()
    for _ in cost.batches(range(3)):
        sum(range(200_000))
    small = cost.stop()
    assert small["data_wait_s"] < big["data_wait_s"] and small["cpu_cores"] > 0
    if reset_peak_rss():  # Linux: the peak is the epoch's own, not the process's so far
        assert small["peak_rss_mb"] < big["peak_rss_mb"] - 48
    assert peak_rss_mb(False) > 0


class Stopped(Exception):
    """What a scheduler's stop looks like to the training function: its report call raises."""


def test_a_trial_stopped_at_its_report_leaves_no_thread(tmp_path):
    from kdray.training.fit import fit

    before = {t.ident for t in threading.enumerate()}
    seen = []

    def reporter(metrics: dict, ckpt_dir) -> None:
        seen.append((dict(metrics), kdray_threads()))
        raise Stopped  # ASHA stops the trial after its first epoch

    with pytest.raises(Stopped):
        fit(small_cfg(method="ce", epochs=3), reporter=reporter, checkpoint_root=str(tmp_path), log=lambda s: None)
    (metrics, during), = seen
    assert during == []  # none while the trial ran
    assert all(metrics[k] > 0 for k in COSTS) and all(metrics[k] >= 0 for k in WAITS)
    assert not {t.ident for t in threading.enumerate()} - before  # none outlives it


# ---------------------------------------------------------------------------------------------
# a sweep through the CLI
# ---------------------------------------------------------------------------------------------
SPACE = ("name: cost\nmetric: val_acc\nmode: max\nsamples: 3\nseed: 6\n"
         "base: {dataset: digits, image_size: 16, method: ce, student: probe8, batch_size: 64, device: cpu, "
         "precise_bn: true, epochs: 3}\n"
         "params:\n  lr: {type: categorical, choices: [0.1, 0.000001]}\n"
         "  weight_decay: {type: float, low: 0.0001, high: 0.001, log: true}\n"
         "scheduler: {grace_period: 1, reduction_factor: 2}\n")


def probe_builder(notes: str):
    """resnet8, whose builder first notes (in file ``notes``) the threads of the process building
    it, with the Tune trial it builds for: a trial's process, at the trial's start."""
    def build(num_classes: int):
        from kdray.models import build_model

        try:
            import ray.tune

            trial = ray.tune.get_context().get_trial_id()
        except Exception:  # noqa: BLE001 - not in a trial
            trial = None
        with open(notes, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "t": time.time(), "trial": trial,
                                 "me": threading.current_thread().name,
                                 "threads": [t.name for t in threading.enumerate()],
                                 "kdray_threads": kdray_threads()}) + "\n")
        return build_model("resnet8", num_classes)

    return build


@pytest.fixture(scope="module")
def swept(tmp_path_factory, local_ray):
    from kdray.models import registered_model

    tmp = tmp_path_factory.mktemp("cost")
    space, work, notes = tmp / "cost.yaml", tmp / "w", tmp / "threads.jsonl"
    space.write_text(SPACE)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    out = io.StringIO()
    with registered_model("probe8", probe_builder(str(notes))), contextlib.redirect_stdout(out):
        rc = main(["--workdir", str(work), "tune", "--space", str(space), "--tracking-uri", uri, "--json"])
    assert rc == 0, out.getvalue()[-2000:]
    return {"summary": json.loads(out.getvalue()), "client": mlflow.MlflowClient(uri), "uri": uri, "work": work,
            "notes": [json.loads(line) for line in notes.read_text().splitlines()]}


def trial_runs(client):
    exp = client.get_experiment_by_name("cost")
    return client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'")


@pytest.mark.slow
def test_every_epoch_of_every_trial_logs_its_costs(swept):
    c = swept["client"]
    runs = trial_runs(c)
    states = sorted(r.data.tags["kdray.state"] for r in runs)
    assert len(runs) == 3 and "pruned" in states and "completed" in states, states
    for run in runs:
        epochs = {m.step for m in c.get_metric_history(run.info.run_id, "val_acc")}
        assert epochs, run.info.run_name
        for key in COSTS + WAITS:
            history = {m.step: m.value for m in c.get_metric_history(run.info.run_id, key)}
            assert set(history) == epochs, (run.info.run_name, key)  # every epoch, step = epoch
            assert all(v > 0 if key in COSTS else v >= 0 for v in history.values()), (key, history)
        assert run.data.metrics["data_wait_share"] <= 1
        assert not {"gpu_util", "gpu_peak_mb"} & set(run.data.metrics)  # a CPU sweep


@pytest.mark.slow
def test_the_parent_sums_trial_hours_by_state(swept):
    c, summary = swept["client"], swept["summary"]
    exp = c.get_experiment_by_name("cost")
    parent = c.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'sweep'")[0]
    m = parent.data.metrics
    expected = {s: 0.0 for s in ("completed", "pruned", "failed")}
    for row in summary["trials"]:
        t = row["timing"]
        expected[row["state"]] += (t["ended_at_s"] - t["started_at_s"]) / 3600
    for state, hours in expected.items():
        assert m[f"trial_hours_{state}"] == pytest.approx(hours, abs=1e-6), state
    assert m["trial_hours_completed"] > 0 and m["trial_hours_pruned"] > 0 and m["trial_hours_failed"] == 0
    assert summary["timing"]["trial_hours"] == pytest.approx({f"trial_hours_{s}": h for s, h in expected.items()})
    assert "Trial time by state:" in parent.data.tags["mlflow.note.content"]
    runs = {r.data.tags["kdray.trial_id"]: r for r in trial_runs(c)}
    for row in summary["trials"]:  # a trial's time in its slot holds its epochs
        epochs = sum(x.value for x in c.get_metric_history(runs[row["trial"]].info.run_id, "epoch_time_s"))
        assert row["timing"]["ended_at_s"] - row["timing"]["started_at_s"] >= epochs - 0.2


@pytest.mark.slow
def test_no_sampling_thread_lives_in_a_trial_process_nor_outlives_a_pruned_trial(swept):
    rows = sorted(swept["summary"]["trials"], key=lambda r: r["timing"]["started_at_s"])
    first_build = {}
    for n in sorted(swept["notes"], key=lambda n: n["t"]):
        first_build.setdefault(n["trial"], n)
    assert set(first_build) - {None} == {r["trial"] for r in rows}, first_build.keys()
    assert all(n["kdray_threads"] == [] for n in swept["notes"]), swept["notes"]  # none while a trial trains
    # one trial at a time: Tune reuses a trial's process for the next trial; the pruned trial's
    # training thread has ended by the time the next one builds its student
    reused = 0
    for ended, nxt in zip(rows, rows[1:]):
        a, b = first_build[ended["trial"]], first_build[nxt["trial"]]
        if ended["state"] == "pruned" and a["pid"] == b["pid"]:
            assert a["me"] not in b["threads"], (a, b)
            reused += 1
    pruned = [r for r in rows[:-1] if r["state"] == "pruned"]
    assert reused == len(pruned) or len({n["pid"] for n in first_build.values()}) == len(rows)


@pytest.mark.slow
def test_kdray_best_shows_what_each_run_cost(swept, capsys):
    args = ["--workdir", str(swept["work"]), "best", "--experiment", "cost", "--tracking-uri", swept["uri"]]
    assert main(args + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["runs"]
    assert rows
    for r in rows:
        assert r["wall_s"] > 0 and r["images_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["cpu_util"] > 0
        assert r["epoch_time_s"] > 0 and 0 <= r["data_wait_share"] <= 1
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[-4:] == ["wall_s", "img/s", "wait", "peak_mb"]
    assert all(float(v) >= 0 for v in lines[2].split()[-4:])  # a number, not "-"
