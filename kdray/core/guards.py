"""What keeps a long run honest when something outside it happens: SIGINT / SIGTERM become one
exception that the run handles (recording what was interrupted) and the CLI turns into exit
130 / 143; and one sweep per experiment and working directory at a time."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

from kdray.core.errors import KdrayError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt, so that no ``except
    Exception`` on the way (Ray Tune's loop has one that would clean up as if trials ended) turns
    it into an ordinary failure. ``message`` says what was interrupted and how to resume."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(signum, message)
        self.signum = signum
        self.message = message or f"interrupted by {self.signal_name}"

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


_STOP = {"signum": None, "in_tune": False, "handler": None}


def stop_requested():
    """The stop signal received inside :func:`stop_signals_interrupt`, or None."""
    return _STOP["signum"]


def raise_if_stopped() -> None:
    """Raise :class:`Interrupted` for a stop signal whose own raise was lost: a signal handler's
    exception that lands inside a finalizer or a weakref callback (the garbage collector running
    them between two bytecodes) is printed by Python as "Exception ignored" and dropped, and the
    run would go on. Called where a run can stop (each training step); outside Tune's loop, which
    stops its trials itself (:func:`tune_stops_gracefully`)."""
    if _STOP["handler"] is not None and _STOP["signum"] is not None and not _STOP["in_tune"]:
        raise Interrupted(_STOP["signum"])


def _on_stop_signal(previous: dict):
    def handler(signum, frame):
        for s, h in previous.items():  # a second signal gets the previous handler: Ctrl-C twice ends it
            signal.signal(s, h)
        _STOP["signum"] = signum
        if _STOP["in_tune"]:
            # Inside Ray Tune's loop an exception raised here can surface inside Ray's Cython calls
            # as a SystemError; ask Tune to stop instead, by the signal its own handler takes
            # (SIGUSR1, always installed by tune.run), and raise once Tuner.fit has returned.
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        raise Interrupted(signum)

    return handler


@contextlib.contextmanager
def stop_signals_interrupt():
    """Inside, SIGINT and SIGTERM raise :class:`Interrupted` (within :func:`tune_stops_gracefully`,
    once Tune has stopped its trials). Ray Tune's own SIGINT handler is turned off
    (TUNE_DISABLE_SIGINT_HANDLER): it would end the sweep and return normally, as if every running
    trial had finished, and the interruption would be lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    tune_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    _STOP.update(signum=None, in_tune=False, handler=_on_stop_signal(previous))
    rearm_stop_signals()
    try:
        yield
    finally:
        _STOP["handler"] = None
        for s, h in previous.items():
            signal.signal(s, h)
        if tune_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_env


def rearm_stop_signals() -> None:
    """Install the stop handler again: ``ray.init`` installs Ray's own SIGTERM handler in the driver
    (the C++ core's failure-signal handler, which prints a stack and aborts with SIGABRT)."""
    if _STOP["handler"] is not None and _STOP["signum"] is None:
        for s in STOP_SIGNALS:
            signal.signal(s, _STOP["handler"])


@contextlib.contextmanager
def tune_stops_gracefully():
    """Around ``Tuner.fit``: a stop signal makes Tune stop its trials and return; then
    :class:`Interrupted` is raised here."""
    _STOP["in_tune"] = True
    try:
        yield
    finally:
        _STOP["in_tune"] = False
    if _STOP["signum"] is not None:
        raise Interrupted(_STOP["signum"])


@contextlib.contextmanager
def one_sweep_at_a_time(workdir: Path, name: str):
    """An exclusive lock on the sweep ``name`` in ``workdir`` while inside (released by the kernel
    however the driver dies); a second driver is refused with one line. Drivers in other working
    directories that share one Optuna storage are not seen: give them different --experiment names."""
    folder = Path(workdir) / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"sweep-{hashlib.sha256(name.encode()).hexdigest()[:16]}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise KdrayError(f"sweep {name!r} is running already from {Path(workdir).resolve()} ({holder}); "
                             "wait for it to end, or pass --experiment NEW_NAME to start another") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def stores_initialising(workdir: Path, timeout_s: float = 120.0):
    """While inside, no other kdray process of ``workdir`` creates its stores: two drivers that
    start together would both run the MLflow / Optuna sqlite schema migrations and one would die
    with ``UNIQUE constraint failed: alembic_version.version_num``. Waits for the other one."""
    folder = Path(workdir) / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "stores.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _lock_within(fd, timeout_s):
            raise KdrayError(f"another kdray process has been creating the stores in {workdir} for "
                             f"{timeout_s:.0f}s; is it stuck?")
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def held_exclusively(path: Path, waiting):
    """An exclusive flock on the file ``path`` while inside (released by the kernel however the
    process dies); when another process holds it, ``waiting()`` is called once and the lock waited
    for, however long (a stop signal still interrupts the wait)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _lock_within(fd: int, timeout_s: float) -> bool:
    """An exclusive flock on ``fd``, waiting at most ``timeout_s``; whether it was taken."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
