"""`kdray train`: distil one student and print its result; with ``--seeds``, one run per seed as a
seed group and the mean ± std of their scores."""

from __future__ import annotations

from kdray.cli.common import (
    DATA_KEYS,
    OPTIM_KEYS,
    build_config,
    emit_json,
    log,
    method_keys,
    parse_set,
    workdir,
)
from kdray.core.errors import KdrayError
from kdray.core.guards import stop_signals_interrupt


def cmd_train(args) -> int:
    if args.seeds is not None:
        return cmd_train_seeds(args)
    from kdray.api import train

    cfg = build_config(args, DATA_KEYS + OPTIM_KEYS + method_keys())
    with stop_signals_interrupt():
        run = train(cfg, out=args.out, name=args.name, resume=args.resume, **train_keywords(args))
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


def train_keywords(args) -> dict:
    """What `kdray train`'s flags say beyond the configuration: where it tracks, the teacher store,
    Ray Train's workers (:func:`kdray.api.train`'s keywords; a seed group passes them to every seed)."""
    return dict(workdir=workdir(args), track=not args.no_track, tracking_uri=getattr(args, "tracking_uri", None),
                experiment=args.experiment or "kdray", teacher_store=args.teacher_store,
                teacher_store_budget=args.teacher_store_budget, teacher_store_logits=args.teacher_store_logits,
                teacher_store_topk=args.teacher_store_topk, address=args.address,
                gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                max_failures=args.max_failures, log=log)


def cmd_train_seeds(args) -> int:
    """``--seeds 0,1,2``: the configuration once per seed, as one seed group."""
    from kdray.api import train_seeds
    from kdray.training.seed_group import parse_seeds

    seeds = parse_seeds(args.seeds)  # a bad list is one line before anything is read or created
    if args.seed is not None or "seed" in parse_set(args.set):
        raise KdrayError("--seeds and --seed exclude each other: --seeds 0,1,2 trains one run per seed; "
                         "--seed N one run")
    cfg = build_config(args, DATA_KEYS + OPTIM_KEYS + method_keys())
    with stop_signals_interrupt():
        group = train_seeds(cfg, seeds=seeds, out=args.out, name=args.name, resume=args.resume,
                            **train_keywords(args))
    if args.json:
        emit_json(group_json(group), sort_keys=True, default=str)
        return 0
    print_group(group, cfg)
    return 0


def group_json(group) -> dict:
    return {"run_id": group.run_id, "name": group.name, "folder": group.folder, "experiment": group.experiment,
            "seeds": group.seeds, "skipped": group.skipped, "runs": group.rows(), "aggregates": group.summary()}


def print_group(group, cfg) -> None:
    """One line per seed, the mean ± std line, and where the group is tracked."""
    from kdray.tracking.seed_groups import mean_std

    agg = group.summary()
    print(f"done: seed group {group.name!r}: {cfg.method} {cfg.student} on {cfg.dataset}, {len(group.seeds)} seeds")
    for row in group.rows():
        earlier = " (finished earlier)" if row["seed"] in group.skipped else ""
        run = f", run {row['run_id']}" if row["run_id"] else ""
        print(f"  seed {row['seed']}: test acc {row['test_acc']:.4f}, val acc {row['val_acc']:.4f}{run}{earlier}")
    branch = (f", best branch {mean_std(agg, 'test_acc_best_branch')}" if "test_acc_best_branch_mean" in agg
              else "")
    print(f"  mean ± std over {agg['n']} seeds: test acc {mean_std(agg, 'test_acc')}{branch}, "
          f"val acc {mean_std(agg, 'val_acc')}")
    if group.run_id:
        print(f"  MLflow group run {group.run_id} in experiment {group.experiment!r}: "
              f"`kdray compare --run-id {group.run_id}` compares its seeds")
    else:
        print(f"  run folders under {group.folder}")
