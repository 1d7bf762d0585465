"""The seed of a sweep's sampler: given, the space's, a random one, or the resumed study's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kdray.tune.options import SEED_LIMIT, SweepOptions
from kdray.tune.space import Space


@dataclass(frozen=True)
class SweepSeed:
    """The seed of a sweep's TPE sampler. ``value``: the sweep's, recorded on its Optuna study and
    its MLflow sweep run; ``source``: ``--seed``, ``space``, ``random`` or ``study`` (a resumed
    sweep keeps its study's); ``sampler``: what this session's sampler starts from."""

    value: int
    source: str
    sampler: int


def sweep_seed(options: SweepOptions, space: Space, storage, name: str, log: Callable[[str], None]) -> SweepSeed:
    """--seed, else the space's ``seed``, else a random one: two sweeps of one space explore
    differently unless told otherwise. A resumed sweep keeps the seed its study recorded."""
    import secrets

    from kdray.tune.search import recorded_seed, trial_count

    kept = recorded_seed(storage, name) if options.resume else None
    if kept is not None:
        if options.seed is not None and options.seed != kept:
            log(f"--seed {options.seed} ignored: the resumed sweep {name!r} keeps its seed {kept}")
        value, source = kept, "study"
    elif options.seed is not None:
        value, source = options.seed, "--seed"
    elif space.seed is not None:
        value, source = space.seed, "space"
    else:
        value, source = secrets.randbelow(SEED_LIMIT), "random"
    seed = SweepSeed(value, source, session_seed(value, trial_count(storage, name)))
    log(f"sampler seed {value} ({source}); `--seed {value}` repeats this sweep's proposals")
    return seed


def session_seed(seed: int, trials_before: int) -> int:
    """The seed of one session's sampler: the sweep's on its first session; on a resumed one, one
    derived from (seed, trials already in the study). Optuna's samplers draw from an RNG seeded
    once per sampler object (``LazyRandomState`` in optuna/samplers/_random.py and
    _tpe/sampler.py): the same seed in a new process would propose the first session's random
    start-up trials again."""
    if trials_before == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, trials_before]).generate_state(1)[0])
