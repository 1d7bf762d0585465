"""Ray for a driver: :func:`init_ray` connects to a cluster (``--address``) or starts the local Ray
of `kdray tune` / `kdray train`, which is reachable from this machine only and gone within
seconds of its driver's death, however the driver dies.

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
about a minute. So :func:`start` starts a watchdog (:mod:`kdray.distributed.watchdog`: stdlib only,
run by its file path), a small detached process that waits for the driver, the GCS or the raylet to
end, then ends every process of the session: SIGTERM, SIGKILL a few seconds later. The session's
processes are known two ways: what ``ray.init`` started and their descendants, recorded (pid and
start time) at start and every few seconds; and every process whose environment holds
``KDRAY_LOCAL_RAY_SESSION=<a random token>``, set while ``ray.init`` starts GCS and raylet and
inherited by all they start (but unreadable in the agents, whose environment block setproctitle
overwrites: hence the records). A Ray kdray did not start (the user's own, another test's, a cluster
given by --address) is neither recorded nor marked, and a recycled pid is caught by its start time
before any signal.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import subprocess
import sys
from typing import Callable, Iterator, Optional

from kdray.core.errors import KdrayError
from kdray.distributed import watchdog
from kdray.distributed.watchdog import MARK_VAR, process_id

WATCHDOG_LOG = "kdray_watchdog.log"  # in the session's logs folder


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
                         f"this Ray version may need kdray/distributed/local_ray.py updated")
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
# the watchdog (kdray/distributed/watchdog.py, run by its path)
# ------------------------------------------------------------------------------------------------
def start_watchdog(node, token: str) -> None:
    """Start the detached watchdog of this driver and ``node`` (see :mod:`kdray.distributed.watchdog`);
    returns once it runs."""
    if not sys.platform.startswith("linux"):
        return  # it reads /proc; elsewhere Ray's own fate-sharing is all there is
    import ray._private.ray_constants as ray_constants

    def pids(*kinds):
        return [info.process.pid for kind, infos in node.all_processes.items()
                if not kinds or kind in kinds for info in infos]

    # it triggers when the driver, the GCS or the raylet ends; it ends those processes, every process
    # they started (found as they come: the agents carry no readable mark, setproctitle overwrites
    # the start of their environment) and every process carrying the mark
    targets = [process_id(p) for p in [os.getpid()] + pids(ray_constants.PROCESS_TYPE_GCS_SERVER,
                                                           ray_constants.PROCESS_TYPE_RAYLET)]
    members = [m for m in (process_id(p) for p in pids()) if m]
    if None in targets:
        raise RuntimeError("a Ray process ended before its watchdog started")
    log = os.path.join(node.get_logs_dir_path(), WATCHDOG_LOG)
    cmd = [sys.executable, "-I", "-S", os.path.abspath(watchdog.__file__), "watch", "--token", token, "--log", log,
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_for_streaming(address: Optional[str] = None) -> None:
    """A process that streams data before any Ray runs (a one-worker run, a teacher import) starts
    kdray's Ray: local on loopback, or joins ``address``; not Ray Data's own ``ray.init()``."""
    from kdray.core.raystart import set_ray_starter

    set_ray_starter(lambda: init_ray(address))


def init_ray(address: Optional[str] = None, env: Optional[dict] = None, worker_logs: bool = True) -> None:
    """Start a local Ray or connect to ``address``. ``env``: environment variables for every Ray
    worker process of this job (trials, Train controllers, workers), set through the job's
    runtime_env: os.environ changed after Ray started reaches none of them. ``worker_logs``:
    whether Ray forwards its workers' output to this console (a sweep reports its trials itself;
    their output stays in Ray's session logs)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        # the dashboard stays on: Ray Train V2's PlacementGroupCleaner asks the state API (served by
        # the dashboard) whether a trial's TrainController died; without it, the CPUs of a trial that
        # ASHA stopped stay reserved and every later trial starves (WorkerGroupStartupTimeoutError)
        # ... and that state API must be named explicitly: left to find it, the cleaner scans for GCS
        # processes and fails ("Found multiple active Ray instances") whenever a second Ray runs on
        # the head's machine (another user's, a test's), with the same starvation as the result.
        # A local Ray is started by kdray.distributed.local_ray: every listener on loopback (the
        # dashboard agent takes jobs without authentication), every process ended soon after this
        # driver ends.
        from kdray.distributed.local_ray import connect, init_kwargs, is_local, start

        kwargs, env = {}, dict(env or {})
        local = is_local(address)
        if local:
            port = free_port()
            kwargs = {"dashboard_host": "127.0.0.1", "dashboard_port": port, **init_kwargs()}
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        elif "://" not in address and address != "auto":
            env["RAY_ADDRESS"] = address  # host:port of the GCS

        def init():
            ray.init(address=address or None, log_to_driver=worker_logs, logging_level="WARNING",
                     runtime_env={"env_vars": env} if env else None, **kwargs)

        if local:
            start(init)
        else:
            connect(init, address)
    except ConnectionError as exc:
        raise KdrayError(f"cannot reach the Ray cluster at {address!r} ({exc})") from None
