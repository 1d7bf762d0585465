"""`kdray best`: rank an experiment's runs by a metric and register the winner (or, with --retrain,
train the best configurations again with several seeds: kdray.cli.retrain)."""

from __future__ import annotations

from kdray.cli.common import (
    emit_json,
    log,
    tracking_uri,
)
from kdray.core.errors import KdrayError
from kdray.core.values import mask_credentials
from kdray.tracking.store import check_readable_store


def cmd_best(args) -> int:
    from kdray.cli.retrain import check_retrain_flags, cmd_retrain
    from kdray.tracking.query import best_runs
    from kdray.tracking.seed_groups import RETRAIN_TAG

    seeds = check_retrain_flags(args)
    uri = tracking_uri(args)
    check_readable_store(uri)
    # listing shows 5 rows; re-training costs a group of runs per row: the winner only unless asked
    top = args.top if args.top is not None else (1 if args.retrain else 5)
    if top < 1:
        raise KdrayError(f"--top {top} is out of range; allowed: >= 1")
    runs, metric, mode = best_runs(uri, args.experiment, metric=args.metric, mode=args.mode,
                                      max_params=args.max_params, max_latency_ms=args.max_latency_ms, top=top,
                                      without_tag=RETRAIN_TAG if args.retrain else None)  # not a retrain's runs
    rows = [_row(r, metric) for r in runs]
    if args.retrain:
        return cmd_retrain(args, uri, rows, metric, mode, seeds)
    out = {"experiment": args.experiment, "metric": metric, "mode": mode, "runs": rows,
           "tracking_uri": mask_credentials(uri)}
    if args.register:
        from kdray.deploy.champion import register_champion

        out["registered"] = register_champion(uri, rows[0]["run_id"], args.register, log=log)
    if args.json:
        emit_json(out, sort_keys=True, default=str)
        return 0
    _print_table(rows, args.experiment, metric, mode)
    if args.register:
        reg = out["registered"]
        print(f"registered {reg['model_uri']} (version {reg['version']}, run {reg['run_id']}); "
              f"load it with mlflow.pytorch.load_model({reg['model_uri']!r})")
    return 0


#: what a run cost, as `kdray best` shows it: the latest epoch's values (kdray.training.cost)
COST_METRICS = ("epoch_time_s", "images_per_s", "data_wait_share", "cpu_util", "peak_rss_mb", "gpu_util",
                "gpu_peak_mb")


def _row(r, metric: str) -> dict:
    """One ranked run: its scores, size, latency and what it cost (``wall_s``: the run's wall time
    in MLflow, start to end; the rest its last epoch's)."""
    from kdray.tracking.tags import STATE_TAG

    m, t = r.data.metrics, r.data.tags
    wall = (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time and r.info.start_time else None
    return {"run_id": r.info.run_id, "run_name": r.info.run_name, "method": t.get("kdray.method"),
            "state": t.get(STATE_TAG), metric: m.get(metric), "test_acc": m.get("test_acc"),
            "test_acc_best_branch": m.get("test_acc_best_branch"), "params": m.get("params"),
            "latency_ms": m.get("latency_ms"), "parent_run_id": t.get("mlflow.parentRunId"), "wall_s": wall,
            **{k: m.get(k) for k in COST_METRICS}}


def _print_table(rows: list, experiment: str, metric: str, mode: str) -> None:
    def fmt(v, digits=4):
        return "-" if v is None else f"{v:.{digits}f}"

    print(f"top {len(rows)} of experiment {experiment!r} by {metric} ({mode}):")
    print(f"  {'#':>2}  {'run id':32}  {'name':24}  {'method':7}  {metric:>10}  {'test_acc':>8}  {'params':>9}  "
          f"{'latency_ms':>10}  {'wall_s':>7}  {'img/s':>7}  {'wait':>5}  {'peak_mb':>7}")
    for i, r in enumerate(rows, 1):
        print(f"  {i:>2}  {r['run_id']:32}  {str(r['run_name'])[:24]:24}  {str(r['method']):7}  {fmt(r[metric]):>10}  "
              f"{fmt(r['test_acc']):>8}  {fmt(r['params'], 0):>9}  {fmt(r['latency_ms'], 3):>10}  "
              f"{fmt(r['wall_s'], 1):>7}  {fmt(r['images_per_s'], 0):>7}  {fmt(r['data_wait_share'], 2):>5}  "
              f"{fmt(r['peak_rss_mb'], 0):>7}")
