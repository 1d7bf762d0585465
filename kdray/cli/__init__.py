"""The `kdray` command line: the only door users knock on."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from kdray.api import check_readable_store
from kdray.core.errors import KdrayError
from kdray.core.guards import Interrupted, stop_signals_interrupt
from kdray.core.outcome import disk_full_line
from kdray.core.values import mask_credentials

DEFAULT_WORKDIR = "kdray-work"


def workdir(args) -> Path:
    from kdray.api import resolve_workdir

    return resolve_workdir(getattr(args, "workdir", None))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_set(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise KdrayError(f"--set {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


# --------------------------------------------------------------------------------------------
# shared option groups
# --------------------------------------------------------------------------------------------
def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="digits (embedded default), cifar10, cifar100, imagefolder, fake")
    g.add_argument("--data-dir", help="where the dataset lives (cifar: download root; imagefolder: the class-per-folder tree)")
    g.add_argument("--no-download", dest="download", action="store_const", const=False,
                   help="never download (cifar); fail with a message if the files are missing")
    g.add_argument("--train-fraction", type=float, help="stratified fraction of the training split to use (0-1], for limited-data runs")
    g.add_argument("--val-fraction", type=float, help="fraction of the training split held out for validation (default 0.1)")
    g.add_argument("--data-seed", type=int, help="seed of the validation split and the train-fraction subset (default 0)")
    g.add_argument("--image-size", type=int, help="resize images once to this size (default 32)")


def add_optim_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="training epochs (default 10)")
    g.add_argument("--batch-size", type=int, help="global batch size, split across workers (default 64)")
    g.add_argument("--lr", type=float, help="learning rate (default 0.05)")
    g.add_argument("--optimizer", help="sgd (default) or adamw")
    g.add_argument("--schedule", help="cosine (default), step or constant")
    g.add_argument("--weight-decay", type=float, help="weight decay (default 5e-4)")
    g.add_argument("--seed", type=int, help="seed for initialisation, shuffling and augmentation (default 0)")
    g.add_argument("--device", help="auto (default: cuda if visible), cpu, cuda, cuda:N")
    g.add_argument("--amp", help="auto (bf16 autocast on GPU and on CPUs with native bf16), bf16, off")
    g.add_argument("--config", help="YAML file of config keys (read with safe_load); flags override it")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="set any config key (repeatable), e.g. --set feat_weight=0.1")


def collect(args, keys) -> dict:
    return {k: getattr(args, k, None) for k in keys}


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------
DATA_KEYS = ("dataset", "data_dir", "download", "train_fraction", "val_fraction", "data_seed", "image_size")
OPTIM_KEYS = ("epochs", "batch_size", "lr", "optimizer", "schedule", "weight_decay", "seed", "device", "amp")
RUN_KEYS = ("method", "student", "teachers", "workers")


def method_keys() -> tuple:
    """The run keys plus every hyperparameter the registered methods declare (each has a flag)."""
    from kdray.distill import HPARAMS

    return RUN_KEYS + tuple(HPARAMS)


def build_config(args, keys, extra=None):
    from kdray.train.config import load_config

    overrides = collect(args, keys)
    overrides.update(parse_set(getattr(args, "set", None)))
    overrides.update(extra or {})
    return load_config(getattr(args, "config", None), overrides)


def cmd_train(args) -> int:
    from kdray.api import train

    cfg = build_config(args, DATA_KEYS + OPTIM_KEYS + method_keys())
    with stop_signals_interrupt():
        run = train(cfg, out=args.out, name=args.name, resume=args.resume, workdir=workdir(args),
                    track=not args.no_track, tracking_uri=getattr(args, "tracking_uri", None), experiment=args.experiment or "kdray",
                    teacher_store=args.teacher_store, teacher_store_budget=args.teacher_store_budget,
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


def tracking_uri(args) -> str:
    from kdray.tracking.store import resolve_uri

    return resolve_uri(getattr(args, "tracking_uri", None), workdir(args))


def tracking_from_args(args, experiment_default: str = "kdray"):
    """None with --no-track; else the checked store, experiment and workdir for MLflow."""
    from kdray.api import tracking_settings

    return tracking_settings(not getattr(args, "no_track", False), getattr(args, "tracking_uri", None),
                             getattr(args, "experiment", None) or experiment_default, workdir(args))


def cmd_best(args) -> int:
    from kdray.tracking.query import best_runs
    from kdray.tracking.tags import STATE_TAG

    uri = tracking_uri(args)
    check_readable_store(uri)
    if args.top < 1:
        raise KdrayError(f"--top {args.top} is out of range; allowed: >= 1")
    runs, metric, mode = best_runs(uri, args.experiment, metric=args.metric, mode=args.mode,
                                      max_params=args.max_params, max_latency_ms=args.max_latency_ms, top=args.top)
    rows = []
    for r in runs:
        m, t = r.data.metrics, r.data.tags
        rows.append({"run_id": r.info.run_id, "run_name": r.info.run_name, "method": t.get("kdray.method"),
                     "state": t.get(STATE_TAG), metric: m.get(metric), "test_acc": m.get("test_acc"),
                     "test_acc_best_branch": m.get("test_acc_best_branch"), "params": m.get("params"),
                     "latency_ms": m.get("latency_ms"), "parent_run_id": t.get("mlflow.parentRunId")})
    out = {"experiment": args.experiment, "metric": metric, "mode": mode, "runs": rows,
           "tracking_uri": mask_credentials(uri)}
    if args.register:
        from kdray.deploy.champion import register_champion

        out["registered"] = register_champion(uri, rows[0]["run_id"], args.register, log=log)
    if args.json:
        emit_json(out, sort_keys=True, default=str)
        return 0
    def fmt(v, digits=4):
        return "-" if v is None else f"{v:.{digits}f}"

    print(f"top {len(rows)} of experiment {args.experiment!r} by {metric} ({mode}):")
    print(f"  {'#':>2}  {'run id':32}  {'name':24}  {'method':7}  {metric:>10}  {'test_acc':>8}  {'params':>9}  {'latency_ms':>10}")
    for i, r in enumerate(rows, 1):
        print(f"  {i:>2}  {r['run_id']:32}  {str(r['run_name'])[:24]:24}  {str(r['method']):7}  {fmt(r[metric]):>10}  "
              f"{fmt(r['test_acc']):>8}  {fmt(r['params'], 0):>9}  {fmt(r['latency_ms'], 3):>10}")
    if args.register:
        reg = out["registered"]
        print(f"registered {reg['model_uri']} (version {reg['version']}, run {reg['run_id']}); "
              f"load it with mlflow.pytorch.load_model({reg['model_uri']!r})")
    return 0


def cmd_export(args) -> int:
    from kdray.deploy.export import export_student
    from kdray.train.checkpoint import safe_load

    if bool(args.run) == bool(args.student):
        raise KdrayError("give exactly one of --run RUN_ID (an MLflow run) or --student PATH (a student.pt)")
    branch = args.branch
    if branch not in ("best", "all"):
        try:
            branch = int(branch)
        except ValueError:
            raise KdrayError(f"--branch {args.branch!r} is not allowed; allowed: best, all or a branch number") from None
    if args.run:
        from kdray.tracking.query import download_student

        uri = tracking_uri(args)
        check_readable_store(uri)
        path = download_student(uri, args.run)
    else:
        path = Path(args.student)
        if not path.is_file():
            raise KdrayError(f"--student {path}: no such file")
    record = safe_load(path, "student")
    info = export_student(record, branch=branch, out=Path(args.out), overwrite=args.overwrite,
                          recheck=not args.no_recheck, log=log, source=path)
    if args.json:
        emit_json(info, sort_keys=True, default=str)
    else:
        acc = info.get("test_acc_rechecked")
        check = (f": test acc re-checked {acc:.4f} (logged {info.get('test_acc_logged')})" if acc is not None
                 else " (accuracy not re-checked)")
        print(f"exported {info.get('branch')} of {record['arch']} ({record['method']}) to {args.out}{check}")
    return 0


def teacher_origin(t: dict) -> str:
    """'resnet20 seed 0' for a teacher kdray trained; 'resnet18 imported from FILE' otherwise."""
    if t.get("imported"):
        return f"{t['arch']} imported from {t.get('source', '?')}"
    return f"{t['arch']} seed {t['seed']}"


def cmd_teachers_train(args) -> int:
    cfg = build_config(args, DATA_KEYS + OPTIM_KEYS)
    from kdray.train.teacher_set import train_teachers

    out = Path(args.out) if args.out else workdir(args) / "teachers" / cfg.dataset
    tracking = tracking_from_args(args, "kdray-teachers")
    manifest = train_teachers(cfg, args.arch or ["resnet20"], args.count, out, log=log, tracking=tracking)
    if args.json:
        emit_json({"out": str(out), **manifest}, sort_keys=True)
    else:
        for t in manifest["teachers"]:
            print(f"{t['file']}: {teacher_origin(t)} test acc {t['test_acc']:.4f} ({t['params']} params)")
        print(f"teachers written to {out}")
    return 0


def cmd_teachers_show(args) -> int:
    from kdray.teachers.ensemble import load_teachers, read_manifest
    from kdray.teachers.store import STORES, list_stores

    manifest = read_manifest(args.dir)
    load_teachers(args.dir)  # verifies every checksum and state dict
    stores = list_stores(Path(args.dir) / STORES)
    if args.json:
        emit_json({**manifest, "stores": stores}, sort_keys=True)
        return 0
    print(f"{args.dir}: {len(manifest['teachers'])} teachers on {manifest['dataset']} ({len(manifest['classes'])} classes), all verified")
    for t in manifest["teachers"]:
        print(f"  {t['file']}: {teacher_origin(t)} test acc {t['test_acc']:.4f}")
    for m in stores:
        print(store_line(m))
    if not stores:
        print(f"  no teacher store yet (`kdray teachers store {args.dir} --space FILE` builds one; sweeps build theirs)")
    return 0


def cmd_teachers_import(args) -> int:
    cfg = build_config(args, DATA_KEYS + ("device",))
    from kdray.teachers.importing import import_teachers

    manifest = import_teachers(args.files, out=args.out, cfg=cfg, archs=args.arch, layout=args.layout,
                               weights=args.weights or (), log=log)
    if args.json:
        emit_json({"out": str(args.out), **manifest}, sort_keys=True)
        return 0
    for t in manifest["teachers"]:
        print(f"{t['file']}: {t['arch']} from {t['source']} val acc {t['val_acc']:.4f} test acc {t['test_acc']:.4f} "
              f"({t['params']} params)")
    print(f"teachers written to {args.out}")
    return 0


def store_line(m: dict) -> str:
    k = m["key"]
    views = k["views"]
    return (f"  store {m['digest']}: {k['dataset']} {k['image_size']}px train split {k['train'][:12]}, views crop "
            f"{views['crop_padding']} flip {views['hflip']}, {'bf16' if k['precision']['bf16'] else 'fp32'}; "
            f"{m['rows']}/{m['views']} views ({100.0 * m['rows'] / max(m['views'], 1):.1f}%), "
            f"{'logits + feature maps' if m['feats'] else 'logits'}, {m['bytes'] / 1024**2:.1f} MB, built in {m['build_s']} s")


def cmd_teachers_store(args) -> int:
    from kdray.teachers.source import open_teacher_store
    from kdray.teachers.store import list_stores

    if args.space:
        from kdray.sweep.space import load_space
        from kdray.sweep.teachers import sweep_store_needs

        space = load_space(args.space)
        space.base = space.base.replace(teachers=str(args.dir))
        needs = sweep_store_needs(space)
        if needs is None:
            raise KdrayError(f"--space {args.space}: no method of this space uses teachers; nothing to store")
        cfg, seeds, epochs, feats = needs
    else:
        cfg = build_config(args, DATA_KEYS + OPTIM_KEYS + method_keys()).replace(teachers=str(args.dir))
        seeds, epochs, feats = None, None, None
    with stop_signals_interrupt():
        store = open_teacher_store(cfg, seeds=seeds, epochs=epochs, feats=feats, root=args.store,
                                   budget_gb=args.budget, log=log)
    if store is None:
        raise KdrayError(f"method {cfg.method!r} uses no teachers; nothing to store")
    on_disk = list_stores(Path(args.store or Path(args.dir) / "stores"))
    meta = next((m for m in on_disk if m["digest"] == store.meta.get("digest")), None)
    if meta is None:
        raise KdrayError(f"teacher store {store.meta.get('digest')} was computed but could not be written "
                         "(see the line above); point --store at a writable folder")
    if args.json:
        emit_json(meta, sort_keys=True)
    else:
        print(store_line(meta).strip())
    return 0


def list_shipped(args, files: dict, width: int, hint: str) -> int:
    """Print shipped files (name -> path) with their one-line descriptions, or them as JSON."""
    from kdray.core.shipped import description

    rows = [{"name": n, "path": str(p), "description": description(p)} for n, p in files.items()]
    if getattr(args, "json", False):
        emit_json(rows)
        return 0
    for r in rows:
        print(f"{r['name']:{width}}  {r['description']}")
    print(hint)
    return 0


def cmd_spaces(args) -> int:
    from kdray.core.shipped import copy_out, resolve_space, shipped_spaces

    action = args.spaces_command or "list"
    if action == "show":
        print(resolve_space(args.name).read_text(), end="")
        return 0
    if action == "copy":
        copied = copy_out([resolve_space(args.name)], Path(args.dest))
        print(f"copied to {copied[0]}; run it with `kdray tune --space {copied[0]}`")
        return 0
    return list_shipped(args, shipped_spaces(), 10,
                        "run one with `kdray tune --space NAME`; `kdray spaces copy NAME` gives you a file to edit")


def cmd_clusters(args) -> int:
    from kdray.core.shipped import copy_out, shipped_cluster_files

    files = shipped_cluster_files()
    if args.clusters_command == "copy":
        copied = copy_out(files, Path(args.dest))
        print(f"copied {len(copied)} files to {Path(args.dest)}/; build the wheel into ./dist "
              f"(`python -m pip wheel --no-deps -w dist .` in a checkout) and start a cluster with "
              f"`ray up {Path(args.dest) / 'onprem.yaml'}` (see its README)")
        return 0
    return list_shipped(args, {f.name: f for f in files}, 14, "`kdray clusters copy` copies them to ./clusters")


def cmd_tune(args) -> int:
    from kdray.api import sweep

    result = sweep(args.space, samples=args.samples, concurrency=args.concurrency, workers=args.workers,
                   gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                   experiment=args.experiment, address=args.address, resume=args.resume,
                   optuna_storage=args.optuna_storage, max_failures=args.max_failures,
                   teacher_store=args.teacher_store_on, teacher_store_dir=args.teacher_store,
                   teacher_store_budget=args.teacher_store_budget, workdir=workdir(args),
                   track=not args.no_track, tracking_uri=getattr(args, "tracking_uri", None), seed=args.seed,
                   log=log).summary
    if args.json:
        emit_json(result, sort_keys=True, default=str)
        return _all_failed(result)
    counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(result["study_counts"].items()))
    print(f"sweep {result['experiment']}: {counts}")
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
        print("  metrics: " + " ".join(f"{k}={b['metrics'][k]:.4f}" for k in ("val_acc", "test_acc", "val_loss")
                                          if isinstance(b["metrics"].get(k), float)) + f" epochs={b['metrics'].get('epoch')}{where}")
        print(f"  student: {b.get('student_path') or b['metrics'].get('checkpoint_path', '?')}")
        if b.get("mlflow_run_id"):
            print(f"  MLflow run {b['mlflow_run_id']}: `kdray best --experiment {result['experiment']} --register NAME` "
                  f"registers the winner; `kdray export --run {b['mlflow_run_id']} --out DIR` exports it")
    if "pareto_front" in result:
        print("Pareto front (" + ", ".join(f"{m} {d}" for m, d in result["metrics"]) + "):")
        for t in result["pareto_front"]:
            print(f"  trial #{t['number']}: values={t['values']} params={t['params']}")
    t = result.get("timing") or {}
    if t.get("trials"):
        share = f" ({100 * t['train_share']:.0f}% of the trials' time)" if t.get("train_share") else ""
        print(f"time: {t['wall_s']:.0f}s for {t['trials']} trial(s), {t['train_s']:.0f}s of it in epochs{share}; "
              f"fixed cost per trial about {t['overhead_s_per_trial']:.1f}s (start-up to first report "
              f"{t['startup_s_mean']}s)")
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


def build_parser() -> argparse.ArgumentParser:
    from kdray._version import __version__

    p = argparse.ArgumentParser(
        prog="kdray",
        description="Distil teacher ensembles into small image classifiers (EKD, FEED and baselines), "
        "search the distillation's hyperparameters with Ray Tune + Optuna, and track everything in MLflow.",
    )
    p.add_argument("--version", action="version", version=f"kdray {__version__}")
    p.add_argument("--workdir", default=argparse.SUPPRESS, help=WORKDIR_HELP)
    p.add_argument("--tracking-uri", default=argparse.SUPPRESS, help=TRACKING_HELP)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    # train ----------------------------------------------------------------------------------
    t = sub.add_parser("train", help="distil one student (one run)", description="Train one student with a distillation method; one progress line per epoch, a summary at the end.")
    m = t.add_argument_group("method")
    from kdray.distill import METHODS

    m.add_argument("--method", help=f"{', '.join(sorted(METHODS))} (default ekd)")
    m.add_argument("--student", help="student architecture, e.g. resnet8 (default), resnet8x4, wrn_16_2, mobilenet_v3_small")
    m.add_argument("--teachers", help="teacher directory written by `kdray teachers train`")
    add_hparam_args(m)
    m.add_argument("--workers", type=int, help="Ray Train DDP workers (default 1: in this process)")
    m.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray Train worker when --workers > 1 (default 0)")
    m.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per Ray Train worker (default 1)")
    m.add_argument("--address", help="Ray cluster address for --workers > 1 (default: a local Ray)")
    m.add_argument("--max-failures", type=int, default=0,
                   help="with --workers > 1: worker failures the run survives, resuming from its last checkpoint (default 0)")
    m.add_argument("--teacher-store", metavar="DIR|auto",
                   help="take the teachers' outputs from a teacher store in DIR (auto: the teacher set's stores/), "
                   "computing the views it lacks once (default: teachers run live on every batch)")
    m.add_argument("--teacher-store-budget", type=float, default=4.0, metavar="GB",
                   help="memory / disk a teacher store may take (default 4); feature maps beyond it are computed online")
    add_data_args(t)
    add_optim_args(t)
    o = t.add_argument_group("output")
    o.add_argument("--out", help="run folder for checkpoints and the student (default WORKDIR/runs/NAME)")
    o.add_argument("--name", help="run name (default METHOD-STUDENT-sSEED-TIME)")
    o.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    o.add_argument("--json", action="store_true", help="print one JSON object of final metrics on stdout")
    add_tracking_args(t)
    t.set_defaults(func=cmd_train)

    # tune -----------------------------------------------------------------------------------
    tu = sub.add_parser("tune", help="search distillation hyperparameters (Ray Tune + Optuna TPE + ASHA)",
                        description="Run a sweep from a YAML search space: the teachers' outputs are computed once "
                        "into a teacher store shared by every trial; a 1-worker trial trains in Tune's trial process, "
                        "a trial of W > 1 workers is a Ray Train run with W DDP workers; Optuna's TPE proposes, ASHA "
                        "stops weak trials early (recorded as PRUNED).")
    tu.add_argument("--space", required=True, help="search space YAML, e.g. search_spaces/quick.yaml")
    tu.add_argument("--samples", type=int, help="number of trials (default: the space's `samples`)")
    tu.add_argument("--concurrency", type=int, default=1, help="trials running at once (default 1)")
    tu.add_argument("--workers", type=int, default=1, help="DDP workers per trial (default 1: the trial trains in its own process; W > 1: a Ray Train TorchTrainer)")
    tu.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker; fractions let small trials share a GPU (default 0)")
    tu.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    tu.add_argument("--experiment", help="sweep / Optuna study / MLflow experiment name (default: the space's name)")
    tu.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    tu.add_argument("--resume", action="store_true", help="continue the sweep's Optuna study; interrupted trials run again")
    tu.add_argument("--optuna-storage", help="Optuna storage URL (default sqlite:///WORKDIR/optuna.db)")
    tu.add_argument("--max-failures", type=int, default=0, help="worker failures a trial survives, resuming from its last checkpoint (default 0)")
    tu.add_argument("--seed", type=int, help="seed of Optuna's sampler, to repeat a sweep's proposals (default: the space's "
                    "`seed`, else a random one, printed and recorded in the study and the MLflow sweep run; "
                    "--resume keeps the study's)")
    tu.add_argument("--no-teacher-store", dest="teacher_store_on", action="store_false",
                    help="run the teachers live in every trial instead of sharing their outputs from a teacher store")
    tu.add_argument("--teacher-store", metavar="DIR", help="where teacher stores live (default: the teacher set's stores/)")
    tu.add_argument("--teacher-store-budget", type=float, default=4.0, metavar="GB",
                    help="memory / disk the sweep's teacher store may take (default 4); feature maps beyond it are computed online")
    tu.add_argument("--json", action="store_true", help="print the sweep's result (trials, best, Pareto front) as JSON")
    tu.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///WORKDIR/mlflow.db); "
                    "an `mlflow server` when trials run on several hosts")
    tu.add_argument("--no-track", action="store_true", help="do not log the sweep to MLflow")
    tu.set_defaults(func=cmd_tune)

    # best -----------------------------------------------------------------------------------
    b = sub.add_parser("best", help="list the best students of an experiment; register the winner",
                       description="Rank the completed runs of an MLflow experiment (a sweep's trials or train runs) "
                       "by a metric, with optional size / latency limits; --register logs the winner as an MLflow "
                       "PyTorch model and registers it with the alias `champion`.")
    b.add_argument("--experiment", required=True, help="MLflow experiment (the sweep's --experiment / space name)")
    b.add_argument("--metric", help="metric to rank by (default: the sweep's metric, else val_acc)")
    b.add_argument("--mode", choices=["max", "min"], help="max or min (default: the sweep's mode, else max)")
    b.add_argument("--max-params", type=int, help="only students with at most this many parameters")
    b.add_argument("--max-latency-ms", type=float, help="only students at most this slow (CPU, batch 1, ms)")
    b.add_argument("--top", type=int, default=5, help="rows to show (default 5)")
    b.add_argument("--register", metavar="MODEL_NAME", help="register the winner under MODEL_NAME, alias champion")
    b.add_argument("--json", action="store_true", help="print the table (and registration) as JSON")
    b.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite in the workdir)")
    b.set_defaults(func=cmd_best)

    # export ---------------------------------------------------------------------------------
    x = sub.add_parser("export", help="write a deployable student (state dict + exported program)",
                       description="Export a trained student for deployment: the whole EKD ensemble or one branch "
                       "(FEED translators are never part of it), as a plain state dict plus a torch.export program, "
                       "with its accuracy re-checked on the test split.")
    x.add_argument("--run", help="MLflow run id whose student/student.pt to export")
    x.add_argument("--student", help="or a local student.pt (from `kdray train`)")
    x.add_argument("--branch", default="best", help="best (default: the best single branch), all (the whole ensemble) or N")
    x.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    x.add_argument("--overwrite", action="store_true",
                   help="replace an earlier kdray export in --out (refused for a folder holding anything else)")
    x.add_argument("--no-recheck", action="store_true", help="skip re-checking the accuracy on the test split")
    x.add_argument("--json", action="store_true", help="print what was exported as JSON")
    x.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite in the workdir)")
    x.set_defaults(func=cmd_export)

    # spaces / clusters: the files kdray ships --------------------------------------------------
    sp = sub.add_parser("spaces", help="list, show or copy the search spaces kdray ships",
                        description="The search spaces kdray ships; `kdray tune --space NAME` runs one by name "
                        "(a path to your own YAML works too).")
    spsub = sp.add_subparsers(dest="spaces_command", metavar="ACTION")
    spl = spsub.add_parser("list", help="names and one-line descriptions (the default)")
    for parser in (sp, spl):  # `kdray spaces --json` and `kdray spaces list --json`
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="print name, path and description as JSON")
    sps = spsub.add_parser("show", help="print a shipped space's YAML")
    sps.add_argument("name", help="a shipped space, e.g. quick")
    spc = spsub.add_parser("copy", help="copy a shipped space to a file you can edit")
    spc.add_argument("name", help="a shipped space, e.g. ekd")
    spc.add_argument("dest", nargs="?", default=".", help="destination folder (default: the current one)")
    sp.set_defaults(func=cmd_spaces)
    cl = sub.add_parser("clusters", help="list or copy the Ray cluster files kdray ships (`ray up`)",
                        description="The Ray cluster files kdray ships (AWS, GCP, on-prem over SSH) and the MLflow "
                        "head script they mount; `kdray clusters copy` puts them in ./clusters, where they expect "
                        "to be (see their README).")
    clsub = cl.add_subparsers(dest="clusters_command", metavar="ACTION")
    cll = clsub.add_parser("list", help="file names and one-line descriptions (the default)")
    for parser in (cl, cll):
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="print name, path and description as JSON")
    clc = clsub.add_parser("copy", help="copy every cluster file into DEST")
    clc.add_argument("dest", nargs="?", default="clusters", help="destination folder (default ./clusters)")
    cl.set_defaults(func=cmd_clusters)

    # teachers -------------------------------------------------------------------------------
    te = sub.add_parser("teachers", help="train, import or inspect teacher ensembles",
                        description="Train, import or inspect teacher ensembles.")
    tsub = te.add_subparsers(dest="teachers_command", metavar="ACTION")
    tt = tsub.add_parser("train", help="train K teachers and write weights + manifest",
                         description="Train K teachers (architectures cycled, seeds SEED..SEED+K-1) and write their weights and a manifest with arch, dataset, classes, accuracy, seed and sha256.")
    tt.add_argument("--arch", action="append", help="teacher architecture (repeatable; cycled over --count), default resnet20")
    tt.add_argument("--count", type=int, default=3, help="number of teachers K (default 3)")
    tt.add_argument("--out", help="output directory (default WORKDIR/teachers/DATASET)")
    tt.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")
    add_data_args(tt)
    add_optim_args(tt)
    add_tracking_args(tt, default_experiment="kdray-teachers")
    tt.set_defaults(func=cmd_teachers_train)
    st = tsub.add_parser("store", help="build (or extend) a teacher store: the teachers' outputs for the views runs will see",
                         description="Compute the teachers' outputs for every training view a sweep of --space (or a "
                         "run of the given method, data and epochs) will see, once, into a verified store that sweeps "
                         "and `kdray train --teacher-store` read instead of running the teachers.")
    st.add_argument("dir", help="teacher directory")
    st.add_argument("--space", help="build what a sweep of this search space needs (its seeds, epochs, methods)")
    st.add_argument("--method", help="otherwise: the method a run will train (default ekd)")
    st.add_argument("--store", metavar="DIR", help="where stores live (default DIR/stores)")
    st.add_argument("--budget", type=float, default=4.0, metavar="GB", help="memory / disk the store may take (default 4)")
    st.add_argument("--json", action="store_true", help="print the store's record as JSON")
    add_hparam_args(st)
    add_data_args(st)
    add_optim_args(st)
    st.set_defaults(func=cmd_teachers_store)
    ts = tsub.add_parser("show", help="verify and list a teacher directory and its stores", description="Verify checksums and weights of a teacher directory and list its teachers and teacher stores (key, size, coverage).")
    ts.add_argument("dir", help="teacher directory")
    ts.add_argument("--json", action="store_true", help="print the manifest as JSON")
    ts.set_defaults(func=cmd_teachers_show)
    ti = tsub.add_parser("import", help="import classifiers trained elsewhere as a verified teacher set",
                         description="Load state-dict files (kdray or torchvision key layout; tensors only) and/or "
                         "torchvision pretrained weights into their architectures built for the dataset's classes, "
                         "measure their val and test accuracy on it, and write a teacher set like `kdray teachers "
                         "train` does (weights + manifest with arch, source, accuracy and sha256).")
    ti.add_argument("files", nargs="*", metavar="FILE",
                    help="state-dict file: a plain state dict or a checkpoint holding one under 'state_dict' or "
                    "'model' ('module.' prefixes are removed)")
    ti.add_argument("--arch", action="append", required=True,
                    help="architecture (repeatable): one for all sources, or one per source in order (files, then --weights)")
    ti.add_argument("--weights", action="append", metavar="NAME",
                    help="torchvision weights as one more teacher (repeatable), e.g. ResNet18_Weights.IMAGENET1K_V1 or "
                    "DEFAULT; read from the torch hub cache, downloaded if missing; a classifier whose classes differ "
                    "from the dataset's is re-initialised (fine-tune such a teacher)")
    ti.add_argument("--layout", choices=("auto", "kdray", "torchvision"), default="auto",
                    help="the files' key layout (default auto: kdray when every key starts with stem./stages./head.)")
    ti.add_argument("--out", required=True, help="a new or empty folder for the teacher set (never overwritten)")
    ti.add_argument("--device", help="where accuracy is measured: auto (default: cuda if visible), cpu, cuda, cuda:N")
    ti.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")
    add_data_args(ti)
    ti.set_defaults(func=cmd_teachers_import)
    te.set_defaults(func=lambda a: (te.print_help(), 2)[1])
    accept_global_options_anywhere(p)
    return p


WORKDIR_HELP = (f"kdray working directory for teachers, runs and local stores (default ./{DEFAULT_WORKDIR} or "
                "$KDRAY_WORKDIR); before or after the command")
TRACKING_HELP = ("MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///WORKDIR/mlflow.db); "
                 "before or after the command")


def accept_global_options_anywhere(parser: argparse.ArgumentParser) -> None:
    """``--workdir`` and ``--tracking-uri`` before or after the (sub)command: every command's parser
    takes them too. Their defaults are SUPPRESS everywhere, so a value given before the command is
    not overwritten by the command parser's default (argparse copies a subparser's defaults into
    the namespace)."""
    for action in parser._actions:  # argparse has no public API to walk its subparsers
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in dict.fromkeys(action.choices.values()):
            options = {o: a for a in sub._actions for o in a.option_strings}
            if "--workdir" not in options:
                sub.add_argument("--workdir", default=argparse.SUPPRESS, help=WORKDIR_HELP)
            if "--tracking-uri" in options:
                options["--tracking-uri"].default = argparse.SUPPRESS
            accept_global_options_anywhere(sub)


def add_hparam_args(group) -> None:
    """One flag per hyperparameter the registered methods declare (``--feat-weight``, ...):
    its type, help and default come from the declaration (kdray/distill/hparams.py)."""
    from kdray.distill import HPARAMS, METHODS

    for name, p in sorted(HPARAMS.items()):
        users = ", ".join(m for m, cls in sorted(METHODS.items()) if p in cls.hparams)
        default = "" if p.default is None else f", default {p.default}"
        kind = str if p.type in (list, bool) else p.type  # lists as "0.5,0.7"; the config coerces both
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, metavar=name.upper(),
                           help=f"{p.help} ({users}{default}; allowed: {p.allowed()})")


def add_tracking_args(p: argparse.ArgumentParser, default_experiment: str = "kdray") -> None:
    g = p.add_argument_group("tracking (MLflow)")
    g.add_argument("--experiment", help=f"MLflow experiment name (default {default_experiment})")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///WORKDIR/mlflow.db)")
    g.add_argument("--no-track", action="store_true", help="do not log to MLflow")


_JSON_OUT = None  # the real stdout while a --json command runs (everything else goes to stderr)


def emit_json(obj, **kw) -> None:
    """The one JSON line a --json command prints: on the real stdout, whatever libraries print."""
    out = _JSON_OUT or sys.stdout
    out.write(json.dumps(obj, **kw) + "\n")
    out.flush()


def main(argv=None) -> int:
    global _JSON_OUT
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "json", False):
            # MLflow, Ray and Tune print to stdout ("View run ..." links, tables); keep stdout for the JSON.
            _JSON_OUT = sys.stdout
            with contextlib.redirect_stdout(sys.stderr):
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except KdrayError as exc:
        print(f"kdray: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except Interrupted as exc:
        print(f"kdray: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kdray: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kdray spaces | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        line = disk_full_line(exc)
        if line is None:
            raise
        print(f"kdray: error: {line}", file=sys.stderr)
        return 1
    finally:
        _JSON_OUT = None


def entry() -> None:
    """The `kdray` console script: main(), then leave without interpreter teardown (see
    kdray.procexit: Ray's native client threads outlive ray.shutdown() and can crash it)."""
    from kdray.core.procexit import exit_after_atexit

    set_code = exit_after_atexit()
    code = main()
    set_code(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
