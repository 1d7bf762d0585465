"""TODO"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from kdray.core.errors import KdrayError

#: Optuna's samplers seed numpy's RandomState, which takes 0 .. 2**32 - 1
SEED_LIMIT = 2**32


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep runs (the CLI's flags), checked before anything starts."""

    samples: Optional[int] = None
    concurrency: int = 1
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    experiment: Optional[str] = None
    address: Optional[str] = None
    resume: bool = False
    optuna_storage: Optional[str] = None
    max_failures: int = 0
    teacher_store: bool = True  # teachers' outputs computed once and shared (--no-teacher-store: live)
    teacher_store_dir: Optional[str] = None  # default: the teacher set's stores/
    teacher_store_budget: float = 4.0  # GB of memory (and disk) a store may take
    seed: Optional[int] = None  # the sampler's seed (default: the space's `seed`, else a random one)

    def check(self) -> None:
        if self.samples is not None and self.samples < 1:
            raise KdrayError(f"--samples {self.samples} is out of range; allowed: >= 1")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise KdrayError(f"--seed {self.seed} is out of range; allowed: 0 .. {SEED_LIMIT - 1}")
        if self.concurrency < 1 or self.workers < 1 or self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise KdrayError("--concurrency and --workers must be >= 1, --gpus-per-worker >= 0, --cpus-per-worker > 0")
        if not self.teacher_store_budget > 0:
            raise KdrayError(f"--teacher-store-budget {self.teacher_store_budget:g} is out of range; allowed: > 0 (GB)")

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
            f"{cpus_per_worker:g} CPU{f' / {gpus_per_worker:g} GPU' if gpus_per_worker else ''} + the trial driver each); "
            f"running {hosted} at a time")
    return hosted
