"""`kdray compare` over MLflow: the finished leaf runs a filter selects (experiments, tags, run
ids; a seed group's or a sweep's parent stands for its children), grouped by configuration or by
chosen keys into a :class:`~kdray.tracking.comparison.Comparison`, and that table logged as a run
of kind ``compare``."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Optional, Sequence

from kdray.core.errors import KdrayError
from kdray.tracking.comparison import MODES, Comparison, Group, Value, set_baseline
from kdray.tracking.store import client, experiment_id
from kdray.tracking.tags import KIND_TAG, NOTE_TAG, RUNTIME_KEYS, STATE_TAG

#: the runs that are one trained student each: the rows of a comparison
LEAF_KINDS = ("train", "trial")

#: runs that stand for their children: a sweep's trials, a seed group's train runs
PARENT_KINDS = ("sweep", "seeds")

#: params that say how or where a run was executed, not what it trained: runs that differ only in
#: them are the same configuration (a CPU rerun of a GPU run, 2 DDP workers sharing the same global
#: batch, streamed instead of held in memory, another evaluation batch size)
EXECUTION_PARAMS = frozenset({"device", "workers", "data_path", "in_memory_limit_gb", "eval_batch_size",
                              "channels_last", "download"}) | RUNTIME_KEYS

#: params that are paths: a run logs them relative to its workdir when inside it, absolute otherwise,
#: so the same teacher set reads differently from two workdirs (a sweep's and a train's). They are
#: compared by their last folder name, which still tells two teacher sets apart (teachers/digits,
#: teacher-0)
PATH_PARAMS = ("teachers", "data_dir")

COMPARE_KIND = "compare"
TABLE_ARTIFACT, MARKDOWN_ARTIFACT = "compare/table.json", "compare/table.md"


@dataclass(frozen=True)
class RunFilter:
    """Which runs a comparison reads: the runs of ``experiments`` (names), or the runs ``run_ids``
    name, in either case only those carrying every tag of ``tags``."""

    experiments: tuple = ()
    run_ids: tuple = ()
    tags: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"experiments": list(self.experiments), "run_ids": list(self.run_ids), "tags": dict(self.tags)}


def parse_tags(items: Optional[Sequence[str]]) -> dict:
    """``--tag KEY=VALUE`` flags as a dict."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise KdrayError(f"--tag {item!r} must look like KEY=VALUE, e.g. --tag kdray.method=ekd")
        out[key.strip()] = value
    return out


# ---------------------------------------------------------------------------------------------
# selecting runs
# ---------------------------------------------------------------------------------------------
def quoted(value: str) -> str:
    """A value in an MLflow filter string (single quotes, or double when it holds one)."""
    return f'"{value}"' if "'" in value else f"'{value}'"


def tag_clauses(tags: dict) -> list[str]:
    return [f"tags.`{k}` = {quoted(v)}" for k, v in sorted(tags.items())]


def search_all(c, exp_ids: Sequence[str], clauses: Sequence[str]) -> list:
    """Every run of ``exp_ids`` matching all ``clauses``, page by page."""
    runs, token = [], None
    while True:
        page = c.search_runs(list(exp_ids), filter_string=" and ".join(clauses), max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def named_runs(c, uri: str, flt: RunFilter) -> list:
    """The runs ``flt.run_ids`` name; a sweep's or a seed group's parent as its children."""
    from kdray.tracking.query import get_run

    runs = []
    for run_id in flt.run_ids:
        run = get_run(uri, run_id)
        exp = [run.info.experiment_id]
        if run.data.tags.get(KIND_TAG) in PARENT_KINDS:
            runs += search_all(c, exp, [f"tags.mlflow.parentRunId = '{run_id}'", *tag_clauses(flt.tags)])
        else:
            runs += search_all(c, exp, [f"attributes.run_id = '{run_id}'", *tag_clauses(flt.tags)])
    return runs


def check_in_experiments(runs: list, exp_ids: Sequence[str], flt: RunFilter) -> None:
    outside = [r.info.run_id for r in runs if r.info.experiment_id not in exp_ids]
    if outside:
        raise KdrayError(f"run {outside[0]} is not in experiment(s) {', '.join(map(repr, flt.experiments))}; "
                         "leave out --experiment or name runs of those experiments")


def select_runs(uri: str, flt: RunFilter) -> list:
    """The leaf runs (train, trial) the filter selects, in any state, oldest first.
    MLflow's filters have no IN for tags, so the kind is checked here: that also leaves out sweep
    and seed-group parents, teacher runs and compare's own runs."""
    if not flt.experiments and not flt.run_ids:
        raise KdrayError("name the runs to compare: --experiment NAME and/or --run-id ID")
    c = client(uri)
    exp_ids = [experiment_id(uri, name, create=False) for name in flt.experiments]
    if flt.run_ids:
        runs = named_runs(c, uri, flt)
        if exp_ids:
            check_in_experiments(runs, exp_ids, flt)
    else:
        runs = search_all(c, exp_ids, tag_clauses(flt.tags))
    unique = {r.info.run_id: r for r in runs if r.data.tags.get(KIND_TAG) in LEAF_KINDS}
    if not unique:
        raise KdrayError(f"no train or trial run matches {describe_filter(flt)}")
    return sorted(unique.values(), key=lambda r: r.info.start_time or 0)


def describe_filter(flt: RunFilter) -> str:
    parts = [f"experiment(s) {', '.join(map(repr, flt.experiments))}"] if flt.experiments else []
    parts += [f"run(s) {', '.join(flt.run_ids)}"] if flt.run_ids else []
    parts += [f"--tag {k}={v}" for k, v in sorted(flt.tags.items())]
    return " with ".join(parts)


def finished_with_metric(runs: list, metric: str, flt: RunFilter) -> tuple[list, Counter]:
    """The completed runs that logged ``metric``; how many were left out, by state (a completed
    run without the metric counts as ``no <metric>``)."""
    left_out = Counter(r.data.tags.get(STATE_TAG, "unknown") for r in runs
                       if r.data.tags.get(STATE_TAG) != "completed")
    done = [r for r in runs if r.data.tags.get(STATE_TAG) == "completed"]
    if not done:
        states = ", ".join(f"{n} {s}" for s, n in sorted(left_out.items()))
        raise KdrayError(f"no completed run matches {describe_filter(flt)} ({states})")
    scored = [r for r in done if metric in r.data.metrics]
    if not scored:
        logged = sorted({k for r in done for k in r.data.metrics})
        raise KdrayError(f"no completed run of {describe_filter(flt)} logged metric {metric!r}; "
                         f"logged: {', '.join(logged[:30])}")
    if len(scored) < len(done):
        left_out[f"no {metric}"] = len(done) - len(scored)
    return scored, left_out


# ---------------------------------------------------------------------------------------------
# grouping
# ---------------------------------------------------------------------------------------------
def configuration(run) -> dict:
    """What a run trained: its params without the seed and the execution params, paths by their
    last folder name."""
    out = {}
    for k, v in run.data.params.items():
        if k == "seed" or k in EXECUTION_PARAMS:
            continue
        out[k] = PurePosixPath(v).name if k in PATH_PARAMS and v not in ("None", "") else v
    return out


def chosen_key(run, by: Sequence[str]) -> dict:
    """The values of the --by keys: a param, else a tag; "-" when the run has neither."""
    return {k: run.data.params.get(k, run.data.tags.get(k, "-")) for k in by}


def check_by_keys(runs: list, by: Sequence[str]) -> None:
    known = {k for r in runs for k in (*r.data.params, *r.data.tags)}
    unknown = [k for k in by if k not in known]
    if unknown:
        params = sorted({k for r in runs for k in r.data.params})
        raise KdrayError(f"--by {unknown[0]!r} is neither a param nor a tag of these runs; params: {', '.join(params)}")


def label_keys(keys: list[dict]) -> list[str]:
    """The keys whose values differ between groups (method first, then by name): what tells the
    groups apart, and all a label needs to say."""
    names = sorted({k for key in keys for k in key}, key=lambda k: (k != "method", k))
    return [k for k in names if len({key.get(k) for key in keys}) > 1]


def group_label(key: dict, shown: Sequence[str]) -> str:
    return " ".join(f"{k}={key[k]}" for k in shown if k in key) or "all"


def group_runs(runs: list, metric: str, by: Sequence[str] = ()) -> list[Group]:
    """Runs grouped by their configuration (``by`` empty) or by the values of ``by``, in the
    order each group's first run started."""
    members: dict[tuple, list] = {}
    keys: dict[tuple, dict] = {}
    for r in runs:
        key = chosen_key(r, by) if by else configuration(r)
        ident = tuple(sorted(key.items()))
        members.setdefault(ident, []).append(Value(r.data.metrics[metric], r.data.params.get("seed"), r.info.run_id))
        keys[ident] = key
    shown = list(by) if by else label_keys(list(keys.values()))
    return [Group(group_label(keys[i], shown), values, key={k: keys[i][k] for k in shown if k in keys[i]})
            for i, values in members.items()]


def compare_runs(uri: str, flt: RunFilter, *, metric: str = "val_acc", mode: str = "max",
                 by: Sequence[str] = (), baseline: Optional[str] = None) -> Comparison:
    """The comparison of the finished runs ``flt`` selects (see :func:`select_runs`)."""
    if mode not in MODES:
        raise KdrayError(f"--mode {mode!r} is not allowed; allowed: {', '.join(MODES)}")
    runs = select_runs(uri, flt)
    runs, left_out = finished_with_metric(runs, metric, flt)
    if by:
        check_by_keys(runs, by)
    groups = group_runs(runs, metric, by)
    if baseline is not None:
        baseline = set_baseline(groups, baseline, mode).label
    return Comparison(metric=metric, groups=groups, mode=mode, by=tuple(by), baseline=baseline,
                      left_out=dict(left_out), source=flt.describe())


# ---------------------------------------------------------------------------------------------
# the comparison as an MLflow run
# ---------------------------------------------------------------------------------------------
def log_comparison(uri: str, comparison: Comparison, flt: RunFilter) -> str:
    """One FINISHED run of kind ``compare`` in the first experiment: the table through MLflow's
    ``log_table`` (``compare/table.json``), the Markdown as ``compare/table.md`` and as the run's
    description, tags naming the filter and the source runs. A failure takes the run away."""
    from kdray.tracking.runs import discard_run, log_batch

    c = client(uri)
    first = c.get_run(comparison.run_ids[0]).info.experiment_id
    exp_id = experiment_id(uri, flt.experiments[0], create=False) if flt.experiments else first
    name = f"compare-{comparison.metric}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = c.create_run(exp_id, run_name=name, tags={KIND_TAG: COMPARE_KIND, STATE_TAG: "running"}).info.run_id
    try:
        log_batch(c, run_id, tags=compare_tags(comparison, flt), params=compare_params(comparison))
        rows = comparison.rows()
        c.log_table(run_id, {k: [row[k] for row in rows] for k in rows[0]}, TABLE_ARTIFACT)
        c.log_text(run_id, comparison.to_markdown() + "\n", MARKDOWN_ARTIFACT)
        c.log_text(run_id, comparison.to_json() + "\n", "compare/comparison.json")
        c.set_terminated(run_id, "FINISHED")
    except BaseException:
        discard_run(uri, run_id)
        raise
    comparison.run_id = run_id
    return run_id


def compare_params(comparison: Comparison) -> dict:
    return {"metric": comparison.metric, "mode": comparison.mode, "by": comparison.grouping(),
            "baseline": comparison.baseline or "-"}


def compare_tags(comparison: Comparison, flt: RunFilter) -> dict:
    return {KIND_TAG: COMPARE_KIND, STATE_TAG: "completed", "mlflow.source.type": "LOCAL",
            "mlflow.source.name": "kdray compare", NOTE_TAG: f"{comparison.title()}\n\n{comparison.to_markdown()}",
            "kdray.compare.filter": describe_filter(flt), "kdray.compare.metric": comparison.metric,
            "kdray.compare.by": comparison.grouping(),
            "kdray.compare.source_runs": ",".join(comparison.run_ids)[:5000]}
