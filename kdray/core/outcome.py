"""The trial-outcome protocol, decided in one place.

Every metrics dict the engine reports carries ``epoch``, ``total_epochs`` and ``done``;
:func:`trial_state` turns the last one (and an error, if any) into completed / pruned / failed;
:func:`failure_reason` turns an exception, raised here or wrapped by Ray on its way back from a
worker, into one line, by the type of the innermost cause: never by searching error text.
"""

from __future__ import annotations

import errno
from typing import Iterator, Optional

from kdray.core.io import first_line

COMPLETED, PRUNED, FAILED = "completed", "pruned", "failed"
REASON_MAX = 400


def is_done(metrics: Optional[dict]) -> bool:
    """Whether the run behind ``metrics`` trained its last epoch (of its last generation).

    Read from the epoch counters, which only the engine writes: Ray Tune overwrites a result's
    ``done`` with True when its scheduler stops a trial early, so a Tune result's ``done`` cannot
    tell completed from pruned (the engine's own ``done`` says the same as the counters)."""
    if not metrics:
        return False
    return int(metrics.get("epoch", 0)) >= int(metrics.get("total_epochs", 1)) > 0


def trial_state(last_metrics: Optional[dict], error: Optional[BaseException] = None) -> str:
    """completed: trained to its last epoch; pruned: stopped early by the scheduler; failed: raised."""
    if error is not None:
        return FAILED
    return COMPLETED if is_done(last_metrics) else PRUNED


def _wrapped(exc: BaseException) -> list:
    """The exceptions Ray wraps around a worker's error, one level down. Ray 2.58 keeps the
    original exception object on its wrappers: ``RayTaskError.cause``, Train's
    ``WorkerGroupError.worker_failures`` (rank -> error), ``ControllerError.controller_failure``
    and ``UserExceptionWithTraceback._base_exc`` (private; the only handle on the worker's own
    exception object that Train keeps)."""
    inner = [getattr(exc, "cause", None), getattr(exc, "controller_failure", None),
             getattr(exc, "_base_exc", None), getattr(exc, "orig", None), exc.__cause__, exc.__context__]
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        inner.extend(failures[k] for k in sorted(failures))
    return [e for e in inner if isinstance(e, BaseException) and e is not exc]


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything wrapped inside it, outermost first (each at most once)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(_wrapped(e))


def _type_names(exc: BaseException) -> set:
    return {c.__name__ for c in type(exc).__mro__}


def root_cause(exc: BaseException) -> BaseException:
    """kdray's own error when one is inside (a KdrayError names what was wrong), else the innermost."""
    chain = list(causes(exc))
    own = [e for e in chain if "KdrayError" in _type_names(e)]
    return own[-1] if own else chain[-1]


def failure_reason(exc: BaseException) -> str:
    """One line: the innermost cause's type and the first line of its message."""
    cause = root_cause(exc)
    name = type(cause).__name__
    if name.startswith("RayTaskError(") and name.endswith(")"):  # Ray's subclass named after the cause
        name = name[len("RayTaskError("):-1]
    text = getattr(cause, "_error_message", None) or str(cause)
    message = first_line(text) if str(text).strip() else ""
    return (f"{name}: {message}" if message else name)[:REASON_MAX]


SQLITE_FULL = 13  # sqlite's result code for "database or disk is full"


def _sqlite_full(e: BaseException) -> bool:
    # sqlite says so in its result code (Python 3.11+) and its message, wrapped by SQLAlchemy and MLflow
    return getattr(e, "sqlite_errorcode", None) == SQLITE_FULL or "database or disk is full" in str(e)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or a cause) is a full disk: an OSError ENOSPC, or sqlite's SQLITE_FULL."""
    return any((isinstance(e, OSError) and e.errno == errno.ENOSPC) or _sqlite_full(e) for e in causes(exc))


def disk_full_line(exc: BaseException) -> Optional[str]:
    """One line naming the path that needed space, when ``exc`` (or a cause) is a full disk."""
    full = [e for e in causes(exc) if isinstance(e, OSError) and e.errno == errno.ENOSPC]
    if full:
        named = [e for e in full if e.filename]
        where = f" writing {named[0].filename}" if named else ""
        return (f"no space left on the device{where}; free space there (or point --workdir elsewhere) "
                "and run again with --resume")
    if any(_sqlite_full(e) for e in causes(exc)):
        return ("no space left on the device of a database (the MLflow or Optuna store in the working "
                "directory); free space there and run again with --resume")
    return None
