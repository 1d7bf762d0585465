"""Repeats of one configuration with different seeds, as one group: the seeds train one after
another in this process, each exactly as a run with that ``seed`` would (the caller hands in how:
:func:`kdray.api.train`), in run folders under the group's (``FOLDER/s<seed>``), tracked as MLflow
children of the group's parent run (:mod:`kdray.tracking.seed_groups`). The group's folder holds
``group.json`` (its run id, seeds and configuration) so that ``--resume`` continues the same group:
seeds whose run finished are skipped, the interrupted one resumes from its checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from kdray.core.errors import KdrayError
from kdray.core.guards import Interrupted
from kdray.core.io import Undo, atomic_write, first_line, undone_on_refusal
from kdray.tracking.comparison import mean_std
from kdray.tracking.seed_groups import GROUP_METRICS, seeds_text
from kdray.tracking.state import RunHandle, TrackingSettings
from kdray.tracking.tags import RUNTIME_KEYS

GROUP_FILE = "group.json"
GROUP_FORMAT = "kdray-seed-group/1"
SEEDS_ALLOWED = "a comma-separated list of distinct whole numbers >= 0, e.g. 0,1,2"

#: ``train_seed(cfg, out, name, resume, run_tags)``: one seed's run, a StudentResult
TrainSeed = Callable[[Any, Path, str, bool, dict], Any]
#: ``load_seed(student_path)``: the StudentResult of a seed an earlier attempt finished
LoadSeed = Callable[[Path], Any]


def parse_seeds(value) -> list[int]:
    """``"0,1,2"`` or a sequence of ints as a list of distinct seeds >= 0; anything else is one
    line naming what is allowed (exit 2)."""
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value or [])
    seeds = []
    for item in items:
        text = str(item)
        if isinstance(item, bool) or not text.lstrip("-").isdigit():
            raise KdrayError(f"--seeds {value!r}: {text!r} is not a whole number; allowed: {SEEDS_ALLOWED}")
        seeds.append(int(text))
    if not seeds:
        raise KdrayError(f"--seeds {value!r} names no seed; allowed: {SEEDS_ALLOWED}")
    if any(s < 0 for s in seeds):
        raise KdrayError(f"--seeds {value!r}: {min(seeds)} is negative; allowed: {SEEDS_ALLOWED}")
    if len(set(seeds)) != len(seeds):
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        raise KdrayError(f"--seeds {value!r} repeats {seeds_text(twice)}; allowed: {SEEDS_ALLOWED}")
    return seeds


def aggregate(rows: Sequence[dict]) -> dict:
    """``n`` and, per score every row has, its mean and sample standard deviation (ddof 1; none
    for one seed: one value has no spread)."""
    out: dict = {"n": len(rows)}
    for m in GROUP_METRICS:
        values = [r[m] for r in rows if r.get(m) is not None]
        if not values or len(values) != len(rows):
            continue
        out[f"{m}_mean"], std = mean_std(values)
        if std is not None:
            out[f"{m}_std"] = std
    return out


@dataclass
class SeedGroupResult:
    """A finished seed group: ``runs`` the StudentResult of each seed (in ``seeds`` order),
    ``run_id`` the MLflow parent run (None untracked), ``skipped`` the seeds an earlier attempt
    had finished (``--resume``)."""

    seeds: list
    name: str
    folder: str
    runs: list = field(default_factory=list)
    run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None
    skipped: list = field(default_factory=list)

    def rows(self) -> list:
        """One dict per seed: seed, run id, student path and its scores."""
        return [{"seed": seed, "run_id": run.run_id, "student_path": run.student_path,
                 **{m: run.metrics[m] for m in GROUP_METRICS if isinstance(run.metrics.get(m), (int, float))}}
                for seed, run in zip(self.seeds, self.runs)]

    def summary(self) -> dict:
        """The aggregates the group's run logs: ``n``, ``<metric>_mean`` and ``<metric>_std``."""
        return aggregate(self.rows())


def group_config(cfg) -> dict:
    """The configuration the seeds share: every key but ``seed`` and how runs are executed."""
    return {k: v for k, v in cfg.to_dict().items() if k != "seed" and k not in RUNTIME_KEYS}


# --------------------------------------------------------------------------------------------
# the group's folder
# --------------------------------------------------------------------------------------------
def read_group_file(folder: Path) -> Optional[dict]:
    path = folder / GROUP_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KdrayError(f"{path} is unreadable ({first_line(exc, 120)}); it names the seed group to resume")
    if not isinstance(data, dict) or data.get("format") != GROUP_FORMAT:
        raise KdrayError(f"{path} is not a kdray seed group file")
    return data


def check_folder(folder: Path, cfg, seeds: list, resume: bool) -> Optional[dict]:
    """The group an earlier attempt left in ``folder`` (``resume``), checked to be this one: same
    seeds, same configuration; a folder holding something else is refused, as for one run."""
    taken = folder.is_dir() and any(folder.iterdir())
    if not resume:
        if taken:
            raise KdrayError(f"--out {folder} holds an earlier run; pass --resume to continue it, or choose another "
                             "--out (kdray never replaces a run folder)")
        return None
    earlier = read_group_file(folder)
    if earlier is None:
        if taken:
            raise KdrayError(f"--resume: {folder} holds no seed group ({GROUP_FILE} is missing); a single run is "
                             "resumed without --seeds")
        return None
    if earlier["seeds"] != seeds:
        had = seeds_text(earlier["seeds"])
        raise KdrayError(f"--resume: seed group {earlier['name']!r} in {folder} has seeds {had}; pass --seeds {had} "
                         "to continue it")
    mine = json.loads(json.dumps(group_config(cfg), default=str))
    changed = sorted(k for k in set(mine) | set(earlier["config"]) if mine.get(k) != earlier["config"].get(k))
    if changed:
        raise KdrayError(f"--resume: seed group {earlier['name']!r} was started with other values of "
                         f"{', '.join(changed)}; pass the flags it was started with")
    return earlier


def write_group_file(folder: Path, name: str, seeds: list, cfg, run_id: Optional[str]) -> None:
    data = {"format": GROUP_FORMAT, "name": name, "run_id": run_id, "seeds": seeds, "config": group_config(cfg)}
    atomic_write(folder / GROUP_FILE, json.dumps(data, indent=1, default=str) + "\n")


# --------------------------------------------------------------------------------------------
# the group's run
# --------------------------------------------------------------------------------------------
@dataclass
class SeedGroupPlan:
    """What a group trains and where: the configuration (its ``seed`` replaced per seed), its seeds,
    folder and name, whether it continues an earlier attempt, where it is tracked (None: not) and
    more tags on its parent run (``kdray.retrain_of``)."""

    cfg: Any
    seeds: list
    folder: Path
    name: str
    resume: bool = False
    tracking: Optional[TrackingSettings] = None
    group_tags: dict = field(default_factory=dict)


def run_seed_group(plan: SeedGroupPlan, train_seed: TrainSeed, load_seed: LoadSeed, log) -> SeedGroupResult:
    """Train every seed of ``plan`` not finished yet, one after another; the group's run ends
    completed with the aggregates, or failed / interrupted with the reason (its children stay as
    they are). A refusal before any seed began takes the group away again, as one run's does."""
    earlier = check_folder(plan.folder, plan.cfg, plan.seeds, plan.resume)
    name = earlier["name"] if earlier else plan.name
    result = SeedGroupResult(seeds=list(plan.seeds), name=name, folder=str(plan.folder),
                             experiment=plan.tracking.experiment if plan.tracking else None,
                             tracking_uri=plan.tracking.uri if plan.tracking else None)
    with undone_on_refusal() as undo:
        with _library_log(plan, name, undo):
            group = _open_group(plan, name, earlier, undo, log)
        result.run_id = group.run_id if group else None
        try:
            for i, seed in enumerate(plan.seeds, 1):
                result.runs.append(_one_seed(plan, result, group, seed, f"{i}/{len(plan.seeds)}", undo,
                                             train_seed, load_seed, log))
                undo.began()  # a seed finished: the group is real, whatever happens next
        except Interrupted as exc:  # during a seed or between two: the group's run says so
            raise _interrupted(plan, result, group, exc) from None
    if group:
        from kdray.tracking.seed_groups import end_group

        with _library_log(plan, name, undo):
            end_group(group, "completed", result.rows(), result.summary())
    return result


def _library_log(plan: SeedGroupPlan, name: str, undo: Undo):
    """MLflow's own log records while the group's run is written (its store's set-up) go to the
    group's log file, as a run's do (WORKDIR/logs/NAME.log), not between kdray's lines."""
    import contextlib

    from kdray.core.console import library_output_to

    if not plan.tracking or not plan.tracking.workdir:
        return contextlib.nullcontext()
    return library_output_to(undo.path(Path(plan.tracking.workdir) / "logs" / f"{name}.log"), stdout=False)


def _open_group(plan: SeedGroupPlan, name: str, earlier: Optional[dict], undo: Undo, log) -> Optional[RunHandle]:
    """The group's folder, ``group.json`` and parent run: the earlier attempt's, running again,
    or new ones (noted on ``undo``)."""
    folder = undo.path(plan.folder)
    folder.mkdir(parents=True, exist_ok=True)
    group = None
    if plan.tracking:
        from kdray.tracking.runs import discard_run
        from kdray.tracking.seed_groups import reopen_group, start_group
        from kdray.training.config import tracked_config

        if earlier and earlier.get("run_id"):
            group = reopen_group(plan.tracking, earlier["run_id"])
            log(f"resume: seed group {name!r}, MLflow run {group.run_id}")
        else:
            params = {k: v for k, v in tracked_config(plan.cfg).items() if k != "seed"}
            group = start_group(plan.tracking, name=name, cfg=plan.cfg, params=params, seeds=plan.seeds,
                                folder=folder, tags=plan.group_tags)
            undo.call(lambda: discard_run(group.uri, group.run_id))
            log(f"tracking: seed group {name!r} is MLflow run {group.run_id} in experiment "
                f"{plan.tracking.experiment or 'kdray'!r}")
    if earlier:
        undo.began()  # an earlier attempt's group is never taken away
    if not (earlier and earlier.get("run_id") == (group.run_id if group else None)):
        write_group_file(folder, name, plan.seeds, plan.cfg, group.run_id if group else None)
    return group


def _one_seed(plan: SeedGroupPlan, result: SeedGroupResult, group: Optional[RunHandle], seed: int, where: str,
              undo: Undo, train_seed: TrainSeed, load_seed: LoadSeed, log):
    """One seed's StudentResult: the earlier attempt's when its run finished, else trained now."""
    from kdray.tracking.seed_groups import child_tags

    out, child = plan.folder / f"s{seed}", f"{result.name}-s{seed}"
    if plan.resume and (out / "student.pt").is_file():
        log(f"seed {where}: seed {seed} finished earlier ({out}); skipped")
        result.skipped.append(seed)
        return _finished_earlier(group, seed, out, load_seed)
    log(f"seed {where}: seed {seed} as run {child!r} in {out}")
    try:
        return train_seed(plan.cfg.replace(seed=seed), out, child, plan.resume and out.is_dir(),
                          child_tags(group.run_id, plan.group_tags) if group else {})
    except BaseException as exc:
        if out.is_dir():
            undo.began()  # the seed's run began and is recorded (failed, interrupted): so is the group
        if undo.refused(exc) or group is None or isinstance(exc, Interrupted):
            raise
        _end_unfinished(group, result, seed, exc)
        raise


def _interrupted(plan: SeedGroupPlan, result: SeedGroupResult, group: Optional[RunHandle], exc: Interrupted):
    """The group's run ended as interrupted (the seed in progress, or none between two seeds), and
    the one line saying how to go on."""
    seed = plan.seeds[len(result.runs)] if len(result.runs) < len(plan.seeds) else None
    if group is not None:
        _end_unfinished(group, result, seed, exc)
    where = f"during seed {seed}" if seed is not None else "after its last seed"
    return Interrupted(exc.signum, f"seed group {result.name!r} interrupted by {exc.signal_name} {where}; the same "
                       f"command with --resume (its folder: {plan.folder}) continues it: finished seeds are kept, "
                       "an interrupted one resumes from its last checkpoint")


def _finished_earlier(group: Optional[RunHandle], seed: int, out: Path, load_seed: LoadSeed):
    """A seed an earlier attempt finished, with its run's id and logged scores when tracked."""
    run = load_seed(out / "student.pt")
    if group is not None:
        from kdray.tracking.seed_groups import finished_children

        found = finished_children(group).get(seed)
        if found is not None:
            run.run_id, run.tracking_uri = found.info.run_id, group.uri
            run.record["metrics"] = {**run.record.get("metrics", {}), **found.data.metrics}
    return run


def _end_unfinished(group: RunHandle, result: SeedGroupResult, seed: Optional[int], exc: BaseException) -> None:
    """The group's run ended as its seed did: interrupted, or failed with the seed's reason."""
    from kdray.core.outcome import failure_reason
    from kdray.tracking.seed_groups import end_group

    if isinstance(exc, Interrupted):
        state, reason = "interrupted", (f"seed {seed}" if seed is not None else "after the last seed") + \
            f" interrupted by {exc.signal_name}"
    else:
        state, reason = "failed", f"seed {seed} failed: {failure_reason(exc)}"
    try:
        end_group(group, state, result.rows(), {}, reason)
    except Exception:  # noqa: BLE001 - the seed's own error is what the user must see; --resume reopens it
        pass
