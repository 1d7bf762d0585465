"""The watchdog of a local Ray: a small detached process that ends every process of one Ray session
once its driver, its GCS or its raylet has ended.

Standard library only, and it imports nothing of kdray: :func:`kdray.distributed.local_ray.start_watchdog`
runs this file by its path, ``python -I -S kdray/distributed/watchdog.py watch --token T --target
PID:START ... [--member PID:START ...] [--log FILE]``, so it starts fast and does not depend on the
driver's environment. The launcher forks the watchdog and exits at once.

The first ``--target`` is the driver, the others the GCS and the raylet: when one ends, the watchdog
ends the session (after a short grace when the driver lives on: ``ray.shutdown()`` stops Ray in
order). The session's processes are known two ways: the ``--member`` processes and their
descendants, recorded every few seconds while the driver lives (the agents' environment is
unreadable: setproctitle overwrites it); and every process whose environment holds
``MARK_VAR=<token>``. Each gets SIGTERM, then SIGKILL a few seconds later; the driver never. A
process is named by its pid *and* start time, so a recycled pid is never signalled.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

MARK_VAR = "KDRAY_LOCAL_RAY_SESSION"  # carried by every process of a kdray-started local Ray
TERM_GRACE_S = 3.0  # SIGTERM, then SIGKILL for what is left after this long
KILL_WAIT_S = 3.0
SESSION_END_GRACE_S = 2.0  # ray.shutdown() in a living driver: let Ray finish its own orderly stop
RECORD_EVERY_S = 5.0  # how often it records the processes the known ones started


# ------------------------------------------------------------------------------------------------
# processes, from /proc
# ------------------------------------------------------------------------------------------------
def _stat(pid: int) -> Optional[Tuple[int, int]]:
    """(parent pid, start time) of a live process; None when there is none or it has ended (a
    zombie). The start time (clock ticks after boot) with the pid names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) "; comm may hold anything
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[19])


def all_processes() -> Dict[int, Tuple[int, int]]:
    """pid -> (parent pid, start time) of every live process."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st:
                out[int(name)] = st
    return out


def start_time(pid: int) -> Optional[int]:
    """The live process's start time (clock ticks after boot), or None."""
    st = _stat(pid)
    return st[1] if st else None


def process_id(pid: int) -> Optional[str]:
    """``"PID:START"``, the form ``--target`` and ``--member`` take; None for no live process."""
    start = start_time(pid)
    return f"{pid}:{start}" if start is not None else None


def signal_process(pid: int, start: int, sig: int) -> None:
    """Signal the process only if it still is the one found (its pid not recycled since)."""
    pidfd = None
    try:
        pidfd = os.pidfd_open(pid)  # from here on the pid names this process, recycled or not
    except (AttributeError, OSError):
        pass
    try:
        if start_time(pid) != start:
            return
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    finally:
        if pidfd is not None:
            os.close(pidfd)


# ------------------------------------------------------------------------------------------------
# the session
# ------------------------------------------------------------------------------------------------
class Session:
    """The processes of one local Ray: ``members`` (pid -> start time: what ray.init started, what
    those started, recorded as they come) and whatever carries ``MARK_VAR=token``; never ``spare``."""

    def __init__(self, token: str, members: Dict[int, int], spare: Tuple[int, ...]):
        self.needle = f"{MARK_VAR}={token}".encode()
        self.members = dict(members)
        self.spare = {os.getpid(), *spare}

    def _marked(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return self.needle in f.read().split(b"\0")
        except OSError:  # gone, or not ours to read (another user's: never ours to end either)
            return False

    def processes(self, marks: bool = True) -> Dict[int, int]:
        """pid -> start time of every live process of the session (and their descendants)."""
        procs = all_processes()
        found = {p: s for p, s in self.members.items() if procs.get(p, (0, None))[1] == s}
        if marks:
            found.update({p: st[1] for p, st in procs.items() if p not in found and self._marked(p)})
        while True:  # and every descendant of those
            more = {p: st[1] for p, st in procs.items() if st[0] in found and p not in found}
            if not more:
                break
            found.update(more)
        for p in self.spare:
            found.pop(p, None)
        return found

    def record(self) -> None:
        """Remember the members' children as they are now (forget the members that ended)."""
        self.members = self.processes(marks=False)

    def sweep(self, log: Callable[[str], None]) -> int:
        """End every process of the session: SIGTERM, then SIGKILL for what is left after
        TERM_GRACE_S; bounded. Returns how many remain (0 normally)."""
        for sig, wait_s in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, KILL_WAIT_S)):
            procs = self.processes()
            if not procs:
                return 0
            log(f"{signal.Signals(sig).name} to {len(procs)} process(es): {' '.join(map(str, sorted(procs)))}")
            for pid, start in procs.items():
                signal_process(pid, start, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if all(start_time(p) != s for p, s in procs.items()) and not self.processes():
                    return 0
                time.sleep(0.1)
        left = self.processes()
        if left:
            log(f"still running after SIGKILL: {' '.join(map(str, sorted(left)))}")
        return len(left)


# ------------------------------------------------------------------------------------------------
# waiting for the first target to end
# ------------------------------------------------------------------------------------------------
def _pidfds(targets: List[Tuple[int, int]]) -> Dict[int, int]:
    """A pidfd per process (readable once it ends, zombie or reaped) -> its index; {} where the
    kernel has none (< 5.3): the caller polls then."""
    fds: Dict[int, int] = {}
    try:
        for i, (pid, _) in enumerate(targets):
            fds[os.pidfd_open(pid)] = i
    except (AttributeError, OSError):
        for f in fds:
            os.close(f)
        return {}
    return fds


def _first_ended(targets: List[Tuple[int, int]]) -> Optional[int]:
    """The index of a process that has ended (or whose pid now belongs to another), or None."""
    return next((i for i, (pid, start) in enumerate(targets) if start_time(pid) != start), None)


def _wait_on_pidfds(fds: Dict[int, int], every_s: float) -> Optional[int]:
    """Up to ``every_s`` for one of the pidfds to turn readable (its index), or a short sleep
    where there are none."""
    import select

    if not fds:
        time.sleep(min(every_s, 0.5))
        return None
    ready, _, _ = select.select(list(fds), [], [], every_s)
    return fds[ready[0]] if ready else None


def wait_for_first_exit(targets: List[Tuple[int, int]], every_s: float, tick: Callable[[], None]) -> int:
    """Block until one of the processes ends, calling ``tick`` about every ``every_s``; the index
    of the first one found ended."""
    fds = _pidfds(targets)
    try:
        while True:
            ended = _first_ended(targets)  # checked after the pidfds exist: none ends unseen
            if ended is None:
                ended = _wait_on_pidfds(fds, every_s)
            if ended is not None:
                return ended
            tick()
    finally:
        for f in fds:
            os.close(f)


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------
def _pairs(items: Optional[List[str]]) -> List[Tuple[int, int]]:
    return [(int(a), int(b)) for a, b in (t.split(":") for t in items or [])]


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kdray-local-ray-watchdog")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch", help="end a local Ray's processes when its driver (the first --target) "
                                     "or another --target ends")
    w.add_argument("--token", required=True, help=f"the session's {MARK_VAR}")
    w.add_argument("--target", action="append", required=True, help="PID:STARTTIME of a process to watch")
    w.add_argument("--member", action="append", help="PID:STARTTIME of a process of the session")
    w.add_argument("--log", help="append what it does to this file")
    return p.parse_args(argv)


def _file_logger(path: Optional[str]) -> Callable[[str], None]:
    """Append timestamped lines to ``path`` (nothing without one; a write error is ignored)."""

    def log(msg: str) -> None:
        if path:
            try:
                with open(path, "a") as f:
                    f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {msg}\n")
            except OSError:
                pass

    return log


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    targets = _pairs(args.target)
    log = _file_logger(args.log)
    if not any(start_time(pid) != start for pid, start in targets) and os.fork() > 0:
        os._exit(0)  # detach: the driver reaps the launcher at once, the watchdog lives on
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    session = Session(args.token, dict(_pairs(args.member)), spare=(targets[0][0],))
    session.record()  # the raylet's agents: started before ray.init returned
    log(f"watching driver {targets[0][0]}, Ray {' '.join(str(t[0]) for t in targets[1:])}; "
        f"{len(session.members)} process(es) known")
    first = wait_for_first_exit(targets, RECORD_EVERY_S, session.record)
    if first == 0:
        log(f"driver {targets[0][0]} ended")
    else:  # the session ended under a living driver (ray.shutdown, a crash): let Ray stop its own first
        log(f"Ray process {targets[first][0]} ended")
        deadline = time.monotonic() + SESSION_END_GRACE_S
        while time.monotonic() < deadline and start_time(targets[0][0]) == targets[0][1]:
            time.sleep(0.1)
    left = session.sweep(log)
    log("done" if not left else f"done; {left} process(es) would not end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
