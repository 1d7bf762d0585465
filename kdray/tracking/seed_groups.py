"""A seed group's MLflow parent run: repeats of one configuration with different seeds, each an
ordinary train run nested under it. The parent holds the configuration (without ``seed``), the
seeds, and at the end the mean and sample standard deviation of the children's scores with a
per-seed table as its description. ``kdray compare`` reads groups by these tags."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from kdray.core.errors import KdrayError
from kdray.tracking.runs import FOLDER_TAG, finish_run, log_batch, relative_path, start_run, versions
from kdray.tracking.state import RunHandle, TrackingSettings
from kdray.tracking.store import client, experiment_id
from kdray.tracking.tags import KIND_TAG, NOTE_TAG, REASON_TAG, STATE_TAG

SEEDS_KIND = "seeds"  # kdray.kind of a group's parent run
SEEDS_TAG = "kdray.seeds"  # on the parent: its seeds, "0,1,2"
SEED_GROUP_TAG = "kdray.seed_group"  # on each child: the parent's run id
RETRAIN_TAG = "kdray.retrain_of"  # on a group `kdray best --retrain` made: the run it re-trains

#: the scores a group summarises; test_acc_best_branch only when its children have it
GROUP_METRICS = ("val_acc", "test_acc", "test_acc_best_branch")


def seeds_text(seeds: Sequence[int]) -> str:
    return ",".join(str(s) for s in seeds)


def child_tags(group_run_id: str, group_tags: Optional[dict] = None) -> dict:
    """The tags that nest a child under its group in MLflow (the UI's tree) and for kdray, and the
    group's ``kdray.retrain_of`` (a retrain's children are not candidates of the next retrain)."""
    inherited = {k: v for k, v in (group_tags or {}).items() if k == RETRAIN_TAG}
    return {"mlflow.parentRunId": group_run_id, SEED_GROUP_TAG: group_run_id, **inherited}


def start_group(tracking: TrackingSettings, *, name: str, cfg, params: dict, seeds: Sequence[int], folder: Path,
                tags: Optional[dict] = None) -> RunHandle:
    """The group's parent run, state running: ``params`` (the configuration without ``seed``) plus
    ``seeds``; its folder tag says where its children's run folders are."""
    uri, workdir = tracking.uri, Path(tracking.workdir) if tracking.workdir else None
    exp_id = experiment_id(uri, tracking.experiment or "kdray", workdir)
    extra = {**versions(), SEEDS_TAG: seeds_text(seeds), FOLDER_TAG: relative_path(str(folder.resolve()), workdir),
             # start_run names the source after the kind; a group is made by `kdray train --seeds`
             "mlflow.source.name": "kdray train --seeds", **(tags or {})}
    run_id = start_run(uri, exp_id, run_name=name, cfg=cfg, kind=SEEDS_KIND,
                       params={**params, "seeds": seeds_text(seeds)}, extra_tags=extra, workdir=workdir)
    return RunHandle(uri, run_id, exp_id)


def reopen_group(tracking: TrackingSettings, run_id: str) -> RunHandle:
    """A group run an earlier attempt ended (interrupted, failed) running again, for ``--resume``."""
    from kdray.tracking.query import get_run

    c, run = client(tracking.uri), get_run(tracking.uri, run_id)  # one line when the store lacks it
    if run.data.tags.get(KIND_TAG) != SEEDS_KIND:
        raise KdrayError(f"MLflow run {run_id} is no seed group (its {KIND_TAG} is {run.data.tags.get(KIND_TAG)!r})")
    if REASON_TAG in run.data.tags:
        c.delete_tag(run_id, REASON_TAG)
    log_batch(c, run_id, tags={STATE_TAG: "running", NOTE_TAG: "Running again (--resume)."})
    c.update_run(run_id, status="RUNNING")
    return RunHandle(tracking.uri, run_id, run.info.experiment_id)


def finished_children(group: RunHandle) -> dict:
    """The group's completed children by seed (the latest, when a seed ran twice)."""
    runs = client(group.uri).search_runs(
        [group.experiment_id], filter_string=f"tags.`{SEED_GROUP_TAG}` = '{group.run_id}'",
        order_by=["attributes.start_time ASC"], max_results=5000)
    return {int(r.data.params["seed"]): r for r in runs
            if r.data.tags.get(STATE_TAG) == "completed" and "seed" in r.data.params}


def end_group(group: RunHandle, state: str, rows: list, aggregates: dict, reason: Optional[str] = None) -> None:
    """End the group as ``state``: its aggregates (completed only: a partial mean is not the
    group's), kdray's state tag and MLflow status, and a description with the per-seed table."""
    c = client(group.uri)
    if state == "completed":
        log_batch(c, group.run_id, metrics=aggregates)
    finish_run(group.uri, group.run_id, state, reason)
    # finish_run describes a run by its epochs; a group's description is its seeds' table
    log_batch(c, group.run_id, tags={NOTE_TAG: group_note(state, rows, aggregates, reason)})


def group_note(state: str, rows: list, aggregates: dict, reason: Optional[str] = None) -> str:
    """Markdown: how the group ended, mean ± std, and one table row per finished seed."""
    names = [m for m in GROUP_METRICS if any(m in r for r in rows)]
    lines = [f"{state.capitalize()}: {len(rows)} seed(s) finished" + (f"; {reason}" if reason else "") + "."]
    if state == "completed" and aggregates:
        lines.append(", ".join(f"{m} {mean_std(aggregates, m)}" for m in names if f"{m}_mean" in aggregates) + ".")
    if rows:
        lines += ["", "| seed | run | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
        for r in rows:
            scores = " | ".join("-" if r.get(m) is None else f"{r[m]:.4f}" for m in names)
            lines.append(f"| {r['seed']} | {r.get('run_id') or '-'} | {scores} |")
    return "\n".join(lines)


def mean_std(aggregates: dict, metric: str) -> str:
    """``0.9012 ± 0.0040`` (the mean alone for one seed: no spread to speak of)."""
    mean, std = aggregates.get(f"{metric}_mean"), aggregates.get(f"{metric}_std")
    if mean is None:
        return "-"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"
