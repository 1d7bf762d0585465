"""Search spaces as YAML, validated before any trial starts.

```yaml
name: quick                      # default study / experiment name
metric: val_acc                  # single objective ...
mode: max
objectives:                      # ... or several (Pareto front); overrides metric/mode
  - {metric: val_acc, mode: max}
  - {metric: params, mode: min}
base: {dataset: digits, method: ekd, epochs: 6}        # RunConfig keys held constant
teachers: {arch: [resnet20], count: 3, epochs: 20}     # trained once per sweep if missing
params:                                                # what the sweep varies
  temperature: {type: float, low: 1, high: 10, log: true}
  branches: {type: int, low: 1, high: 4}
  method: {type: categorical, choices: [kd, avg_kd]}
  lr: 0.05                                             # a constant
per_branch:                                            # conditional on `branches`
  branch_alpha: {type: float, low: 0, high: 1}         # one value per branch
scheduler: {grace_period: 2, reduction_factor: 2}      # ASHA on the epoch axis
samples: 8
seed: 7                          # the sampler's seed; omitted: a random one per sweep (or --seed)
time_budget: 2h                  # no trial starts after it (or --time-budget); omitted: none
at_budget: finish                # the running trials then finish (default) or stop (or --at-budget)
warm_start: [quick-1]            # start from earlier sweeps' trials that fit (or --warm-start)
warm_start_top: 2                # ... or run their best 2 configurations first (or --warm-start-top)
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kdray.core.errors import KdrayError
from kdray.core.shipped import resolve_space
from kdray.distill import HPARAMS, METHODS, get_method
from kdray.training.config import RunConfig, coerce, from_dict, is_key, load_yaml, unknown_key_error
from kdray.tune.budget import check_at_budget, parse_duration

TOP_KEYS = ("name", "description", "metric", "mode", "objectives", "base", "teachers", "params",
            "per_branch", "scheduler", "samples", "seed", "time_budget", "at_budget", "warm_start", "warm_start_top")
DIST_TYPES = ("float", "int", "categorical")
MODES = ("max", "min")


def per_branch_keys() -> list[str]:
    """Keys a ``per_branch`` block may name: the hyperparameters declared per branch."""
    return sorted(name for name, p in HPARAMS.items() if p.per_branch)


def branch_count(values: dict, base: RunConfig) -> int:
    """How many values each per-branch key has in a trial: its ``branches``, else the base's."""
    return int(values.get("branches", base.branches))


@dataclass
class Space:
    path: str
    name: str
    base: RunConfig
    params: dict
    per_branch: dict
    metrics: list  # [(metric, mode)]
    teachers: dict
    scheduler: dict
    samples: int
    seed: Optional[int] = None  # the TPE sampler's; None: each sweep draws one (kdray.tune.seeds.sweep_seed)
    time_budget: Optional[float] = None  # seconds (kdray.tune.budget); None: none
    at_budget: Optional[str] = None  # finish / stop; None: finish
    warm_start: tuple = ()  # earlier sweeps to start from (kdray.tune.warm_start)
    warm_start_top: Optional[int] = None  # run their best N configurations first instead

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    def methods(self) -> list[str]:
        """Every method a trial of this space may run."""
        m = self.params.get("method")
        if isinstance(m, dict):
            return sorted(set(m["choices"]))
        return [m if m is not None else self.base.method]

    def define_by_run(self) -> "Sampler":
        """An Optuna define-by-run function (picklable): samples every parameter, returns the constants."""
        return Sampler(self.params, self.per_branch, self.base)

    def trial_config(self, flat: dict) -> RunConfig:
        """The RunConfig of one trial from Tune's flat config (per-branch values gathered)."""
        values = {k: v for k, v in flat.items() if is_key(k)}
        for key in self.per_branch:
            values[key] = [flat[f"{key}_{b}"] for b in range(branch_count(values, self.base))]
        return from_dict({**self.base.to_dict(), **values}, self.path)

    def corner(self, pick: str) -> dict:
        """The values at one corner of the space ('low' or 'high'; categoricals' first or last choice)."""
        values = {}
        for k, s in self.params.items():
            if not isinstance(s, dict):
                values[k] = s
            elif s["type"] == "categorical":
                values[k] = s["choices"][0 if pick == "low" else -1]
            else:
                values[k] = s[pick]
        for k, s in self.per_branch.items():
            values[k] = [s.get(pick, s.get("choices", [0])[0])] * branch_count(values, self.base)
        return values

    def searched_params(self) -> list[str]:
        """The params the sweep varies, as its trials log them (one per branch for per-branch ones)."""
        names = [k for k, spec in self.params.items() if isinstance(spec, dict)]
        if self.per_branch:
            branches = self.params.get("branches", self.base.branches)
            most = int(branches["high"] if isinstance(branches, dict) and "high" in branches else
                       max(branches["choices"]) if isinstance(branches, dict) else branches)
            names += [f"{k}_{b}" for k in self.per_branch for b in range(most)]
        return names

    def max_total_epochs(self) -> int:
        """The longest epoch axis a trial can have (sequential methods train several generations):
        the scheduler's ``max_t``, so that no generation is cut short as if pruned."""
        high = {**self.base.to_dict(), **self.corner("high")}
        return max(get_method(m).total_epochs(from_dict({**high, "method": m}, self.path)) for m in self.methods())


class Sampler:
    def __init__(self, params: dict, per_branch: dict, base: RunConfig):
        self.params, self.per_branch, self.base = params, per_branch, base

    def __call__(self, trial) -> dict:
        constants, chosen = {}, {}
        for name, spec in self.params.items():
            if isinstance(spec, dict):
                chosen[name] = suggest(trial, name, spec)
            else:
                constants[name] = spec
        branches = branch_count({**constants, **chosen}, self.base)
        for key, spec in self.per_branch.items():
            for b in range(branches):
                suggest(trial, f"{key}_{b}", spec)
        return constants


def suggest(trial, name: str, spec: dict):
    kind = spec["type"]
    if kind == "float":
        return trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))
    if kind == "int":
        return trial.suggest_int(name, spec["low"], spec["high"], log=spec.get("log", False))
    return trial.suggest_categorical(name, spec["choices"])


def _check_dist(where: str, key: str, spec: Any, list_field: bool = False) -> Any:
    if not isinstance(spec, dict):
        if list_field:
            raise KdrayError(f"{where}: per_branch.{key} must be a distribution mapping")
        return coerce(key, spec, f"{where}: params")
    unknown = set(spec) - {"type", "low", "high", "log", "choices"}
    if unknown:
        raise KdrayError(f"{where}: params.{key}: unknown field(s) {sorted(unknown)}; "
                         "allowed: type, low, high, log, choices")
    kind = spec.get("type")
    if kind not in DIST_TYPES:
        raise KdrayError(f"{where}: params.{key}: type {kind!r} is not allowed; allowed: {', '.join(DIST_TYPES)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise KdrayError(f"{where}: params.{key}: categorical needs a non-empty 'choices' list")
        if not list_field:
            for c in choices:
                coerce(key, c, f"{where}: params.{key}")
        return {"type": kind, "choices": choices}
    for bound in ("low", "high"):
        if not isinstance(spec.get(bound), (int, float)) or isinstance(spec.get(bound), bool):
            raise KdrayError(f"{where}: params.{key}: '{bound}' must be a number, got {spec.get(bound)!r}")
    low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
    if low > high:
        raise KdrayError(f"{where}: params.{key}: low {low} > high {high}; need low <= high")
    if log and low <= 0:
        raise KdrayError(f"{where}: params.{key}: a log range needs low > 0, got {low}")
    if kind == "int":
        if int(low) != low or int(high) != high:
            raise KdrayError(f"{where}: params.{key}: int range bounds must be integers")
        low, high = int(low), int(high)
        if not list_field:
            coerce(key, low, f"{where}: params.{key}")
    else:
        low, high = float(low), float(high)
        if not list_field:
            coerce(key, low, f"{where}: params.{key}")
    return {"type": kind, "low": low, "high": high, "log": log}


def _objectives(raw: dict, where: str) -> list:
    """[(metric, mode)]: the ``objectives`` list, else ``metric`` / ``mode`` (val_acc, max)."""
    if "objectives" in raw:
        objs = raw["objectives"]
        if not isinstance(objs, list) or not objs:
            raise KdrayError(f"{where}: 'objectives' must be a non-empty list of {{metric, mode}}")
        metrics = []
        for o in objs:
            if not isinstance(o, dict) or "metric" not in o or o.get("mode") not in MODES:
                raise KdrayError(f"{where}: each objective needs 'metric' and 'mode' (max or min), got {o!r}")
            metrics.append((str(o["metric"]), o["mode"]))
    else:
        mode = raw.get("mode", "max")
        if mode not in MODES:
            raise KdrayError(f"{where}: mode {mode!r} is not allowed; allowed: max, min")
        metrics = [(str(raw.get("metric", "val_acc")), mode)]
    return metrics


def _params(raw: dict, where: str) -> tuple[dict, dict]:
    """The checked distributions (or constants) of ``params`` and ``per_branch``."""
    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, dict):
        raise KdrayError(f"{where}: 'params' must be a mapping of config keys to distributions")
    params = {}
    for key, spec in params_raw.items():
        if not is_key(str(key)):
            raise unknown_key_error(str(key), f"{where}: params")
        params[key] = _check_dist(where, key, spec)
    per_branch = {}
    for key, spec in (raw.get("per_branch") or {}).items():
        if key not in per_branch_keys():
            raise KdrayError(f"{where}: per_branch.{key} is not a per-branch key; "
                             f"allowed: {', '.join(per_branch_keys())}")
        per_branch[key] = _check_dist(where, key, spec, list_field=True)
    return params, per_branch


def load_space(path: str | Path) -> Space:
    """A search space from a YAML file, or a shipped space by name (``quick``; see ``kdray spaces``)."""
    path = resolve_space(path)
    where = str(path)
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise KdrayError(f"{where}: a search space must be a mapping with keys {', '.join(TOP_KEYS)}")
    for key in raw:
        if key not in TOP_KEYS:
            raise KdrayError(f"{where}: unknown top-level key {key!r}; allowed: {', '.join(TOP_KEYS)}")
    base_raw = raw.get("base") or {}
    if not isinstance(base_raw, dict):
        raise KdrayError(f"{where}: 'base' must be a mapping of config keys")
    for key in base_raw:
        if not is_key(str(key)):
            raise unknown_key_error(str(key), f"{where}: base")
    base = from_dict(base_raw, f"{where}: base")
    params, per_branch = _params(raw, where)
    metrics = _objectives(raw, where)
    sched = raw.get("scheduler") or {}
    if not isinstance(sched, dict) or set(sched) - {"grace_period", "reduction_factor"}:
        raise KdrayError(f"{where}: 'scheduler' allows only grace_period and reduction_factor")
    teachers = raw.get("teachers") or {}
    if not isinstance(teachers, dict) or set(teachers) - {"arch", "count", "epochs", "train_fraction"}:
        raise KdrayError(f"{where}: 'teachers' allows only arch, count, epochs, train_fraction")
    samples = raw.get("samples", 8)
    if not isinstance(samples, int) or samples < 1:
        raise KdrayError(f"{where}: samples must be an integer >= 1, got {samples!r}")
    space = Space(path=where, name=str(raw.get("name") or Path(path).stem), base=base, params=params,
                  per_branch=per_branch, metrics=metrics, teachers=teachers, scheduler=sched,
                  samples=samples, seed=_seed(raw, where),
                  time_budget=parse_duration(raw.get("time_budget"), f"{where}: time_budget"),
                  at_budget=raw.get("at_budget"), warm_start=_warm_sources(raw, where),
                  warm_start_top=_warm_top(raw, where))
    check_at_budget(space.at_budget, f"{where}: at_budget")
    _check_per_branch_readers(space)
    _check_extremes(space)
    return space


def _seed(raw: dict, where: str) -> Optional[int]:
    """The space's sampler seed, if it sets one (numpy's RandomState takes 0 .. 2**32 - 1)."""
    seed = raw.get("seed")
    if seed is None:
        return None
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise KdrayError(f"{where}: seed must be an integer in 0 .. {2**32 - 1}, got {seed!r}")
    return seed


def _warm_sources(raw: dict, where: str) -> tuple:
    """The space's ``warm_start``: one sweep name or a list of them."""
    value = raw.get("warm_start")
    names = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if value is None:
        return ()
    if not names or not all(isinstance(n, str) and n for n in names):
        raise KdrayError(f"{where}: warm_start must be a sweep name or a list of them, got {value!r}")
    return tuple(names)


def _warm_top(raw: dict, where: str) -> Optional[int]:
    top = raw.get("warm_start_top")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < 1):
        raise KdrayError(f"{where}: warm_start_top must be an integer >= 1, got {top!r}")
    return top


def _check_per_branch_readers(space: Space) -> None:
    """A per-branch key is searched only where a method of the space reads it (a ``ce`` sweep
    sampling three unused ``branch_alpha`` values would mislead TPE and the reader)."""
    for key in space.per_branch:
        readers = sorted(name for name, cls in METHODS.items() if any(p.name == key for p in cls.hparams))
        if not set(readers) & set(space.methods()):
            raise KdrayError(f"{space.path}: per_branch.{key} is read by no method of this space "
                             f"({', '.join(space.methods())}); methods that read it: {', '.join(readers)}")


def _check_extremes(space: Space) -> None:
    """Every corner of the space must be a valid RunConfig (catches e.g. branches 0..12)."""
    for pick in ("low", "high"):
        from_dict({**space.base.to_dict(), **space.corner(pick)}, f"{space.path}: params")
