"""`kdray compare`: a table of finished runs grouped by configuration (or chosen keys), mean ± sample
std of a metric with the per-seed values and the gap to a baseline, printed and logged to MLflow."""

from __future__ import annotations

import argparse
import contextlib
import sys

from kdray.cli.common import log, tracking_uri

FORMATS = ("table", "markdown", "csv", "json")


def add_compare_parser(sub) -> None:
    """The `compare` subcommand and its flags."""
    c = sub.add_parser(
        "compare", help="compare groups of finished runs: mean ± std over seeds, gap to a baseline",
        description="Group the completed train and trial runs of MLflow experiments (or the runs named with "
        "--run-id; a sweep's or a seed group's parent stands for its children) by configuration (every param but "
        "the seed and how the run was executed) or by --by keys, and show per group n, the mean and sample std "
        "(ddof 1) of --metric with its per-seed values, and with --baseline the gap of each mean to the "
        "baseline's, the gap's standard error sqrt(s_a²/n_a + s_b²/n_b) and whether it goes beyond the larger "
        "std. Failed, pruned and interrupted runs are left out and counted on stderr. The table is logged to "
        "MLflow as a run of kind compare (compare/table.json, compare/table.md) unless --no-log.")
    c.add_argument("--experiment", action="append", default=[], metavar="NAME",
                   help="MLflow experiment whose runs to compare (repeatable); the compare run is logged to the first")
    c.add_argument("--run-id", action="append", default=[], metavar="ID",
                   help="compare only this run (repeatable); a sweep's or a seed group's parent run means its children")
    c.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="only runs with this tag (repeatable, all must hold), e.g. --tag kdray.method=ekd")
    c.add_argument("--by", metavar="KEY[,KEY...]",
                   help="group by these params (or tags), e.g. method,branches (default: by configuration)")
    c.add_argument("--metric", default="val_acc", help="the metric compared (default val_acc)")
    c.add_argument("--mode", default="max", metavar="max|min",
                   help="whether larger (max, the default) or smaller (min) is better: the side a gap must "
                   "go beyond the spread on")
    c.add_argument("--baseline", metavar="LABEL",
                   help="the group the others are set against: its label as the table shows it, or KEY=VALUE "
                   "matching one group (e.g. method=ce); default: no gap columns")
    c.add_argument("--format", default="table", metavar="|".join(FORMATS),
                   help="table (aligned console text, the default), markdown (a pipe table), csv (one row per group, "
                   "full precision) or json (full precision)")
    c.add_argument("--no-log", action="store_true", help="do not log the table to MLflow as a compare run")
    c.add_argument("--tracking-uri",
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///WORKDIR/mlflow.db)")
    c.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from kdray.tracking.compare import RunFilter, compare_runs, log_comparison, parse_tags
    from kdray.tracking.store import check_readable_store

    uri = tracking_uri(args)
    by = tuple(k.strip() for k in (args.by or "").split(",") if k.strip())
    flt = RunFilter(experiments=tuple(args.experiment), run_ids=tuple(args.run_id), tags=parse_tags(args.tag))
    check_readable_store(uri)
    comparison = compare_runs(uri, flt, metric=args.metric, mode=args.mode, by=by, baseline=args.baseline)
    text = comparison.render(args.format)  # an unknown --format is refused before anything is logged
    if comparison.left_out:
        log("left out: " + ", ".join(f"{n} {state}" for state, n in sorted(comparison.left_out.items()))
            + " run(s); only completed runs with the metric count")
    if not args.no_log:
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds the table alone
            run_id = log_comparison(uri, comparison, flt)
        log(f"compare: logged as MLflow run {run_id} (compare/table.json, compare/table.md)")
        if args.format == "json":
            text = comparison.render("json")  # now with the run's id
    print(text)
    return 0
