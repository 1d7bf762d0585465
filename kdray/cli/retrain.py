"""`kdray best --retrain --seeds S,S,...`: the best configurations of an experiment trained again,
once per seed, as seed groups beside them: is the winner's single score its configuration's, or
its seed's luck?"""

from __future__ import annotations

from kdray.cli.common import emit_json, log, workdir
from kdray.cli.train import group_json
from kdray.core.errors import KdrayError


def check_retrain_flags(args) -> list:
    """The seeds of ``--retrain`` (checked before anything is read); ``--retrain`` and ``--seeds``
    come together."""
    from kdray.training.seed_group import SEEDS_ALLOWED, parse_seeds

    if args.retrain and args.seeds is None:
        raise KdrayError(f"--retrain needs --seeds: the seeds to re-train the best configuration(s) with; "
                         f"allowed: {SEEDS_ALLOWED}")
    if args.seeds is not None and not args.retrain:
        raise KdrayError("--seeds goes with --retrain (kdray best --retrain --seeds 0,1,2 re-trains the best run's "
                         "configuration with those seeds)")
    return parse_seeds(args.seeds) if args.retrain else []


def source_config(uri: str, row: dict):
    """The exact configuration a ranked run trained with: its student artifact's record (every key,
    typed; the MLflow params are rounded text), without how it was executed."""
    from kdray.core.io import safe_load
    from kdray.tracking.query import download_student
    from kdray.tracking.tags import RUNTIME_KEYS
    from kdray.training.config import from_dict

    record = safe_load(download_student(uri, row["run_id"]), "student")
    values = {k: v for k, v in (record.get("config") or {}).items() if k not in RUNTIME_KEYS}
    if not values:
        raise KdrayError(f"run {row['run_id']} ({row['run_name']}): its student record holds no configuration")
    return from_dict(values, f"run {row['run_id']}'s student record")


def retrain(args, uri: str, rows: list, metric: str, mode: str, seeds: list) -> dict:
    """A seed group per ranked run, in the experiment, tagged with the run it re-trains. Every
    source's configuration is read first: a run without a student is one line before any training."""
    from kdray.api import train_seeds
    from kdray.core.guards import stop_signals_interrupt
    from kdray.tracking.seed_groups import RETRAIN_TAG

    configs = [source_config(uri, row) for row in rows]
    groups = []
    with stop_signals_interrupt():
        for i, (row, cfg) in enumerate(zip(rows, configs), 1):
            name = f"retrain-{row['run_name']}"
            log(f"retrain {i}/{len(rows)}: run {row['run_id']} ({row['run_name']}) as seed group {name!r}")
            group = _retrain_one(args, uri, row, cfg, name, seeds, train_seeds, {RETRAIN_TAG: row["run_id"]})
            groups.append({"source": {**row, "seed": cfg.seed}, "group": group_json(group)})
    return {"experiment": args.experiment, "metric": metric, "mode": mode, "seeds": seeds, "retrained": groups}


def retrain_folder(args, row: dict, seeds: list):
    """One folder per (source run, seeds): the same command finds an earlier attempt there."""
    return workdir(args) / "runs" / f"retrain-{row['run_id'][:12]}-s{'-'.join(str(s) for s in seeds)}"


def _retrain_one(args, uri: str, row: dict, cfg, name: str, seeds: list, train_seeds, tags: dict):
    """One source run's seed group; an earlier attempt of the same retrain (interrupted, or done)
    is continued: its finished seeds are kept, an interrupted one resumes from its checkpoint."""
    from kdray.core.guards import Interrupted
    from kdray.training.seed_group import GROUP_FILE

    folder = retrain_folder(args, row, seeds)
    again = (folder / GROUP_FILE).is_file()
    if again:
        log(f"retrain: continuing the earlier retrain of run {row['run_id']} in {folder} (finished seeds are kept)")
    try:
        return train_seeds(cfg, seeds=seeds, out=folder, name=name, resume=again, workdir=workdir(args),
                           tracking_uri=uri, experiment=args.experiment, group_tags=tags, log=log)
    except Interrupted as exc:
        raise Interrupted(exc.signum, f"retrain of run {row['run_id']} interrupted by {exc.signal_name}; the same "
                          f"`kdray best ... --retrain` command continues it from {folder}") from None


def print_retrained(out: dict) -> None:
    """Each source's single scores beside its group's mean ± std, and the command comparing them."""
    from kdray.tracking.seed_groups import mean_std

    metrics = list(dict.fromkeys((out["metric"], "test_acc")))
    print(f"re-trained the top {len(out['retrained'])} of experiment {out['experiment']!r} by {out['metric']} "
          f"({out['mode']}) with seeds {','.join(str(s) for s in out['seeds'])}:")
    print(f"  {'#':>2}  {'source run (its seed)':30}  " + "  ".join(f"{m:>10}" for m in metrics)
          + f"  {'seed group':24}  " + "  ".join(f"{m + ' mean ± std':>24}" for m in metrics) + f"  {'n':>2}")
    for i, item in enumerate(out["retrained"], 1):
        src, group = item["source"], item["group"]
        single = "  ".join("         -" if src.get(m) is None else f"{src[m]:>10.4f}" for m in metrics)
        spread = "  ".join(f"{mean_std(group['aggregates'], m):>24}" for m in metrics)
        label = f"{str(src['run_name'])[:22]} (seed {src['seed']})"
        print(f"  {i:>2}  {label:30}  {single}  {group['name'][:24]:24}  {spread}  {group['aggregates']['n']:>2}")
        print(f"      source run {src['run_id']}, seed group run {group['run_id']}")
    ids = " ".join(f"--run-id {item['group']['run_id']}" for item in out["retrained"])
    print(f"compare them: `kdray compare {ids}` (each group's seeds: n, mean, std and per-seed values)")


def cmd_retrain(args, uri: str, rows: list, metric: str, mode: str, seeds: list) -> int:
    out = retrain(args, uri, rows, metric, mode, seeds)
    if args.json:
        emit_json(out, sort_keys=True, default=str)
    else:
        print_retrained(out)
    return 0
