"""The local Ray of `kdray tune` / `kdray train` (no --address): reachable from this machine only, and
gone within seconds of its driver's death, however the driver dies.

**Loopback only.** Ray 2.58 binds its listeners to the *node IP* or to every interface: GCS, raylet
and core workers (gRPC), the dashboard's gRPC server, the autoscaler monitor's metrics, the dashboard
agent (gRPC, metrics, and an HTTP server that takes job submissions, i.e. runs code, without
authentication) and the runtime-env agent. Each of them picks loopback when the node IP is a loopback
address: ``dashboard/agent.py`` (``get_localhost_ip() if is_localhost(self.ip) else
get_all_interfaces_ip()``), ``dashboard/http_server_agent.py`` (a second site on 127.0.0.1 only
``if not is_localhost(self.ip)``), ``dashboard/modules/reporter/reporter_agent.py``,
``dashboard/head.py`` and ``autoscaler/_private/monitor.py`` (``{"addr": get_localhost_ip()} if
is_localhost(...)``), ``_private/runtime_env/agent/main.py`` (binds ``--node-ip-address``); GCS,
raylet and workers bind the node IP they are given. But ``ray.init(_node_ip_address="127.0.0.1")``
alone does not do it: ``ray.init`` passes the value through ``services.resolve_ip_for_localhost``,
which replaces a loopback address by ``services.get_node_ip_address()``, the machine's routable
address, unless ``ray_constants.ENABLE_RAY_CLUSTER`` is false (Ray's default on macOS and Windows,
or ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` set before Ray is imported). :func:`start` therefore asks
for ``_node_ip_address=<loopback>`` with that flag false for the duration of ``ray.init`` only (it
is read at call time; later connections of the driver to other clusters are unaffected), then
checks that the node Ray started is on loopback and refuses to go on otherwise. One listener is not
Ray's: torch's rendezvous store, hosted by rank 0 of every Ray Train worker group, binds every
interface whatever the master address; :func:`torch_config` (the trainers' TorchConfig) moves it to
the master address. Joining a local Ray from another driver (``--address 127.0.0.1:PORT``) meets
the same loopback rewrite: :func:`connect`.

**Fate.** ``ray.init`` starts GCS, raylet, dashboard, monitor and log monitor with kernel
fate-sharing (``services.start_ray_process(fate_share=True)``: ``PR_SET_PDEATHSIG`` = SIGKILL on
Linux), so those die with the driver. What they started does not, at once: workers notice the lost
raylet within seconds, the dashboard's module processes within a few, but the dashboard agent and
the runtime-env agent, told of the raylet's death through their stdin pipe
(``_private/process_watcher.py``), first publish "raylet died unexpectedly" to the GCS with a 60 s
timeout (``utils.publish_error_to_driver``), and the GCS is dead: they stay up, still listening, for
about a minute. So :func:`start` starts a watchdog: a small detached process (stdlib only, see
:func:`main`) that waits for the driver, the GCS or the raylet to end, then ends every process of
the session: SIGTERM, SIGKILL a few seconds later. The session's processes are known two ways: what
``ray.init`` started and their descendants, recorded (pid and start time) at start and every few
seconds; and every process whose environment holds ``KDRAY_LOCAL_RAY_SESSION=<a random token>``,
set while ``ray.init`` starts GCS and raylet and inherited by all they start (but unreadable in the
agents, whose environment block setproctitle overwrites: hence the records). A Ray kdray did not
start (the user's own, another test's, a cluster given by --address) is neither recorded nor
marked, and a recycled pid is caught by its start time before any signal.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

MARK_VAR = "KDRAY_LOCAL_RAY_SESSION"  # carried by every process of a kdray-started local Ray
WATCHDOG_LOG = "kdray_watchdog.log"  # in the session's logs folder
TERM_GRACE_S = 3.0  # SIGTERM, then SIGKILL for what is left after this long
KILL_WAIT_S = 3.0
SESSION_END_GRACE_S = 2.0  # ray.shutdown() in a living driver: let Ray finish its own orderly stop
RECORD_EVERY_S = 5.0  # how often it records the processes the known ones started


def is_local(address: Optional[str]) -> bool:
    """Whether init_ray starts a Ray of its own for ``address`` (None/"" or "local")."""
    return not address or address == "local"


def loopback_ip() -> str:
    try:
        from ray._common.network_utils import get_localhost_ip

        return get_localhost_ip()  # "127.0.0.1", or "::1" where the machine has no IPv4
    except Exception:  # an older/newer Ray without the helper
        return "127.0.0.1"


def init_kwargs() -> dict:
    """ray.init arguments of a local Ray besides the dashboard's (init_ray sets those)."""
    return {"_node_ip_address": loopback_ip()}


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Let ``ray.init(_node_ip_address=<loopback>)`` keep the loopback address (see the module doc)."""
    import ray._private.ray_constants as ray_constants

    missing = object()
    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", missing)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if before is missing:
            del ray_constants.ENABLE_RAY_CLUSTER
        else:
            ray_constants.ENABLE_RAY_CLUSTER = before


@contextlib.contextmanager
def _marked(token: str) -> Iterator[None]:
    """``MARK_VAR=token`` in this process's environment while Ray starts its processes: they (and
    what they start: agents, workers, their children) inherit it; this process's later children
    (another Ray, a tool) do not."""
    before = os.environ.get(MARK_VAR)
    os.environ[MARK_VAR] = token
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(MARK_VAR, None)
        else:
            os.environ[MARK_VAR] = before


def start(init: Callable[[], object]) -> None:
    """Run ``init`` (a ray.init that starts a local Ray, with :func:`init_kwargs`) loopback-only and
    marked, check the result, and start the session's watchdog."""
    import ray

    from kdray.core.errors import KdrayError

    token = secrets.token_hex(12)
    with _loopback_node_ip(), _marked(token):
        init()
    node = ray._private.worker._global_node
    addresses = [getattr(node, "node_ip_address", None) or "?",
                 (getattr(node, "gcs_address", None) or "?:").rsplit(":", 1)[0]]
    off = [a for a in addresses if not is_loopback(a)]
    if off:
        ray.shutdown()
        raise KdrayError(f"the local Ray came up on {off[0]}, not on loopback: refusing to run it "
                         f"reachable from the network (its agents take jobs without authentication); "
                         f"this Ray version may need kdray/local_ray.py updated")
    try:
        start_watchdog(node, token)
    except Exception as exc:  # Ray still stops at a normal exit; a killed driver would leave agents
        print(f"kdray: warning: no watchdog for the local Ray ({exc}); if this process is killed, "
              f"its Ray agents may stay up for a minute", file=sys.stderr)


def connect(init: Callable[[], object], address: str) -> None:
    """Run ``init`` (a ray.init that connects to ``address``). A cluster on this machine's loopback
    (a kdray local Ray, ``--address 127.0.0.1:PORT``) needs Ray's loopback rewrite off here too:
    ``services.canonicalize_bootstrap_address`` would send the driver to the machine's routable
    address, where nothing listens (it waits for the GCS until it times out), and the driver's own
    node IP would match no raylet. Inside Ray's workers nothing is needed: there
    ``get_node_ip_address()`` is the node's (loopback) IP already."""
    host = address.rsplit(":", 1)[0] if "://" not in address and ":" in address else ""
    if host and is_loopback(host):
        with _loopback_node_ip():
            init()
    else:
        init()


# ------------------------------------------------------------------------------------------------
# torch's rendezvous store in Ray Train workers
# ------------------------------------------------------------------------------------------------
_served_stores: dict = {}  # port -> the TCPStore that holds the loopback server (keeps it alive)


def loopback_rendezvous_store() -> None:
    """In a Ray Train worker: make torch's rendezvous store listen on the master address itself
    when that is a loopback address (a local Ray), instead of on every interface.

    Ray Train's process-group set-up ends in ``torch.distributed.rendezvous._create_c10d_store``,
    whose rank 0 hosts a ``TCPStore`` server; torch binds that server to ``::``/``0.0.0.0``
    whatever the master address (TCPStoreLibUvBackend ``makeWithPort``; TCPStore takes no bind
    address). What it does take is ``master_listen_fd`` (a socket the caller bound) and
    ``multi_tenant`` (every TCPStore of a process on the same port shares one server; rendezvous
    asks for it). So rank 0 first opens the server on a socket bound to the master address; the
    rendezvous' own TCPStore then uses that server. Idempotent; a torch without the hook is left
    as it is (the listener test says so)."""
    import importlib
    import socket

    from torch.distributed import TCPStore

    # the module: the name `torch.distributed.rendezvous` is also a function of torch.distributed
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    create = getattr(rendezvous, "_create_c10d_store", None)
    if create is None or getattr(create, "_kdray_loopback", False):
        return

    def create_c10d_store(hostname, port, rank, world_size, timeout, *args, **kwargs):
        if rank == 0 and is_loopback(str(hostname)) and port not in _served_stores:
            use_libuv = kwargs.get("use_libuv", args[0] if args else True)
            family = socket.AF_INET6 if ":" in str(hostname).strip("[]") else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((str(hostname).strip("[]"), port))
                _served_stores[port] = TCPStore(str(hostname), port, world_size, True, timeout=timeout,
                                                wait_for_workers=False, multi_tenant=True,
                                                master_listen_fd=sock.fileno(), use_libuv=use_libuv)
                sock.detach()  # the server owns the descriptor now
            except Exception:
                sock.close()  # torch's own store then binds as it always did
        return create(hostname, port, rank, world_size, timeout, *args, **kwargs)

    create_c10d_store._kdray_loopback = True
    rendezvous._create_c10d_store = create_c10d_store


def torch_config(backend: str):
    """Ray Train's ``TorchConfig(backend=backend)`` whose workers run
    :func:`loopback_rendezvous_store` before the process group starts: on a local Ray (master
    address 127.0.0.1) the rendezvous store then listens on loopback only; elsewhere it changes
    nothing."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class _LoopbackStoreBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            worker_group.execute(loopback_rendezvous_store)
            super().on_start(worker_group, backend_config)

    class LoopbackStoreTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _LoopbackStoreBackend

    return LoopbackStoreTorchConfig(backend=backend)


# ------------------------------------------------------------------------------------------------
# watchdog (stdlib only below: it runs as `python -I -S kdray/local_ray.py watch ...`)
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


def _all_processes() -> Dict[int, Tuple[int, int]]:
    """pid -> (parent pid, start time) of every live process."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st:
                out[int(name)] = st
    return out


def _start_time(pid: int) -> Optional[int]:
    st = _stat(pid)
    return st[1] if st else None


def _pid_start(pid: int) -> Optional[str]:
    start = _start_time(pid)
    return f"{pid}:{start}" if start is not None else None


def start_watchdog(node, token: str) -> None:
    """A detached watchdog for this driver and ``node``; returns once it runs."""
    if not sys.platform.startswith("linux"):
        return  # it reads /proc; elsewhere Ray's own fate-sharing is all there is
    import ray._private.ray_constants as ray_constants

    def pids(*kinds):
        return [info.process.pid for kind, infos in node.all_processes.items()
                if not kinds or kind in kinds for info in infos]

    # it triggers when the driver, the GCS or the raylet ends; it ends those processes, every process
    # they started (found as they come: the agents carry no readable mark, setproctitle overwrites
    # the start of their environment) and every process carrying the mark
    targets = [_pid_start(p) for p in [os.getpid()] + pids(ray_constants.PROCESS_TYPE_GCS_SERVER,
                                                           ray_constants.PROCESS_TYPE_RAYLET)]
    members = [m for m in (_pid_start(p) for p in pids()) if m]
    if None in targets:
        raise RuntimeError("a Ray process ended before its watchdog started")
    log = os.path.join(node.get_logs_dir_path(), WATCHDOG_LOG)
    cmd = [sys.executable, "-I", "-S", os.path.abspath(__file__), "watch", "--token", token, "--log", log,
           *[a for t in targets for a in ("--target", t)], *[a for m in members for a in ("--member", m)]]
    # its own session: a signal to the driver's process group (Ctrl-C, `kill -- -PGID`) leaves it to
    # clean up; no inherited stdout, so a caller reading the driver's output to EOF never waits on it
    launcher = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    try:
        rc = launcher.wait(timeout=30)  # it forks the watchdog and leaves (no zombie child of ours)
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher.wait()
        raise RuntimeError("the watchdog did not start within 30 s") from None
    if rc != 0:
        raise RuntimeError(f"the watchdog could not start (exit {rc}; see {log})")


class _Session:
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
        procs = _all_processes()
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
                _signal(pid, start, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if all(_start_time(p) != s for p, s in procs.items()) and not self.processes():
                    return 0
                time.sleep(0.1)
        left = self.processes()
        if left:
            log(f"still running after SIGKILL: {' '.join(map(str, sorted(left)))}")
        return len(left)


def _signal(pid: int, start: int, sig: int) -> None:
    """Signal the process only if it still is the one found (its pid not recycled since)."""
    pidfd = None
    try:
        pidfd = os.pidfd_open(pid)  # from here on the pid names this process, recycled or not
    except (AttributeError, OSError):
        pass
    try:
        if _start_time(pid) != start:
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
    return next((i for i, (pid, start) in enumerate(targets) if _start_time(pid) != start), None)


def _wait_on_pidfds(fds: Dict[int, int], every_s: float) -> Optional[int]:
    """Up to ``every_s`` for one of the pidfds to turn readable (its index), or a short sleep
    where there are none."""
    import select

    if not fds:
        time.sleep(min(every_s, 0.5))
        return None
    ready, _, _ = select.select(list(fds), [], [], every_s)
    return fds[ready[0]] if ready else None


def _wait_for_first_exit(targets: List[Tuple[int, int]], every_s: float, tick: Callable[[], None]) -> int:
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


def _pairs(items: Optional[List[str]]) -> List[Tuple[int, int]]:
    return [(int(a), int(b)) for a, b in (t.split(":") for t in items or [])]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="kdray-local-ray-watchdog")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch", help="end a local Ray's processes when its driver (the first --target) "
                                     "or another --target ends")
    w.add_argument("--token", required=True, help=f"the session's {MARK_VAR}")
    w.add_argument("--target", action="append", required=True, help="PID:STARTTIME of a process to watch")
    w.add_argument("--member", action="append", help="PID:STARTTIME of a process of the session")
    w.add_argument("--log", help="append what it does to this file")
    args = p.parse_args(argv)
    targets = _pairs(args.target)

    def log(msg: str) -> None:
        if args.log:
            try:
                with open(args.log, "a") as f:
                    f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {msg}\n")
            except OSError:
                pass

    if not any(_start_time(pid) != start for pid, start in targets) and os.fork() > 0:
        os._exit(0)  # detach: the driver reaps the launcher at once, the watchdog lives on
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    session = _Session(args.token, dict(_pairs(args.member)), spare=(targets[0][0],))
    session.record()  # the raylet's agents: started before ray.init returned
    log(f"watching driver {targets[0][0]}, Ray {' '.join(str(t[0]) for t in targets[1:])}; "
        f"{len(session.members)} process(es) known")
    first = _wait_for_first_exit(targets, RECORD_EVERY_S, session.record)
    if first == 0:
        log(f"driver {targets[0][0]} ended")
    else:  # the session ended under a living driver (ray.shutdown, a crash): let Ray stop its own first
        log(f"Ray process {targets[first][0]} ended")
        deadline = time.monotonic() + SESSION_END_GRACE_S
        while time.monotonic() < deadline and _start_time(targets[0][0]) == targets[0][1]:
            time.sleep(0.1)
    left = session.sweep(log)
    log("done" if not left else f"done; {left} process(es) would not end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
