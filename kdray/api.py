"""kdray's Python API, for notebooks and scripts; the ``kdray`` command is a thin layer over it.

    import kdray

    run = kdray.train({"method": "ekd", "student": "resnet8", "teachers": "kdray-work/teachers/digits",
                       "epochs": 5})
    run.metrics["test_acc"], run.student, run.run_id

    sweep = kdray.sweep("quick", samples=4, concurrency=2)
    sweep.best, sweep.study.best_trial, sweep.result_grid

    student = kdray.load_student(run.student_path)      # or an MLflow run id

Every function logs progress lines to stderr (``log=`` takes any callable) and tracks to MLflow
as the command line does: ``sqlite:///WORKDIR/mlflow.db`` unless ``tracking_uri`` or
``$MLFLOW_TRACKING_URI`` says otherwise; ``track=False`` turns tracking off.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from kdray.core.console import to_stderr
from kdray.core.errors import KdrayError
from kdray.tracking.store import check_readable_store

DEFAULT_WORKDIR = "kdray-work"
Log = Callable[[str], None]


def resolve_workdir(workdir: str | Path | None = None) -> Path:
    """``workdir``, else ``$KDRAY_WORKDIR``, else ./kdray-work."""
    return Path(workdir or os.environ.get("KDRAY_WORKDIR") or DEFAULT_WORKDIR)


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass
class StudentResult:
    """A trained (or loaded) student. ``student`` is the images -> logits model in eval mode (EKD:
    the ensemble of its branches; ``branch(i)`` is one branch); it expects images preprocessed as
    ``record`` says (``image_size``, ``mean``, ``std``). ``record`` is the self-describing student
    file: architecture, classes, preprocessing, config and metrics."""

    student: Any
    record: dict
    student_path: Optional[str] = None
    run_id: Optional[str] = None
    tracking_uri: Optional[str] = None

    @property
    def metrics(self) -> dict:
        return dict(self.record.get("metrics") or {})

    @property
    def config(self):
        from kdray.training.config import from_dict

        return from_dict(self.record["config"], "student record")

    @property
    def classes(self) -> list:
        return list(self.record["classes"])

    def branch(self, index: int):
        """One branch of a multi-branch (EKD) student as an images -> logits model."""
        from kdray.models import export_module
        from kdray.training.student_file import rebuild_student

        return export_module(rebuild_student(self.record), branch=index).eval()

    @property
    def mlflow_run(self):
        """The MLflow run (``mlflow.entities.Run``), or None when the run was not tracked."""
        if not (self.run_id and self.tracking_uri):
            return None
        from kdray.tracking.store import client

        return client(self.tracking_uri).get_run(self.run_id)


@dataclass
class SweepResult:
    """A finished sweep: ``summary`` is what ``kdray tune --json`` prints (trials, best, timing);
    ``result_grid`` Tune's ResultGrid (None when nothing was left to run); ``study`` the Optuna study."""

    summary: dict
    result_grid: Any = None
    storage: Any = field(default=None, repr=False)
    tracking_uri: Optional[str] = None

    @property
    def experiment(self) -> str:
        return self.summary["experiment"]

    @property
    def trials(self) -> list:
        return self.summary["trials"]

    @property
    def best(self) -> Optional[dict]:
        """The best trial: ``config``, ``metrics``, ``student_path`` and ``mlflow_run_id``."""
        return self.summary.get("best")

    @property
    def study(self):
        import optuna

        return optuna.load_study(study_name=self.experiment, storage=self.storage)

    @property
    def mlflow_runs(self):
        """The sweep's MLflow runs as a pandas DataFrame (``mlflow.search_runs``), or None untracked."""
        if not self.tracking_uri:
            return None
        import mlflow

        from kdray.tracking.store import global_tracking_uri

        with global_tracking_uri(self.tracking_uri):
            return mlflow.search_runs(experiment_names=[self.experiment])


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
def make_config(config=None, **overrides):
    """A validated RunConfig from a RunConfig, a dict of config keys or a YAML file, plus overrides
    (None values ignored)."""
    from kdray.training.config import RunConfig, from_dict, load_config

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if config is None or isinstance(config, (str, Path)):
        return load_config(config, overrides)
    if isinstance(config, RunConfig):
        return from_dict({**config.to_dict(), **overrides}, "config") if overrides else config
    if isinstance(config, dict):
        return from_dict({**config, **overrides}, "config")
    raise KdrayError(f"config must be a RunConfig, a dict or a YAML path, got {type(config).__name__}")


def _run_folder(cfg, out, name: str, workdir: Path, resume: bool) -> Path:
    folder = Path(out) if out else workdir / "runs" / name
    if not resume and folder.is_dir() and any(folder.iterdir()):
        raise KdrayError(f"--out {folder} holds an earlier run; pass --resume to continue it, or choose another --out "
                         "(kdray never replaces a run folder)")
    return folder


def _store_choice(root: Optional[str], logits: str, topk: Optional[int]):
    """The teacher store a run reads (None: none), its encoding checked before anything is created."""
    from kdray.teachers.store_codec import LogitEncoding
    from kdray.teachers.store_fill import StoreChoice

    encoding = LogitEncoding(logits, topk)
    encoding.check()
    return StoreChoice(str(root), encoding) if root else None


def train(config=None, *, out: str | Path | None = None, name: Optional[str] = None, resume: bool = False,
          workdir: str | Path | None = None, track: bool = True, tracking_uri: Optional[str] = None,
          experiment: str = "kdray", teacher_store: Optional[str] = None, teacher_store_budget: float = 4.0,
          teacher_store_logits: str = "auto", teacher_store_topk: Optional[int] = None,
          address: Optional[str] = None, gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
          max_failures: int = 0, run_tags: Optional[dict] = None, log: Log = to_stderr,
          **overrides) -> StudentResult:
    """Train one student. ``config``: a RunConfig, a dict of config keys or a YAML file;
    ``overrides`` are config keys too (``epochs=5``). ``teacher_store``: a folder or "auto" to take
    the teachers' outputs from a teacher store, its logits kept as ``teacher_store_logits`` (auto,
    fp32, fp16, bf16 or topk with ``teacher_store_topk`` classes). ``run_tags``: more tags on its
    MLflow run. Returns the student, its metrics and MLflow run."""
    from kdray.core.console import library_output_to
    from kdray.core.io import undone_on_refusal
    from kdray.distill import get_method
    from kdray.distributed.local_ray import ray_for_streaming
    from kdray.distributed.raytrain import final_extras, fit_distributed
    from kdray.tracking.state import tracking_settings
    from kdray.training.run import run_training

    cfg = make_config(config, **overrides)
    store = _store_choice(teacher_store, teacher_store_logits, teacher_store_topk)
    ray_for_streaming(address)
    if get_method(cfg.method).min_teachers > 0 and not cfg.teachers:
        raise KdrayError(f"method {cfg.method!r} needs teachers: pass --teachers DIR (see `kdray teachers train`)")
    if max_failures < 0:
        raise KdrayError(f"--max-failures {max_failures} is out of range; allowed: >= 0")
    workdir = resolve_workdir(workdir)
    name = name or f"{cfg.method}-{cfg.student}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = _run_folder(cfg, out, name, workdir, resume)
    cfg = cfg.replace(resume=bool(resume), checkpoint_dir=str(folder / "checkpoints"))
    # refused before its first epoch (bad input found late), the run takes away all it created:
    # its log file, folder and MLflow run, and the working directory's folders it had to make
    with undone_on_refusal() as undo:
        # library log records (MLflow's store set-up, Ray's) go to the run's log file, made on the
        # first one; stdout stays: a multi-worker run's epoch lines come from its workers through it
        with library_output_to(undo.path(workdir / "logs" / f"{name}.log"), stdout=False):
            tracking = tracking_settings(track, tracking_uri, experiment, workdir)
            result = run_training(cfg, out=folder, run_name=name, tracking=tracking, log=log, address=address,
                                  gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                                  max_failures=max_failures, store_root=store,
                                  store_budget=teacher_store_budget, final_extras=final_extras,
                                  fit_distributed=fit_distributed, undo=undo, run_tags=run_tags)
    loaded = load_student(result["student_path"])
    loaded.record["metrics"] = {**loaded.record.get("metrics", {}),
                                **{k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}}
    loaded.run_id = result.get("run_id")
    loaded.tracking_uri = tracking.uri if tracking else None
    return loaded


def train_seeds(config=None, *, seeds, out: str | Path | None = None, name: Optional[str] = None,
                resume: bool = False, workdir: str | Path | None = None, track: bool = True,
                tracking_uri: Optional[str] = None, experiment: str = "kdray", group_tags: Optional[dict] = None,
                log: Log = to_stderr, **options):
    """Train one configuration once per seed (``seeds``: ``[0, 1, 2]`` or ``"0,1,2"``), one after
    another, each exactly as :func:`train` with that ``seed``, as one group: an MLflow parent run
    (kind ``seeds``) with one child per seed, run folders ``out/s<seed>`` (default
    WORKDIR/runs/NAME). ``options``: :func:`train`'s other keywords and config keys. ``resume``
    continues the group in ``out``: finished seeds are skipped. Returns a SeedGroupResult: ``runs``
    (each seed's StudentResult), ``run_id`` (the group's) and ``summary()`` (mean and std)."""
    import inspect

    from kdray.tracking.state import tracking_settings
    from kdray.training.seed_group import SeedGroupPlan, parse_seeds, run_seed_group

    seeds = parse_seeds(seeds)
    if "seed" in options:
        raise KdrayError("pass seeds=[...] or seed=N, not both: a seed group sets each run's seed")
    keywords = {k: v for k, v in options.items() if k in inspect.signature(train).parameters}
    cfg = make_config(config, **{k: v for k, v in options.items() if k not in keywords})
    workdir = resolve_workdir(workdir)
    name = name or f"{cfg.method}-{cfg.student}-seeds-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = Path(out) if out else workdir / "runs" / name
    plan = SeedGroupPlan(cfg, seeds, folder, name, bool(resume),
                         tracking_settings(track, tracking_uri, experiment, workdir), dict(group_tags or {}))

    def train_seed(seed_cfg, seed_out: Path, seed_name: str, seed_resume: bool, run_tags: dict) -> StudentResult:
        return train(seed_cfg, out=seed_out, name=seed_name, resume=seed_resume, workdir=workdir, track=track,
                     tracking_uri=tracking_uri, experiment=experiment, run_tags=run_tags, log=log, **keywords)

    return run_seed_group(plan, train_seed, load_student, log)


# --------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------
def space_file(space, workdir: Path) -> str:
    """A search space argument as a file: a path or a shipped name as given; a dict is written once
    (content-addressed, YAML) under WORKDIR/spaces so the sweep, its MLflow run and --resume can
    name it."""
    if not isinstance(space, dict):
        return str(space)
    import yaml

    from kdray.core.io import atomic_write

    text = yaml.safe_dump(space, sort_keys=False)
    name = str(space.get("name") or "space")
    folder = Path(workdir) / "spaces"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}.yaml"
    if not path.is_file():
        atomic_write(path, text)
    return str(path)


def sweep(space, *, workdir: str | Path | None = None, track: bool = True, tracking_uri: Optional[str] = None,
          log: Log = to_stderr, **options) -> SweepResult:
    """Run a sweep of ``space``: a YAML file, a shipped space's name (``"quick"``) or a dict with
    the same keys as a space file. ``options``: the fields of :class:`kdray.tune.options.SweepOptions`,
    one per ``kdray tune`` flag (``samples=8``, ``concurrency=2``, ``workers``, ``experiment``,
    ``resume=True``, ``seed``: the TPE sampler's, default the space's ``seed``, else a random one per
    sweep; a resumed sweep keeps its first seed; ``time_budget="2h"`` (or seconds) with
    ``at_budget="finish"`` / ``"stop"``: no trial starts after it, the summary's ``time_budget``
    says whether it ended the sweep; ...); an unknown one is an error naming them.
    Returns the trials, the best one, the Optuna study and Tune's result grid."""
    from kdray.tracking.state import tracking_settings
    from kdray.tune.options import SweepOptions
    from kdray.tune.run import run_sweep

    opts = SweepOptions.from_keywords(options, others=("workdir", "track", "tracking_uri", "log"))
    workdir = resolve_workdir(workdir)
    tracking = tracking_settings(track, tracking_uri, None, workdir)  # the experiment: the sweep's name
    done = run_sweep(space_file(space, workdir), workdir=workdir, options=opts, log=log, tracking=tracking)
    return SweepResult(summary=done.summary, result_grid=done.result_grid, storage=done.storage,
                       tracking_uri=tracking.uri if tracking else None)


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------
def load_student(source: str | Path, *, run_id: Optional[str] = None, tracking_uri: Optional[str] = None,
                 workdir: str | Path | None = None) -> StudentResult:
    """A trained student from a ``student.pt`` file or from an MLflow run id (its
    ``student/student.pt`` artifact, from ``tracking_uri`` or the workdir's store)."""
    from kdray.core.io import safe_load
    from kdray.models import export_module
    from kdray.training.student_file import rebuild_student

    path = Path(source).expanduser()
    if not path.is_file():
        if Path(str(source)).suffix or "/" in str(source):
            raise KdrayError(f"{source}: no such student file")
        from kdray.tracking.query import download_student
        from kdray.tracking.store import resolve_uri

        tracking_uri = resolve_uri(tracking_uri, resolve_workdir(workdir))
        check_readable_store(tracking_uri)
        run_id = str(source)
        path = download_student(tracking_uri, run_id)
    record = safe_load(path, "student")
    return StudentResult(student=export_module(rebuild_student(record)).eval(), record=record, student_path=str(path),
                         run_id=run_id, tracking_uri=tracking_uri)


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------
def compare(experiments=(), *, run_ids=(), tags: Optional[dict] = None, by=(), metric: str = "val_acc",
            mode: str = "max", baseline: Optional[str] = None, log_to_mlflow: bool = True,
            tracking_uri: Optional[str] = None, workdir: str | Path | None = None):
    """What `kdray compare` shows: the completed train and trial runs of ``experiments`` (a name or
    a list) or of ``run_ids`` (a sweep's or seed group's parent: its children) carrying every tag
    of ``tags``, grouped by configuration or by the ``by`` keys, with n, mean, sample std and
    per-seed values of ``metric`` per group and, with ``baseline``, each group's gap to it. Returns
    a :class:`kdray.tracking.comparison.Comparison` (``.groups``, ``.to_markdown()``, ``.to_csv()``,
    ``.to_json()``); unless ``log_to_mlflow`` is False it is also logged as a compare run
    (``.run_id``)."""
    from kdray.tracking.compare import RunFilter, compare_runs, log_comparison
    from kdray.tracking.store import resolve_uri

    uri = resolve_uri(tracking_uri, resolve_workdir(workdir))
    check_readable_store(uri)
    flt = RunFilter(experiments=_names(experiments), run_ids=_names(run_ids), tags=dict(tags or {}))
    by = tuple(k.strip() for k in by.split(",")) if isinstance(by, str) else tuple(by or ())
    result = compare_runs(uri, flt, metric=metric, mode=mode, by=by, baseline=baseline)
    if log_to_mlflow:
        log_comparison(uri, result, flt)
    return result


def _names(value) -> tuple:
    """One name or several as a tuple."""
    return (value,) if isinstance(value, str) else tuple(value or ())
