"""`kdray tune`: run a sweep and print its trials, best trial, Pareto front and timing."""

from __future__ import annotations

import json
import sys

from kdray.cli.common import (
    emit_json,
    log,
    workdir,
)


def cmd_tune(args) -> int:
    from kdray.api import sweep
    from kdray.tune.options import SweepOptions

    options = {name: getattr(args, name) for name in SweepOptions.names()}  # one flag per option
    result = sweep(args.space, workdir=workdir(args), track=not args.no_track,
                   tracking_uri=getattr(args, "tracking_uri", None), log=log, **options).summary
    if args.json:
        emit_json(result, sort_keys=True, default=str)
        return _all_failed(result)
    counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(result["study_counts"].items()))
    warm = result.get("warm_start")
    if warm:
        from kdray.tracking.sweeps import warm_start_given

        counts += f" (warm-started from {', '.join(warm['sources'])}: {warm_start_given(warm)})"
    print(f"sweep {result['experiment']}: {counts}")
    if (result.get("time_budget") or {}).get("ended_sweep"):
        from kdray.tune.budget import budget_line

        print(f"sweep {result['experiment']}: {budget_line(result['time_budget'])}")
    for row in result["trials"]:
        m = row["metrics"]
        state = f"failed: {row['error']}" if row["error"] else row["state"]
        print(f"  {m.get('trial_id', '?')}: val_acc={m.get('val_acc', float('nan')):.4f} "
              f"epochs={m.get('epoch', 0)} node={m.get('node_ip', '?')} {state}")
    if "best" in result:
        b = result["best"]
        params = {k: v for k, v in b["config"].items()}
        metric = result["metrics"][0][0]
        print(f"best trial {b['metrics'].get('trial_id')}: {metric}={b['metrics'].get(metric):.4f} "
              f"params={json.dumps(params, default=str)}")
        where = " (from an earlier session of this sweep)" if b.get("earlier_session") else ""
        scores = " ".join(f"{k}={b['metrics'][k]:.4f}" for k in ("val_acc", "test_acc", "val_loss")
                          if isinstance(b["metrics"].get(k), float))
        print(f"  metrics: {scores} epochs={b['metrics'].get('epoch')}{where}")
        print(f"  student: {b.get('student_path') or b['metrics'].get('checkpoint_path', '?')}")
        if b.get("mlflow_run_id"):
            print(f"  MLflow run {b['mlflow_run_id']}: "
                  f"`kdray best --experiment {result['experiment']} --register NAME` "
                  f"registers the winner; `kdray export --run {b['mlflow_run_id']} --out DIR` exports it")
    if "pareto_front" in result:
        print("Pareto front (" + ", ".join(f"{m} {d}" for m, d in result["metrics"]) + "):")
        for t in result["pareto_front"]:
            print(f"  trial #{t['number']}: values={t['values']} params={t['params']}")
    t = result.get("timing") or {}
    if t.get("trials"):
        share = f" ({100 * t['train_share']:.0f}% of the trials' time)" if t.get("train_share") else ""
        startup = f" (start-up to first report {t['startup_s_mean']}s)" if t.get("startup_s_mean") is not None else ""
        print(f"time: {t['wall_s']:.0f}s for {t['trials']} trial(s), {t['train_s']:.0f}s of it in epochs{share}; "
              f"fixed cost per trial about {t['overhead_s_per_trial']:.1f}s{startup}")
    return _all_failed(result)


def _all_failed(result: dict) -> int:
    """Exit 1, with one line naming the reasons, when every trial of this run failed."""
    rows = result["trials"]
    if not rows or not all(r["error"] for r in rows):
        return 0
    reasons = sorted({r["error"] for r in rows})
    print(f"kdray: error: all {len(rows)} trial(s) of sweep {result['experiment']!r} failed: " + "; ".join(reasons),
          file=sys.stderr)
    return 1
