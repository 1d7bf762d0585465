"""The step-throughput benchmark times the engine's own ``train_epoch`` (the function ``fit``
runs each epoch), not a copy of its loop; it runs end to end on tiny settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import small_cfg

import kdray.training.fit as fit_module
import kdray.training.loop as loop

ROOT = Path(__file__).resolve().parents[1]


def test_fit_trains_each_epoch_through_train_epoch(tmp_path, monkeypatch):
    calls = []
    real = loop.train_epoch

    def counting(parts, batches):
        calls.append(parts)
        return real(parts, batches)

    monkeypatch.setattr(fit_module, "train_epoch", counting)  # fit calls the step loop's train_epoch
    fit_module.fit(small_cfg(method="ce", epochs=2), checkpoint_root=str(tmp_path), log=lambda s: None)
    assert len(calls) == 2


def test_step_throughput_benchmark_runs_on_the_engine(tmp_path):
    text = (ROOT / "benchmarks" / "step_throughput.py").read_text()
    assert "from kdray.training.loop import train_epoch" in text and " train_epoch(" in text
    assert "verbatim" not in text
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_throughput.py"), "--dataset", "fake", "--method", "kd",
         "--teachers", "resnet8", "--teachers-count", "1", "--student", "resnet8", "--batch-size", "32",
         "--steps", "2", "--warmup", "1", "--repeats", "1", "--workers", "0", "--json"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kdray_img_s"] > 0 and result["reference_img_s"] > 0 and result["ratio"] > 0
    # the store side was served by its store: no teacher image computed live (the benchmark exits 2 otherwise)
    assert result["kdray_store_img_s"] > 0 and result["store_live_teacher_images"] == 0
    assert result["student_only_img_s"] > 0 and result["store_vs_student_only"] > 0  # the bound, measured


@pytest.mark.slow
def test_cifar_table_runs_end_to_end_and_resumes(tmp_path):
    """benchmarks/cifar_table.py on a tiny image tree: every row, the B search, the tuned sweep
    and its re-training; run again, it reads every finished run back instead of training it."""
    from datahelpers import write_tree

    tree = tmp_path / "tree"
    write_tree(tree / "train", per_class=12)
    write_tree(tree / "test", per_class=4, seed=1)
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "cifar_table.py"),
        "--workdir",
        str(tmp_path / "w"),
        "--data-dir",
        str(tree),
        "--teacher-arch",
        "resnet8,resnet14",
        "--teachers",
        "2",
        "--teacher-epochs",
        "1",
        "--epochs",
        "1",
        "--steps-of",
        "0.5",
        "--fractions",
        "0.5",
        "--seeds",
        "0,1",
        "--ekd-branches",
        "1",
        "--tune-samples",
        "2",
        "--tune-fractions",
        "0.5",
        "--tune-concurrency",
        "1",
        "--device",
        "cpu",
        "--json",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    table = json.loads(first.stdout)
    (fr,) = table["fractions"]
    rows = {r["row"] for r in fr["rows"]}
    assert {"ce", "avg_kd", "ekd-B2", "feed"} <= rows and sum(r.startswith("ekd-tuned-") for r in rows) == 1
    by_name = {r["row"]: r for r in fr["rows"]}
    assert len(by_name["ekd-B2"]["best_branch"]) == 2 and "best_branch" not in by_name["ce"]  # one per seed
    v = fr["verdict"]
    assert v["strongest_baseline"] in rows and not v["strongest_baseline"].startswith(("ekd", "feed"))
    assert {c["row"] for c in v["methods"]} == {r for r in rows if r.startswith(("ekd", "feed"))}
    tuned_vs_default = v["tuned_vs_default"]
    assert tuned_vs_default["against"] == "ekd-B2" and tuned_vs_default["row"].startswith("ekd-tuned-")
    assert tuned_vs_default["gap"] == pytest.approx(
        by_name[tuned_vs_default["row"]]["mean"] - by_name["ekd-B2"]["mean"]
    )
    assert sum(r.startswith("kd-t") for r in rows) == 2 and any(r.startswith("kd, best teacher") for r in rows)
    assert fr["ekd_best_branches"] in (1, 2) and set(fr["tuned"]["best_config"]) >= {"temperature", "branches"}
    assert all(len(r["per_seed"]) == 2 for r in fr["rows"])
    d, manifest = table["teacher_diagnostics"], json.loads((tmp_path / "w" / "teachers" / "manifest.json").read_text())
    # the diagnostics' per-teacher accuracies are the ones kdray measured when it trained them
    assert d["test_acc"] == pytest.approx([t["test_acc"] for t in manifest["teachers"]], abs=1 / 40)
    assert set(d["pairwise_disagreement"]) == {"0-1"} and 0 <= d["pairwise_disagreement"]["0-1"] <= 1
    assert max(d["test_acc"]) <= d["oracle_test_acc"] and min(d["test_acc"]) >= d["oracle_test_acc"] - \
        d["pairwise_disagreement"]["0-1"] - 1e-9
    again = subprocess.run([c for c in cmd if c != "--json"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "w" / "table.json").read_text())["fractions"][0]["rows"] == fr["rows"]
    assert "| ce | " in again.stdout and "| method | against | gap pts |" in again.stdout  # the markdown table
    assert " kdray train " not in again.stderr and "reusing" in again.stderr
    # finished work is read back only under the settings it was made with
    runs = sorted(p.name for p in (tmp_path / "w" / "runs").iterdir())
    other = subprocess.run([*cmd[:cmd.index("--epochs")], "--epochs", "2", *cmd[cmd.index("--epochs") + 2:]],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert other.returncode != 0 and "was made with other settings (1 -> 2)" in other.stderr, other.stderr[-2000:]
    teachers = subprocess.run(
        [*cmd, "--teacher-epochs", "2"], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert teachers.returncode != 0 and "holds teachers (arch, epochs) [('resnet8', 1), ('resnet14', 1)]" in \
        teachers.stderr, teachers.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "w" / "runs").iterdir()) == runs  # nothing removed
    report = subprocess.run([*cmd, "--report"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert report.returncode == 0 and f"{len(runs)} runs finished" in report.stdout, report.stderr[-2000:]
    assert f"| ce | 0,1 | {by_name['ce']['mean'] * 100:.2f} ± " in report.stdout  # the same figures as the table


def test_cifar_table_gives_every_fraction_the_same_optimizer_steps():
    """--steps-of F: a fraction f trains for --epochs x F / f epochs (the steps of --epochs at F);
    --steps-of 0 keeps --epochs everywhere; a fraction outside (0, 1] is refused in one line."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cifar_table

    args = lambda **kw: SimpleNamespace(**{"epochs": 20, "steps_of": 0.1, **kw})  # noqa: E731
    assert [cifar_table.fraction_epochs(args(), f) for f in (0.1, 0.25, 0.5, 1.0)] == [20, 8, 4, 2]
    assert cifar_table.fraction_epochs(args(epochs=1), 0.5) == 1  # never below one epoch
    assert [cifar_table.fraction_epochs(args(steps_of=0), f) for f in (0.1, 0.25)] == [20, 20]
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cifar_table.py"), "--steps-of", "2", "--report"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
        "--steps-of 2: allowed is a train fraction in (0, 1], or 0 for the same epochs everywhere")


def _sweep_load():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_load", ROOT / "benchmarks" / "sweep_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_load_judges_flatness_and_agreement_and_refuses_untimed_trials(capsys):
    """benchmarks/sweep_load.py's verdicts (its full run takes ~25 min: figures in the README): a
    growing overhead, growing driver memory, a doubled or RUNNING trial each fail; a trial without
    timing stops it with status 2 (the overhead would not be measured)."""
    bench = _sweep_load()
    agree = {"all_n": True, "doubled": {"optuna": 0, "mlflow": 0}, "optuna_equals_mlflow": True, "tune_in_both": True,
             "running_left": 0}
    good = {"straight": {"overhead_ratio": 1.05, "driver_rss_mb": {1: 900.0, 100: 910.0, 200: 930.0}, "agree": agree},
            "killed": {"agree": agree}}
    assert all(bench._verdict(good).values())
    for path, value in ((("straight", "overhead_ratio"), 1.3), (("straight", "driver_rss_mb"), {1: 900.0, 200: 1200.0}),
                        (("killed", "agree"), {**agree, "doubled": {"optuna": 1, "mlflow": 0}}),
                        (("killed", "agree"), {**agree, "running_left": 1})):
        bad = {k: dict(v) for k, v in good.items()}
        bad[path[0]][path[1]] = value
        assert not all(bench._verdict(bad).values()), path
    rows = [{"timing": {"started_at_s": 0.0, "ended_at_s": 5.0, "train_s": 3.0}},
            {"timing": {"started_at_s": 1.0, "ended_at_s": 4.0, "train_s": 2.5}}]
    assert bench.overheads(rows) == [2.0, 0.5]
    with pytest.raises(SystemExit) as stop:
        bench.overheads(rows + [{"timing": {}}])
    assert stop.value.code == 2 and "have no timing" in capsys.readouterr().err
