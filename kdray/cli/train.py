"""`kdray train`: distil one student and print its result."""

from __future__ import annotations

from kdray.cli.common import (
    DATA_KEYS,
    OPTIM_KEYS,
    build_config,
    emit_json,
    log,
    method_keys,
    workdir,
)
from kdray.core.guards import stop_signals_interrupt


def cmd_train(args) -> int:
    from kdray.api import train

    cfg = build_config(args, DATA_KEYS + OPTIM_KEYS + method_keys())
    with stop_signals_interrupt():
        run = train(cfg, out=args.out, name=args.name, resume=args.resume, workdir=workdir(args),
                    track=not args.no_track, tracking_uri=getattr(args, "tracking_uri", None),
                    experiment=args.experiment or "kdray",
                    teacher_store=args.teacher_store, teacher_store_budget=args.teacher_store_budget,
                    teacher_store_logits=args.teacher_store_logits, teacher_store_topk=args.teacher_store_topk,
                    address=args.address, gpus_per_worker=args.gpus_per_worker,
                    cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures, log=log)
    m = run.metrics
    summary = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    summary.update({"student_path": run.student_path, "method": cfg.method, "student": cfg.student,
                    "dataset": cfg.dataset, "seed": cfg.seed, "run_id": run.run_id})
    if args.json:
        emit_json(summary, sort_keys=True)
        return 0
    branch = f", best branch {m['test_acc_best_branch']:.4f}" if "test_acc_best_branch" in m else ""
    print(f"done: {cfg.method} {cfg.student} on {cfg.dataset}: test acc {m['test_acc']:.4f}{branch}, "
          f"val acc {m['val_acc']:.4f}, {m['params']} params; student at {run.student_path}")
    if run.run_id:
        print(f"  MLflow run {run.run_id}: `kdray export --run {run.run_id} --out DIR` exports it; "
              f"`kdray best --experiment {args.experiment or 'kdray'}` ranks it among the experiment's runs")
    else:
        print(f"  `kdray export --student {run.student_path} --out DIR` exports it")
    return 0
