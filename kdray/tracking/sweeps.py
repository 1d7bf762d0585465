"""A sweep's parent MLflow run: started with the sweep (space, base config, study, seed, the
experiment's trials view), closed at its end with the plots, the best trial and the counts."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from kdray.core.errors import KdrayError
from kdray.core.values import mask_credentials
from kdray.tracking.runs import (
    close_running_runs,
    dataset_input,
    find_trial_run,
    finish_run,
    log_batch,
    relative_path,
    run_tags,
    source_tags,
    versions,
)
from kdray.tracking.state import SweepTracking, TrackingSettings
from kdray.tracking.store import client, experiment_id, is_local_store, lost, scheme
from kdray.tracking.tags import (
    BEST_TAG,
    KIND_TAG,
    NOTE_TAG,
    STATE_TAG,
    STORE_TAG,
)
from kdray.tracking.view import save_trials_view, ui_hint, ui_path

Log = Callable[[str], None]


@dataclass(frozen=True)
class SweepRecord:
    """Where a finished sweep was tracked, its plots and its best trial's run (None: none)."""

    tracking_uri: str  # masked
    experiment_id: str
    parent_run_id: str
    plots: tuple = ()
    best_run_id: Optional[str] = None

    def summary(self) -> dict:
        """The sweep summary's ``mlflow`` entry."""
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id,
                "parent_run_id": self.parent_run_id, "plots": list(self.plots)}


# ---------------------------------------------------------------------------------------------
# the parent run
# ---------------------------------------------------------------------------------------------
def start_sweep_run(uri: str, exp_id: str, *, name: str, space_path: str, base: dict, metrics: Sequence,
                    samples: int, storage_url: str, teachers: Optional[str] = None,
                    teacher_archs: Optional[Sequence[str]] = None, workdir: Optional[Path] = None) -> str:
    """The parent run of sweep (and Optuna study) ``name``: the space file and the resolved base
    config (``base``, its values) as artifacts, ``metrics`` ([(metric, mode)]), versions, commit.
    Its params and metrics are the best trial's, logged when the sweep ends (:func:`summarize_sweep`).
    ``storage_url``: the Optuna study's; a sqlite file in ``workdir`` is tagged relative to it."""
    import yaml

    c = client(uri)
    storage_url = mask_credentials(storage_url)  # masked here too: a tag is readable by every user of the store
    if storage_url.startswith("sqlite:///"):
        storage_url = "sqlite:///" + relative_path(storage_url[len("sqlite:///"):], workdir)
    tags = {KIND_TAG: "sweep", STATE_TAG: "running", **source_tags("sweep"), "kdray.study_name": name,
            "kdray.optuna_storage": storage_url,
            "kdray.metric": ",".join(m for m, _ in metrics),
            "kdray.mode": ",".join(d for _, d in metrics), **versions(), **run_tags(base, teacher_archs)}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run_id = c.create_run(exp_id, run_name=f"sweep-{name}", tags=tags).info.run_id
    log_batch(c, run_id, params={"samples": samples, "study_name": name, "space": Path(space_path).name})
    c.log_inputs(run_id, datasets=[dataset_input(base)])
    c.log_artifact(run_id, str(space_path), "space")
    c.log_text(run_id, yaml.safe_dump(base, sort_keys=True), "config/base.yaml")
    if teachers and (Path(teachers) / "manifest.json").is_file():
        c.log_artifact(run_id, str(Path(teachers) / "manifest.json"), "teachers")
    return run_id


def check_reachable(uri: str, hosts: Sequence[str]) -> None:
    """A local store cannot take the trials of a cluster that spans several hosts."""
    hosts = sorted(set(hosts))
    if is_local_store(uri) and len(hosts) > 1:
        raise KdrayError(
            f"the MLflow store {uri} is a local file, but the Ray cluster spans {len(hosts)} hosts "
            f"({', '.join(hosts)}); trials on other hosts cannot write it: pass --tracking-uri http://HEAD:5000 "
            "(an `mlflow server`)"
        )


def start_sweep_tracking(settings: TrackingSettings, *, name: str, workdir: Path, hosts: Sequence[str],
                         space_path: str, base: dict, metrics: Sequence, samples: int, searched: Sequence[str],
                         storage_url: str, teachers: Optional[str], teacher_archs: Optional[Sequence[str]],
                         teacher_store: Optional[str], resume: bool, log: Log) -> SweepTracking:
    """The sweep's experiment (``name``; on ``resume`` the runs an earlier driver left running
    closed), its trials view (ranked by the first of ``metrics``, ``searched`` params as columns)
    and its parent run; ``hosts``: the cluster's, checked against a local store."""
    from kdray.core.guards import stores_initialising

    uri = settings.uri
    check_reachable(uri, hosts)
    with stores_initialising(workdir):
        exp_id = experiment_id(uri, name, workdir)
    if resume:  # runs an earlier driver left open (killed, interrupted, cut off from the server)
        closed = close_running_runs(uri, exp_id, "interrupted", "left running by an earlier driver of this sweep")
        if closed:
            log(f"resume: {closed} MLflow run(s) an earlier driver left running closed as interrupted")
    parent = start_sweep_run(uri, exp_id, name=name, space_path=space_path, base=base, metrics=metrics,
                             samples=samples, storage_url=storage_url, teachers=teachers,
                             teacher_archs=teacher_archs, workdir=workdir)
    if teacher_store:
        client(uri).set_tag(parent, STORE_TAG, teacher_store)
    metric, mode = metrics[0]
    save_trials_view(uri, exp_id, metric=metric, mode=mode, searched=searched)
    log(f"tracking: MLflow experiment {name!r} (id {exp_id}), sweep run {parent} at {mask_credentials(uri)}")
    return SweepTracking(uri=uri, experiment_id=exp_id, parent_run_id=parent,
                         teacher_archs=tuple(teacher_archs) if teacher_archs else None,
                         teacher_store=teacher_store, workdir=str(workdir))


def record_sweep_seed(track: SweepTracking, value: int, source: str, sampler: int) -> None:
    """The sampler's seed on the sweep's parent run (the study holds it as user attribute ``seed``)."""
    log_batch(client(track.uri), track.parent_run_id,
              params={"optuna_seed": value, "optuna_seed_source": source, "optuna_sampler_seed": sampler})


WARM_NOTE_TAG = "kdray.warm_start_note"  # the description's line naming and linking the sources


def warm_start_given(record: dict) -> str:
    """What a warm start gave its study (``record``: :meth:`kdray.tune.warm_start.WarmStart.record`)."""
    if record["top"]:
        return f"the best {len(record['queued'])} configuration(s) run first"
    return f"{record['history']} earlier trial(s) as its starting history"


def _source_links(c, source: str) -> tuple[str, list]:
    """A warm start's source as a description entry linking its sweep runs, and their ids."""
    exp = c.get_experiment_by_name(source)
    if exp is None:
        return f"`{source}` (not tracked in this store)", []
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'sweep'",
                         order_by=["attributes.start_time ASC"])
    links = ", ".join(f"[{r.info.run_name}](#/experiments/{exp.experiment_id}/runs/{r.info.run_id})" for r in runs)
    return f"`{source}` ({links or f'[its experiment]({ui_path(exp.experiment_id)})'})", [r.info.run_id for r in runs]


def record_warm_start(track: SweepTracking, record: dict) -> None:
    """Where the sweep's study started from (``record``: :meth:`kdray.tune.warm_start.WarmStart.record`)
    on its parent run: params, the sources' names and sweep runs as tags, a description line
    linking each source's sweep runs (sources tracked in this store)."""
    c = client(track.uri)
    links, run_ids = [], []
    for source in record["sources"]:
        link, ids = _source_links(c, source)
        links.append(link)
        run_ids += ids
    note = f"Warm-started from {', '.join(links)}: {warm_start_given(record)}."
    params = {"warm_start": ",".join(record["sources"]), "warm_start_history": record["history"]}
    if record["top"]:
        params["warm_start_top"] = record["top"]
    log_batch(c, track.parent_run_id, params=params,
              tags={"kdray.warm_start": ",".join(record["sources"]), "kdray.warm_start_runs": ",".join(run_ids),
                    WARM_NOTE_TAG: note})


def interrupt_sweep_runs(track: SweepTracking, signal_name: str) -> int:
    """After a stop signal: every run of the sweep's experiment still running, closed as interrupted."""
    return close_running_runs(track.uri, track.experiment_id, "interrupted", f"interrupted by {signal_name}")


# ---------------------------------------------------------------------------------------------
# the end of a sweep
# ---------------------------------------------------------------------------------------------
def trial_counts(study_counts: dict) -> str:
    """'3 completed, 1 pruned, 0 failed' from Optuna's counts by state."""
    names = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
    return ", ".join(f"{n} {names.get(s, s.lower())}" for s, n in study_counts.items()
                     if n or s in ("COMPLETE", "PRUNED"))


def summarize_sweep(uri: str, parent_run_id: str, *, best_run_id: Optional[str], metric: str, counts: str,
                    trial_hours: Optional[dict] = None) -> None:
    """The parent run at the end of a sweep: the best trial's metrics (latest values) and params,
    ``kdray.best_run_id``, ``trial_hours`` (``trial_hours_<state>``: hours by the state trials
    ended in) as its own metrics, and a description with the counts and a link to the best trial."""
    c = client(uri)
    parent = c.get_run(parent_run_id)
    exp_id = parent.info.experiment_id
    lines = [f"Sweep of `{parent.data.params.get('space', '?')}`: {counts}. "
             f"[All trials, ranked by {metric}]({ui_path(exp_id)})."]
    if WARM_NOTE_TAG in parent.data.tags:
        lines.append(parent.data.tags[WARM_NOTE_TAG])
    params, metrics, tags = {}, {}, {}
    if best_run_id:
        best = c.get_run(best_run_id)
        metrics = dict(best.data.metrics)
        params = {k: v for k, v in best.data.params.items() if k not in parent.data.params}
        tags[BEST_TAG] = best_run_id
        score = f"{metric} {metrics[metric]:.4f}" if metric in metrics else "no score"
        lines.append(f"Best trial: [{best.info.run_name}](#/experiments/{exp_id}/runs/{best_run_id}) ({score}); "
                     "its metrics and params are this run's.")
    if trial_hours:
        metrics.update(trial_hours)
        lines.append("Trial time by state: " + ", ".join(
            f"{v:.3f} h {k[len('trial_hours_'):]}" for k, v in trial_hours.items()) + ".")
    tags[NOTE_TAG] = "\n\n".join(lines)
    tags["kdray.trials"] = counts
    log_batch(c, parent_run_id, params=params, tags=tags, metrics=metrics)


def _summarize_parent(track: SweepTracking, metric: str, best_trial_id: Optional[str],
                      best_run_id: Optional[str], study_counts: dict,
                      trial_hours: Optional[dict] = None) -> Optional[str]:
    """The parent run carries the best trial's metrics, params and a link to it; counts by state
    go into its description. Returns the best trial's run id (found by its Tune trial id)."""
    if best_trial_id is not None and not best_run_id:
        run = find_trial_run(track.uri, track.experiment_id, track.parent_run_id, best_trial_id)
        if run is not None:
            best_run_id = run.info.run_id
    summarize_sweep(track.uri, track.parent_run_id, best_run_id=best_run_id, metric=metric,
                    counts=trial_counts(study_counts), trial_hours=trial_hours)
    return best_run_id


def finish_sweep_tracking(track: SweepTracking, *, study_name: str, storage, metrics: Sequence, state: str,
                          log: Log, reason: Optional[str] = None, best_trial_id: Optional[str] = None,
                          best_run_id: Optional[str] = None, study_counts: Optional[dict] = None,
                          trial_hours: Optional[dict] = None, study_view: Optional[Callable] = None) -> SweepRecord:
    """Close the parent run as ``state``: the study's plots, the best trial (``best_trial_id``:
    its Tune trial id; ``best_run_id`` when known), ``study_counts`` and ``trial_hours`` on it
    (``study_view``: the study the plots are drawn from, given the stored one). A tracking server
    lost on the way is one :class:`~kdray.tracking.store.TrackingLost` line (--resume closes the run)."""
    import optuna

    from kdray.tracking.plots import log_sweep_plots

    uri, parent = track.uri, track.parent_run_id
    plots: list = []
    try:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
            study = study_view(study) if study_view else study  # the sweep's own trials, not its warm start
            plots = log_sweep_plots(uri, parent, study, metrics, log=log)
            best_run_id = _summarize_parent(track, metrics[0][0], best_trial_id, best_run_id, study_counts or {},
                                            trial_hours)
            log(f"tracking: {ui_hint(uri, track.experiment_id)}")
        finally:
            finish_run(uri, parent, state, reason)
    except KdrayError:
        raise
    except Exception as exc:  # the server went away during the sweep: one line, --resume closes the run
        if scheme(uri) not in ("http", "https"):
            raise
        raise lost(uri, exc) from None
    return SweepRecord(tracking_uri=mask_credentials(uri), experiment_id=track.experiment_id,
                       parent_run_id=parent, plots=tuple(plots), best_run_id=best_run_id)


def git_commit(path: Optional[Path] = None) -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path or Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
