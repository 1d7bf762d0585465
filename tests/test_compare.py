"""`kdray compare` (issue 25 item 3): finished runs grouped by configuration or chosen keys, mean ±
sample std of a metric with per-seed values and the gap to a baseline with its standard error, in
four formats and logged to MLflow; checked through the real CLI on digits against a hand
computation over the runs MLflow holds, and on plain values."""

import csv
import io
import json
import math
import re
import statistics

import mlflow
import pytest
from conftest import error_line, run_cli

from kdray.core.errors import KdrayError
from kdray.tracking.comparison import Comparison, Group, Value, gap_between, mean_std, set_baseline
from kdray.tracking.store import global_tracking_uri

TRAIN = ["train", "--dataset", "digits", "--method", "ce", "--epochs", "1", "--image-size", "16",
         "--train-fraction", "0.25", "--device", "cpu", "--experiment", "cmp"]
#: (lr, seeds) trained one run at a time: a configuration with three seeds, one with a single seed
CONFIGS = [("0.1", (0, 1, 2)), ("0.02", (0,))]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Seven completed ce runs on digits in experiment ``cmp`` of a sqlite store: lr 0.05 as a seed
    group (`kdray train --seeds 0,1,2`: a parent run of kind seeds over three train runs), lr 0.1
    with seeds 0, 1, 2 and lr 0.02 with seed 0 as single runs; and one failed run."""
    from kdray.cli import main

    work = tmp_path_factory.mktemp("compare")
    assert main(["--workdir", str(work), *TRAIN, "--lr", "0.05", "--seeds", "0,1,2", "--name", "lr0.05"]) == 0
    for lr, seeds in CONFIGS:
        for seed in seeds:
            name = f"lr{lr}-s{seed}"
            assert main(["--workdir", str(work), *TRAIN, "--lr", lr, "--seed", str(seed), "--name", name]) == 0
    # a loss that diverges in its first epoch: a failed run, left out of every table
    assert main(["--workdir", str(work), *TRAIN, "--lr", "1e12", "--seed", "5", "--name", "diverged"]) == 2
    uri = f"sqlite:///{work.resolve() / 'mlflow.db'}"
    c = mlflow.MlflowClient(uri)
    exp_id = c.get_experiment_by_name("cmp").experiment_id
    (group,) = c.search_runs([exp_id], filter_string="tags.`kdray.kind` = 'seeds'")
    return {"workdir": work, "uri": uri, "client": c, "exp_id": exp_id, "group": group.info.run_id}


def train_runs(c, exp_id, state="completed"):
    return [r for r in c.search_runs([exp_id], filter_string="tags.`kdray.kind` = 'train'", max_results=100)
            if r.data.tags["kdray.state"] == state]


def compare_runs_in(store) -> list:
    return store["client"].search_runs([store["exp_id"]], filter_string="tags.`kdray.kind` = 'compare'")


def by_hand(store, metric="val_acc", baseline="0.05") -> dict:
    """lr -> (n, mean, std, {seed: value}, gap, s.e. of gap) from the runs' metrics as MLflow holds them."""
    values: dict = {}
    for run in train_runs(store["client"], store["exp_id"]):
        values.setdefault(run.data.params["lr"], {})[int(run.data.params["seed"])] = run.data.metrics[metric]
    base = list(values[baseline].values())
    out = {}
    for lr, per_seed in values.items():
        xs = list(per_seed.values())
        std = statistics.stdev(xs) if len(xs) > 1 else None
        gap = statistics.mean(xs) - statistics.mean(base)
        se = math.sqrt(statistics.variance(xs) / len(xs) + statistics.variance(base) / len(base)) if std else None
        out[lr] = (len(xs), statistics.mean(xs), std, dict(sorted(per_seed.items())), gap, se)
    return out


def compare(capsys, store, *args):
    return run_cli(capsys, "compare", "--tracking-uri", store["uri"], *args)


def four(x) -> str:
    return "-" if x is None else f"{x:.4f}"


# ---------------------------------------------------------------------------------------------
# through the CLI, against a hand computation
# ---------------------------------------------------------------------------------------------
def test_json_and_csv_give_the_hand_computed_numbers_in_full(capsys, store):
    hand = by_hand(store)
    code, out, err = compare(capsys, store, "--experiment", "cmp", "--baseline", "lr=0.05", "--format", "json",
                             "--no-log")
    assert code == 0, err
    assert "left out: 1 failed run(s)" in err
    table = json.loads(out)
    assert table["baseline"] == "lr=0.05" and table["by"] == "configuration" and table["runs"] == 7
    assert {g["label"] for g in table["groups"]} == {f"lr={lr}" for lr in hand}  # lr is all that differs
    for g in table["groups"]:
        n, mean, std, per_seed, gap, se = hand[g["key"]["lr"]]
        assert (g["n"], g["mean"], g["std"]) == (n, pytest.approx(mean, abs=1e-12), pytest.approx(std, abs=1e-12))
        assert {int(v["seed"]): v["value"] for v in g["values"]} == per_seed
        assert [int(v["seed"]) for v in g["values"]] == sorted(per_seed)
        if g["baseline"]:
            assert g["key"]["lr"] == "0.05" and g["gap"] is None
        else:
            assert g["gap"] == pytest.approx(gap, abs=1e-12)
            assert g["gap_se"] == (None if se is None else pytest.approx(se, abs=1e-12))
    code, out, _ = compare(capsys, store, "--experiment", "cmp", "--baseline", "lr=0.05", "--format", "csv",
                           "--no-log")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 3
    for row in rows:
        n, mean, std, per_seed, gap, se = hand[row["group"][len("lr="):]]
        assert int(row["n"]) == n and float(row["mean"]) == pytest.approx(mean, abs=1e-12)
        assert (row["std"] == "") if std is None else float(row["std"]) == pytest.approx(std, abs=1e-12)
        assert row["per_seed"] == ";".join(f"{s}:{v!r}" for s, v in per_seed.items())
        if row["baseline"] == "False":
            assert float(row["gap"]) == pytest.approx(gap, abs=1e-12)
            assert (row["gap_se"] == "") if se is None else float(row["gap_se"]) == pytest.approx(se, abs=1e-12)


def table_cells(text: str, markdown: bool) -> dict:
    """group label -> its cells, from a Markdown table or the console's (columns 2+ spaces apart)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if markdown:
        rows = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[2:]]
    else:
        rows = [re.split(r"\s{2,}", ln.strip()) for ln in lines[2:]]
    return {r[0]: r for r in rows}


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_console_and_markdown_give_the_hand_computed_numbers(capsys, store, fmt):
    hand = by_hand(store)
    code, out, err = compare(capsys, store, "--experiment", "cmp", "--baseline", "lr=0.05", "--format", fmt,
                             "--no-log")
    assert code == 0, err
    cells = table_cells(out, markdown=fmt == "markdown")
    assert set(cells) == {f"lr={lr}" for lr in hand}
    for label, row in cells.items():
        n, mean, std, per_seed, gap, se = hand[label[len("lr="):]]
        assert row[1:5] == [str(n), four(mean), four(std), ", ".join(f"{s}: {v:.4f}" for s, v in per_seed.items())]
        if label == "lr=0.05":
            assert row[5:] == ["baseline", "-", "-"]
        else:
            spread = None if se is None else max(hand["0.05"][2], std)
            beyond = "-" if spread is None else ("yes" if gap > spread else "no")
            assert row[5:] == [f"{gap:+.4f}", four(se), beyond]
    if fmt == "table":
        assert out.splitlines()[0] == "val_acc (max) of 7 runs in 3 groups by configuration; gap to 'lr=0.05':"


def test_the_table_is_logged_as_a_finished_compare_run(capsys, store):
    before = {r.info.run_id for r in compare_runs_in(store)}
    code, out, err = compare(capsys, store, "--experiment", "cmp", "--baseline", "lr=0.05", "--format", "markdown")
    assert code == 0, err
    (run,) = [r for r in compare_runs_in(store) if r.info.run_id not in before]
    c = store["client"]
    assert f"logged as MLflow run {run.info.run_id}" in err
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("compare-val_acc-")
    tags = run.data.tags
    assert tags["kdray.state"] == "completed" and tags["kdray.compare.filter"] == "experiment(s) 'cmp'"
    assert set(run.data.tags["kdray.compare.source_runs"].split(",")) == {
        r.info.run_id for r in train_runs(c, store["exp_id"])}
    with global_tracking_uri(store["uri"]):  # MLflow's own reader searches the global store, not the client's
        table = c.load_table(store["exp_id"], "compare/table.json", run_ids=[run.info.run_id])
    hand = by_hand(store)
    for _, row in table.iterrows():
        assert row["mean"] == pytest.approx(hand[row["group"][len("lr="):]][1], abs=1e-9)  # pandas keeps 10 digits
    md = c.download_artifacts(run.info.run_id, "compare/table.md", str(store["workdir"] / "dl"))
    assert open(md).read().strip() == out.strip()
    # compare's own runs and the seed group's parent are never rows
    code, again, _ = compare(capsys, store, "--experiment", "cmp", "--format", "json", "--no-log")
    assert json.loads(again)["runs"] == 7


def test_by_keys_run_ids_and_a_seed_group(capsys, store):
    hand = by_hand(store)
    code, out, err = compare(capsys, store, "--run-id", store["group"], "--format", "json", "--no-log")
    assert code == 0, err
    (group,) = json.loads(out)["groups"]  # the seed group's parent: its three children
    assert group["label"] == "all" and (group["n"], group["mean"]) == (3, pytest.approx(hand["0.05"][1], abs=1e-12))
    some = [r.info.run_id for r in train_runs(store["client"], store["exp_id"]) if r.data.params["lr"] == "0.1"]
    code, out, _ = compare(capsys, store, "--experiment", "cmp", *sum((["--run-id", r] for r in some[:2]), []),
                           "--by", "lr,method", "--format", "json", "--no-log")
    (group,) = json.loads(out)["groups"]
    assert group["label"] == "lr=0.1 method=ce" and group["n"] == 2
    code, out, _ = compare(capsys, store, "--experiment", "cmp", "--tag", "kdray.method=ce", "--by", "method",
                           "--format", "json", "--no-log")
    (group,) = json.loads(out)["groups"]
    assert group["label"] == "method=ce" and group["n"] == 7


@pytest.mark.parametrize("args, needle", [
    (["--experiment", "nope"], "MLflow experiment 'nope' does not exist"),
    (["--experiment", "cmp", "--tag", "kdray.method"], "--tag 'kdray.method' must look like KEY=VALUE"),
    (["--experiment", "cmp", "--format", "xml"], "--format 'xml' is not allowed; allowed: table, markdown, csv, json"),
    (["--experiment", "cmp", "--metric", "nonsense"], "logged metric 'nonsense'; logged: "),
    (["--experiment", "cmp", "--tag", "kdray.method=ekd"], "no train or trial run matches experiment(s) 'cmp' with"),
    (["--experiment", "cmp", "--baseline", "lr=7"], "--baseline 'lr=7' names no group; allowed: 'lr=0.05'"),
    (["--experiment", "cmp", "--by", "colour"], "--by 'colour' is neither a param nor a tag"),
    (["--experiment", "cmp", "--mode", "best"], "--mode 'best' is not allowed; allowed: max, min"),
    ([], "name the runs to compare: --experiment NAME and/or --run-id ID"),
])
def test_bad_input_is_one_line_and_logs_nothing(capsys, store, args, needle):
    before = len(compare_runs_in(store))
    code, out, err = compare(capsys, store, *args)
    assert code == 2 and needle in error_line(err) and out == ""
    assert len(compare_runs_in(store)) == before


# ---------------------------------------------------------------------------------------------
# the statistics and formats on plain values
# ---------------------------------------------------------------------------------------------
def test_stats_on_plain_values():
    assert mean_std([0.5]) == (0.5, None)
    assert mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(statistics.stdev([1.0, 2.0, 4.0])))
    a, b = [0.90, 0.92, 0.94], [0.80, 0.85, 0.81]
    g = gap_between(a, b, against="b")
    sa, sb = statistics.stdev(a), statistics.stdev(b)
    assert g.gap == pytest.approx(0.1) and g.se == pytest.approx(math.sqrt((sa ** 2 + sb ** 2) / 3))  # cifar_table's
    assert g.spread == pytest.approx(max(sa, sb)) and g.beyond_spread is True
    assert gap_between(a, b, mode="min").beyond_spread is False  # a larger loss is no improvement
    uneven = gap_between([1.0, 2.0], [1.0, 2.0, 6.0])
    assert uneven.se == pytest.approx(math.sqrt(0.5 / 2 + 7 / 3))  # Welch: each variance over its own n
    single = gap_between([0.9], b)
    assert single.gap == pytest.approx(0.9 - statistics.mean(b)) and single.se is single.beyond_spread is None


def test_formats_of_a_baseline_and_a_single_run_group():
    groups = [Group("method=ce", [Value(0.8, "1"), Value(0.7, "0")], key={"method": "ce"}),
              Group("method=ekd", [Value(0.9, "0", "r1")], key={"method": "ekd"})]
    set_baseline(groups, "method=ce", "max")
    comparison = Comparison("test_acc", groups, baseline="method=ce")
    assert [v.seed for v in groups[0].values] == ["0", "1"]  # ordered by seed
    assert comparison.to_markdown().splitlines()[2:] == [
        "| method=ce | 2 | 0.7500 | 0.0707 | 0: 0.7000, 1: 0.8000 | baseline | - | - |",
        "| method=ekd | 1 | 0.9000 | - | 0: 0.9000 | +0.1500 | - | - |"]
    rows = list(csv.DictReader(io.StringIO(comparison.to_csv())))
    assert rows[1]["std"] == "" and rows[1]["gap_se"] == "" and rows[1]["per_seed"] == "0:0.9"
    assert float(rows[1]["gap"]) == pytest.approx(0.15)
    data = json.loads(comparison.to_json())
    assert data["groups"][1]["values"] == [{"run_id": "r1", "seed": "0", "value": 0.9}]
    with pytest.raises(KdrayError, match=r"--baseline 'kd' names no group; allowed: 'method=ce', 'method=ekd'"):
        set_baseline(groups, "kd", "max")
    with pytest.raises(KdrayError, match="--format 'xls' is not allowed"):
        comparison.render("xls")
