"""How a sweep runs: its options, each declared once (the API's keywords, the ``kdray tune`` flags
and their help come from :class:`SweepOptions`' fields), checked before anything starts; and the
concurrency a cluster can host."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Mapping, Optional

from kdray.core.errors import KdrayError
from kdray.teachers.store_codec import AUTO_EXACT_CLASSES, DEFAULT_TOPK, ENCODINGS, LogitEncoding
from kdray.tune.budget import check_at_budget, parse_duration

#: Optuna's samplers seed numpy's RandomState, which takes 0 .. 2**32 - 1
SEED_LIMIT = 2**32


def option(default, help: str, *, flag: Optional[str] = None, metavar: Optional[str] = None,
           choices: Optional[tuple] = None, repeatable: bool = False):
    """A sweep option: its default and the help of its ``kdray tune`` flag (``flag``: the flag when
    it is not ``--FIELD-NAME``; ``metavar``: the flag's value as the help names it; ``choices``: its
    allowed values; ``repeatable``: the flag may be given several times, its values a list). A bool
    option is a switch: ``--FLAG`` sets True when its default is False, False when it is True."""
    return field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar, "choices": choices,
                                            "repeatable": repeatable})


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep runs (the ``kdray tune`` flags, in their order), checked before anything starts."""

    samples: Optional[int] = option(None, "number of trials (default: the space's `samples`)")
    concurrency: int = option(1, "trials running at once (default 1)")
    workers: int = option(1, "DDP workers per trial (default 1: the trial trains in its own process; W > 1: "
                             "a Ray Train TorchTrainer)")
    gpus_per_worker: float = option(0.0, "GPUs per worker; fractions let small trials share a GPU (default 0)")
    cpus_per_worker: float = option(1.0, "CPUs per worker (default 1)")
    experiment: Optional[str] = option(None, "sweep / Optuna study / MLflow experiment name (default: the "
                                             "space's name)")
    address: Optional[str] = option(None, "Ray cluster address (default: start a local Ray)")
    resume: bool = option(False, "continue the sweep's Optuna study; interrupted trials run again")
    optuna_storage: Optional[str] = option(None, "Optuna storage URL (default sqlite:///WORKDIR/optuna.db)")
    max_failures: int = option(0, "worker failures a trial survives, resuming from its last checkpoint (default 0)")
    time_budget: Optional[str] = option(None, "wall-clock budget of the sweep's trials, counted from the Tuner's "
                                              "start: 90s, 30m, 2h, 1h30m or seconds; no trial starts after it "
                                              "(default: the space's `time_budget`, else none)", metavar="DURATION")
    at_budget: Optional[str] = option(None, "what the running trials do when the time budget is spent: finish "
                                            "(default; recorded as usual) or stop (recorded as interrupted, "
                                            "run again by --resume)", metavar="finish|stop")
    seed: Optional[int] = option(None, "seed of Optuna's sampler, to repeat a sweep's proposals (default: the "
                                       "space's `seed`, else a random one, printed and recorded in the study and "
                                       "the MLflow sweep run; --resume keeps the study's)")
    warm_start: Optional[tuple] = option(None, "start the study from the finished trials of an earlier sweep (its "
                                               "--experiment name, in the same Optuna storage) whose parameters "
                                               "fit this space: TPE begins informed; repeatable (default: the "
                                               "space's `warm_start`, else none)", metavar="SWEEP",
                                         repeatable=True)
    warm_start_top: Optional[int] = option(None, "with --warm-start: instead of giving the earlier trials as "
                                                 "history, run the earlier best N configurations that fit this "
                                                 "space as this sweep's first trials (default: the space's "
                                                 "`warm_start_top`)", metavar="N")
    teacher_store: bool = option(True, "run the teachers live in every trial instead of sharing their outputs "
                                       "from a teacher store", flag="--no-teacher-store")
    teacher_store_dir: Optional[str] = option(None, "where teacher stores live: a folder or a URI (default: the "
                                                    "teacher set's stores/)", flag="--teacher-store",
                                              metavar="DIR|URI")
    teacher_store_logits: str = option("auto", "how the teacher store keeps logits: fp32, fp16, bf16 (exact, cast) "
                                               "or topk (top-k + log-sum-exp, rebuilt); auto (default): exact in the "
                                               f"teachers' dtype up to {AUTO_EXACT_CLASSES} classes, else topk",
                                       choices=ENCODINGS)
    teacher_store_topk: Optional[int] = option(None, f"k of --teacher-store-logits topk (default {DEFAULT_TOPK})",
                                               metavar="K")
    teacher_store_budget: float = option(4.0, "memory / disk the sweep's teacher store may take (default 4); "
                                              "feature maps beyond it are computed online", metavar="GB")

    @classmethod
    def names(cls) -> tuple:
        """The options' names: the API's keywords, the parsed flags' destinations."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_keywords(cls, values: Mapping, others: Iterable[str] = ()) -> "SweepOptions":
        """The options from keywords named after the fields; an unknown one is a KdrayError naming
        the allowed keys (``others``: the caller's own keywords, named with them)."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise KdrayError(f"unknown sweep option{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}; allowed: {', '.join(cls.names() + tuple(others))}")
        return cls(**values)

    def check(self) -> None:
        if self.samples is not None and self.samples < 1:
            raise KdrayError(f"--samples {self.samples} is out of range; allowed: >= 1")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise KdrayError(f"--seed {self.seed} is out of range; allowed: 0 .. {SEED_LIMIT - 1}")
        if self.concurrency < 1 or self.workers < 1 or self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise KdrayError("--concurrency and --workers must be >= 1, --gpus-per-worker >= 0, --cpus-per-worker > 0")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        check_at_budget(self.at_budget)
        if self.warm_start_top is not None and self.warm_start_top < 1:
            raise KdrayError(f"--warm-start-top {self.warm_start_top} is out of range; allowed: >= 1")
        if not self.teacher_store_budget > 0:
            raise KdrayError(f"--teacher-store-budget {self.teacher_store_budget:g} is out of range; allowed: > 0 (GB)")
        self.store_encoding.check()

    @property
    def warm_sources(self) -> tuple:
        """The --warm-start sweeps (the API takes one name or several)."""
        if not self.warm_start:
            return ()
        return (self.warm_start,) if isinstance(self.warm_start, str) else tuple(self.warm_start)

    @property
    def store_encoding(self) -> LogitEncoding:
        """The teacher store's logit encoding these options ask for."""
        return LogitEncoding(self.teacher_store_logits, self.teacher_store_topk)

    @property
    def in_trial(self) -> bool:
        """A 1-worker trial trains in the trial's own process: no Train worker group to start."""
        return self.workers == 1

    @property
    def trial_resources(self) -> dict:
        if self.in_trial:
            from kdray.distributed.raytrain import worker_resources

            return worker_resources(self.cpus_per_worker, self.gpus_per_worker)
        from kdray.distributed.raytrain import DRIVER_RESOURCES

        return DRIVER_RESOURCES

    @property
    def local(self) -> bool:
        return not (self.address or os.environ.get("RAY_ADDRESS"))


def fit_concurrency(concurrency: int, workers: int, gpus_per_worker: float, cpus_per_worker: float,
                    log: Callable[[str], None], in_trial: bool = False) -> int:
    """How many trials the cluster can host at once, at most ``concurrency``.

    Tune only sees each trial's driver (DRIVER_RESOURCES: no CPU); the TorchTrainer a trial starts
    asks for its W workers later, in a placement group of its own that Tune does not count. A
    concurrency the nodes cannot host makes the surplus trials' workers wait for CPUs that are not
    there (WorkerGroupStartupTimeoutError after 60 s, retried for ever by Train's controller), so
    clamp it here, packing drivers and worker bundles onto the alive nodes the way Ray would. Counts
    the cluster as it is now: an autoscaling cluster gets the concurrency its current nodes allow."""
    import ray

    from kdray.distributed.raytrain import DRIVER_RESOURCES

    free = [{"CPU": float(n["Resources"].get("CPU", 0)), "GPU": float(n["Resources"].get("GPU", 0))}
            for n in ray.nodes() if n.get("Alive")]
    bundle = {"CPU": cpus_per_worker, "GPU": gpus_per_worker}
    driver = {"CPU": 0.0 if in_trial else float(DRIVER_RESOURCES.get("cpu", 0)), "GPU": 0.0}
    eps = 1e-9

    def place(need: dict) -> bool:
        fits = [f for f in free if all(f[k] + eps >= v for k, v in need.items())]
        if not fits:
            return False
        best = max(fits, key=lambda f: (f["CPU"] - need["CPU"], f["GPU"] - need["GPU"]))
        for k, v in need.items():
            best[k] -= v
        return True

    hosted = 0
    while hosted < concurrency and place(driver) and all(place(bundle) for _ in range(workers)):
        hosted += 1
    if hosted == 0:
        raise KdrayError(
            f"no node can host a worker of {cpus_per_worker:g} CPU / {gpus_per_worker:g} GPU next to a trial driver "
            f"({len(free)} node(s): " + ", ".join(f"{n['CPU']:g} CPU {n['GPU']:g} GPU" for n in free) + "); "
            "lower --cpus-per-worker/--gpus-per-worker/--workers"
        )
    if hosted < concurrency:
        log(f"concurrency: {concurrency} trial(s) at once do not fit this cluster ({workers} worker(s) x "
            f"{cpus_per_worker:g} CPU{f' / {gpus_per_worker:g} GPU' if gpus_per_worker else ''} "
            "+ the trial driver each); "
            f"running {hosted} at a time")
    return hosted
