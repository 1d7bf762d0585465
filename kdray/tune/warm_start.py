"""Warm start: a new sweep's study begins with what earlier sweeps learned.

``--warm-start SWEEP`` (repeatable) gives the new study the finished trials of earlier sweeps in
the same Optuna storage whose parameters fit the new space, as its starting history: Optuna's own
``Study.add_trials`` (the library's documented way to hand a sampler earlier evaluations), each
trial rebuilt with the new space's distributions and marked with :data:`FROM_ATTR` =
``"SWEEP#NUMBER"``. kdray never counts such a trial as one of this sweep's (:func:`own_trials`):
not in its trial counts, its best, its plots nor ``--resume``'s count. ``--warm-start-top N``
instead queues the earlier best N configurations as the sweep's first trials (Optuna's
``enqueue_trial``, each marked :data:`TOP_ATTR`).

A trial fits when every parameter it searched lies in the new space (inside a searched range or
equal to the new constant), its method is one the new space runs, and it has a value for each
parameter the new space searches (a parameter its sweep held constant takes that constant, as its
study recorded it: :data:`CONSTANTS_ATTR`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from kdray.core.errors import KdrayError

#: on a history trial: the earlier trial it is ("SWEEP#NUMBER"); on a queued one: the trial it repeats
FROM_ATTR, TOP_ATTR = "warm_start_from", "warm_start_of"
#: on a study: where its history came from (sources and counts); the constants of its space
STUDY_ATTR, CONSTANTS_ATTR = "warm_start", "constants"
#: constants that change what a score means: a source differing in one is said, its values given as they are
MEANING_KEYS = ("dataset", "student", "epochs", "train_fraction", "image_size", "batch_size")
VERDICTS = {"outside": "outside this space's ranges or constants", "other_method": "of another method",
            "lacking": "lacking a parameter this space searches", "unfinished": "failed or unfinished"}


def is_history(trial) -> bool:
    """A trial an earlier sweep ran, given to this study as its starting history."""
    return FROM_ATTR in trial.user_attrs


def own_trials(study, states=None) -> list:
    """The study's trials that this sweep ran (not its warm-start history)."""
    return [t for t in study.get_trials(deepcopy=False, states=states) if not is_history(t)]


@dataclass
class SourceCount:
    """What one earlier sweep gave: trials given by state, and those left out by reason."""

    sweep: str
    given: dict = field(default_factory=dict)  # "completed" / "pruned" -> count
    left_out: dict = field(default_factory=dict)  # a VERDICTS key -> count
    differs: dict = field(default_factory=dict)  # a MEANING_KEYS key -> (its value, this space's)

    def line(self) -> str:
        given = sum(self.given.values())
        states = ", ".join(f"{n} {s}" for s, n in sorted(self.given.items()))
        out = f"{given} trial(s) of sweep {self.sweep!r}" + (f" ({states})" if given else "")
        if self.left_out:
            out += "; left out: " + ", ".join(f"{n} {VERDICTS[k]}" for k, n in sorted(self.left_out.items()))
        return out


@dataclass
class WarmStart:
    """The history (FrozenTrials) and queued configurations a new study starts with."""

    sources: tuple
    top: Optional[int]
    history: list = field(default_factory=list)
    queued: list = field(default_factory=list)  # (params, "SWEEP#NUMBER", value)
    counts: list = field(default_factory=list)  # SourceCount per source

    def record(self) -> dict:
        """Plain values for the study, the summary and the MLflow sweep run."""
        return {"sources": list(self.sources), "top": self.top, "history": len(self.history),
                "queued": [q[1] for q in self.queued],
                "per_source": {c.sweep: {"given": c.given, "left_out": c.left_out} for c in self.counts}}

    def lines(self) -> list[str]:
        if self.top:
            values = ", ".join(f"{q[1]} ({q[2]:.4f})" for q in self.queued)
            head = (f"warm start: the best {len(self.queued)} configuration(s) of {_names(self.sources)} "
                    f"queued as this sweep's first trials: {values or 'none fits'}")
        else:
            head = f"warm start: {len(self.history)} earlier trial(s) given to the study as its starting history"
        out = [head] + [f"  from {c.line()}" for c in self.counts]
        for c in self.counts:
            out += [f"  sweep {c.sweep!r} differs in {k} ({a} here {b}): its values are given as they are"
                    for k, (a, b) in c.differs.items()]
        return out


def _names(sources) -> str:
    return ", ".join(f"sweep {s!r}" for s in sources)


# ---------------------------------------------------------------------------------------------
# the plan: which earlier trials fit the new space
# ---------------------------------------------------------------------------------------------
def warm_start_for(options, space, storage, name: str, log: Callable[[str], None]) -> Optional[WarmStart]:
    """The warm start a new sweep asked for (its options, else its space's), or None: none asked,
    or the study exists already (a resumed sweep holds its history from its first session)."""
    import optuna

    sources = options.warm_sources or space.warm_start
    top = options.warm_start_top if options.warm_start_top is not None else space.warm_start_top
    if top is not None and not sources:
        raise KdrayError(f"--warm-start-top {top} needs --warm-start SWEEP (or the space's warm_start): the "
                         "sweeps whose best configurations run first")
    if not sources:
        return None
    if name in optuna.get_all_study_names(storage):
        log(f"warm start: sweep {name!r} holds its study already (resumed); its warm start was given when it began")
        return None
    return plan_warm_start(storage, name, space, sources, top, log)


def plan_warm_start(storage, name: str, space, sources, top: Optional[int],
                    log: Callable[[str], None]) -> Optional[WarmStart]:
    """The warm start of new sweep ``name`` from ``sources`` (earlier sweeps in ``storage``), or
    None without sources; logs what it gives and leaves out."""
    sources = tuple(dict.fromkeys(sources or ()))
    if not sources:
        return None
    if top is not None and (top < 1 or space.multi_objective):
        raise KdrayError(f"--warm-start-top {top} is not allowed here; allowed: an integer >= 1, on a "
                         "single-objective sweep")
    dists, warm = space_distributions(space), WarmStart(sources=sources, top=top)
    fitted = []
    for source in sources:
        study = _source_study(storage, name, source)
        _check_objectives(study, source, space)
        count, trials = _fit_source(study, source, space, dists)
        warm.counts.append(count)
        fitted += trials
    if top:
        warm.queued = _best_configurations(fitted, space.metrics[0][1], top)
    else:
        warm.history = fitted
    for line in warm.lines():
        log(line)
    return warm


def _source_study(storage, name: str, source: str):
    import optuna

    if source == name:
        raise KdrayError(f"--warm-start {source!r} names this sweep itself; --resume continues a sweep")
    try:
        return optuna.load_study(study_name=source, storage=storage)
    except KeyError:
        known = sorted(optuna.get_all_study_names(storage))
        raise KdrayError(f"--warm-start {source!r}: no sweep of that name in the Optuna storage; sweeps there: "
                         f"{', '.join(known) or 'none'}") from None


def _check_objectives(study, source: str, space) -> None:
    """An earlier sweep's values inform this one only when both optimise the same objectives."""
    wanted = [m for m, _ in space.metrics]
    directions = ["maximize" if d == "max" else "minimize" for _, d in space.metrics]
    theirs = [d.name.lower() for d in study.directions]
    names = study.metric_names or wanted  # a study from before kdray named its objectives
    if names != wanted or theirs != directions:
        raise KdrayError(f"--warm-start {source!r}: that sweep optimises {', '.join(names)} ({', '.join(theirs)}), "
                         f"this one {', '.join(wanted)} ({', '.join(directions)}); allowed: a sweep of the same "
                         "objectives")


def space_distributions(space) -> dict:
    """Every parameter the space can search, as the Optuna distribution its sampler suggests it
    from (:func:`kdray.tune.space.suggest`); per-branch ones up to the most branches."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    def dist(spec: dict):
        if spec["type"] == "float":
            return FloatDistribution(spec["low"], spec["high"], log=spec.get("log", False))
        if spec["type"] == "int":
            return IntDistribution(spec["low"], spec["high"], log=spec.get("log", False))
        return CategoricalDistribution(spec["choices"])

    out = {k: dist(s) for k, s in space.params.items() if isinstance(s, dict)}
    for name in space.searched_params():
        key = name.rsplit("_", 1)[0]
        if name not in out and key in space.per_branch:
            out[name] = dist(space.per_branch[key])
    return out


def _fit_source(study, source: str, space, dists: dict) -> tuple:
    """One earlier sweep's trials that fit the new space (FrozenTrials with its distributions), and
    the counts of what was given and left out."""
    import optuna

    TS = optuna.trial.TrialState
    constants = study.user_attrs.get(CONSTANTS_ATTR) or {}
    count = SourceCount(sweep=source, differs=_differences(constants, space))
    fitted = []
    for t in own_trials(study):
        if t.state not in (TS.COMPLETE, TS.PRUNED):
            verdict = "unfinished"
        else:
            verdict, params = fit_params(t.params, constants, space, dists)
        if verdict:
            count.left_out[verdict] = count.left_out.get(verdict, 0) + 1
            continue
        fitted.append(_history_trial(t, params, dists, f"{source}#{t.number}"))
        state = "completed" if t.state == TS.COMPLETE else "pruned"
        count.given[state] = count.given.get(state, 0) + 1
    return count, fitted


def space_constants(space) -> dict:
    """What the space holds constant: its base config and its constant params."""
    return {**space.base.to_dict(), **{k: v for k, v in space.params.items() if not isinstance(v, dict)}}


def _differences(constants: dict, space) -> dict:
    """Constants of the earlier sweep that change what its scores mean and differ here (and are
    not searched here)."""
    here, searched = space_constants(space), {k for k, s in space.params.items() if isinstance(s, dict)}
    return {k: (constants[k], here.get(k)) for k in MEANING_KEYS
            if k in constants and k not in searched and constants[k] != here.get(k)}


_MISSING = object()  # a key the new space neither searches nor holds constant (a branch beyond its most)


def fit_params(params: dict, constants: dict, space, dists: dict) -> tuple[Optional[str], dict]:
    """(None, the trial's parameters in the new space) when it fits; else (the VERDICTS key, {})."""
    here = space_constants(space)
    method = params.get("method", constants.get("method"))
    if method is not None and method not in space.methods():
        return "other_method", {}
    for key, value in params.items():
        inside = _contains(dists[key], value) if key in dists else _same(value, here.get(key, _MISSING))
        if not inside:
            return "outside", {}
    values = dict(params)
    for key in _required(space, {**constants, **params}):
        if key in values:
            continue
        if key not in constants:
            return "lacking", {}
        if not _contains(dists[key], constants[key]):
            return "outside", {}
        values[key] = constants[key]
    return None, values


def _required(space, values: dict) -> list:
    """The parameters a trial of the new space samples, given its values (per-branch ones up to its
    branch count)."""
    names = [k for k, s in space.params.items() if isinstance(s, dict)]
    constants = {k: v for k, v in space.params.items() if not isinstance(v, dict)}
    branches = int({**constants, **values}.get("branches", space.base.branches))  # as space.branch_count
    return names + [f"{key}_{b}" for key in space.per_branch for b in range(branches)]


def _contains(dist, value) -> bool:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    if isinstance(dist, IntDistribution) and int(value) != value:
        return False
    return dist.low <= value <= dist.high


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _history_trial(t, params: dict, dists: dict, origin: str):
    """Trial ``t`` as one of the new study's history: its values (a pruned one's epochs), the new
    space's distributions, marked with where it came from."""
    import optuna

    pruned = t.state == optuna.trial.TrialState.PRUNED
    return optuna.trial.create_trial(
        state=t.state, params={k: v for k, v in params.items() if k in dists},
        distributions={k: dists[k] for k in params if k in dists},
        values=None if pruned else t.values, intermediate_values=dict(t.intermediate_values),
        user_attrs={FROM_ATTR: origin, **({"epoch": t.user_attrs["epoch"]} if "epoch" in t.user_attrs else {})})


def _best_configurations(fitted: list, mode: str, top: int) -> list:
    """The best ``top`` completed configurations: (params, origin, value), best first."""
    done = [t for t in fitted if t.values]
    done.sort(key=lambda t: t.values[0], reverse=mode == "max")
    return [(dict(t.params), t.user_attrs[FROM_ATTR], t.values[0]) for t in done[:top]]


# ---------------------------------------------------------------------------------------------
# into the new study
# ---------------------------------------------------------------------------------------------
def apply_warm_start(study, warm: Optional[WarmStart]) -> None:
    """The history and queued trials into the new study (once: a study that holds trials already
    has them), and the record of where they came from."""
    if warm is None or study.get_trials(deepcopy=False):
        return
    study.add_trials(warm.history)
    for params, origin, _ in warm.queued:
        study.enqueue_trial(params, user_attrs={TOP_ATTR: origin})
    study.set_user_attr(STUDY_ATTR, warm.record())


# ---------------------------------------------------------------------------------------------
# this sweep's own view of a study that holds history
# ---------------------------------------------------------------------------------------------
def own_pareto_front(study) -> list:
    """``study.best_trials`` over this sweep's own completed trials (Optuna's counts the history)."""
    import optuna

    if not any(is_history(t) for t in study.get_trials(deepcopy=False)):
        return study.best_trials
    done = own_trials(study, states=(optuna.trial.TrialState.COMPLETE,))
    signs = [1 if d == optuna.study.StudyDirection.MAXIMIZE else -1 for d in study.directions]

    def dominates(a, b) -> bool:
        pairs = [(s * x, s * y) for s, x, y in zip(signs, a.values, b.values)]
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)

    return [t for t in done if not any(dominates(o, t) for o in done if o is not t)]


def own_study(study):
    """The study itself, or when it holds warm-start history an in-memory copy of this sweep's own
    finished trials (the plots drawn from it are this sweep's)."""
    import optuna

    if not any(is_history(t) for t in study.get_trials(deepcopy=False)):
        return study
    copy = optuna.create_study(directions=study.directions)
    TS = optuna.trial.TrialState
    copy.add_trials(own_trials(study, states=(TS.COMPLETE, TS.PRUNED, TS.FAIL)))
    return copy
