"""The local Ray of `kdray tune` / `kdray train`: every listener of every process of a local sweep is on
loopback, and after a SIGKILL of the driver no process of its Ray is left a few seconds later (Ray's
own dashboard and runtime-env agents alone would stay up, listening, for about a minute).

The watchdog itself is first tested without Ray, on plain processes: it ends what carries its
session's mark or descends from a recorded process, after SIGTERM is ignored too, and never a
process it was not given (another Ray's, a recycled pid), nor the driver.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kdray.core.errors import KdrayError
from kdray.distributed import local_ray, watchdog

ROOT = Path(__file__).resolve().parents[1]
WATCHDOG = [sys.executable, "-I", "-S", watchdog.__file__, "watch"]
SWEEP_BOUND_S = 20  # driver gone -> every process of its Ray gone (watchdog: ~3 s TERM + ~3 s KILL)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _mark_of(pid: int):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    prefix = f"{watchdog.MARK_VAR}=".encode()
    return next((e[len(prefix):].decode() for e in env if e.startswith(prefix)), None)


def _name(pid: int) -> str:
    """The process's command line with every path shortened to its last part (``python3 -u
    dashboard.py --host=...``): a checkout's deep path must not push the program's name out of the
    first 120 characters the messages keep."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    cmd = " ".join(a.rsplit("/", 1)[-1] if a.startswith("/") else a for a in argv).strip()
    return cmd[:120] or "?"


def session_processes(driver_pid: int) -> tuple:
    """(pid -> start time of the driver's descendants and of every process carrying the same
    session mark, the session tokens found)."""
    procs = watchdog.all_processes()
    found = {driver_pid: None}
    while True:
        more = {p for p, (ppid, _) in procs.items() if ppid in found and p not in found}
        if not more:
            break
        found.update(dict.fromkeys(more))
    del found[driver_pid]
    tokens = {t for t in map(_mark_of, found) if t}
    found.update({p: None for p in procs if p not in found and _mark_of(p) in tokens})
    return {p: procs[p][1] for p in found if p in procs}, tokens


def watchdogs_of(tokens) -> dict:
    out = {}
    for pid, (_, start) in watchdog.all_processes().items():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"watch" in argv and b"--token" in argv and argv[argv.index(b"--token") + 1].decode() in tokens:
            out[pid] = start
    return out


def alive(procs: dict) -> dict:
    return {p: s for p, s in procs.items() if watchdog.start_time(p) == s}


def wait_gone(procs: dict, timeout: float, also=lambda: {}) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {**alive(procs), **also()}
        if not left:
            return {}
        time.sleep(0.25)
    return {**alive(procs), **also()}


def kill_all(procs: dict) -> None:
    """Last-resort cleanup of what a failed test left: only the processes it recorded."""
    for pid, start in alive(procs).items():
        watchdog.signal_process(pid, start, signal.SIGKILL)


def read_line(proc, timeout: float, needle: str) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if needle in line:
                return line
    raise AssertionError(f"no {needle!r} from the driver within {timeout:.0f}s (exit {proc.poll()})")


def sleeper(env=None, ignore_term=False, child=False):
    """A Python process that sleeps (optionally ignoring SIGTERM, optionally with one child of
    its own, started without the mark) and prints its child's pid, or 0, once ready."""
    code = textwrap.dedent(f"""
        import os, signal, subprocess, sys, time
        if {ignore_term}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kid = 0
        if {child}:
            env = {{k: v for k, v in os.environ.items() if k != {watchdog.MARK_VAR!r}}}
            kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env).pid
        print(kid, flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    kid = int(p.stdout.readline())
    return p, kid


def target(pid: int) -> str:
    return f"{pid}:{watchdog.start_time(pid)}"


# ------------------------------------------------------------------------------------------------
# no Ray
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host, loop", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("192.0.2.2", False), ("10.0.0.1", False),
    ("", False), ("?", False),
])
def test_is_loopback(host, loop):
    assert local_ray.is_loopback(host) is loop


class _FakeProcess:
    def __init__(self, pid):
        self.pid = pid


class _FakeNode:
    def __init__(self, ip):
        self.node_ip_address, self.gcs_address = ip, f"{ip}:6379"
        self.all_processes = {}


def test_init_ray_local_is_loopback_marked_and_watched_address_is_not(monkeypatch):
    """What init_ray hands ray.init: a local Ray gets the loopback node IP with Ray's loopback
    rewrite off and the session mark set for the call only, then a watchdog; a given address gets
    neither; a local Ray that still came up off loopback is shut down with one error line."""
    import ray
    import ray._private.ray_constants as ray_constants

    from kdray.distributed.local_ray import init_ray

    seen, watched, shut = [], [], []

    def fake_init(**kw):
        seen.append((kw, ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(watchdog.MARK_VAR)))

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(watchdog.MARK_VAR, raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: shut.append(1))
    monkeypatch.setattr(local_ray, "start_watchdog", lambda node, token: watched.append((node, token)))
    cluster_flag = ray_constants.ENABLE_RAY_CLUSTER

    monkeypatch.setattr(ray._private.worker, "_global_node", _FakeNode("127.0.0.1"))
    init_ray(None)
    kw, flag, mark = seen[-1]
    assert kw["_node_ip_address"] == local_ray.loopback_ip() and kw["dashboard_host"] == "127.0.0.1"
    assert flag is False and mark and watched[-1][1] == mark
    assert ray_constants.ENABLE_RAY_CLUSTER == cluster_flag and watchdog.MARK_VAR not in os.environ

    init_ray("192.0.2.9:6379")
    kw, flag, mark = seen[-1]
    assert "_node_ip_address" not in kw and flag == cluster_flag and mark is None
    assert len(watched) == 1  # no watchdog for a cluster kdray did not start

    # a local Ray's own address (another driver joining it): loopback kept, still no watchdog
    init_ray("127.0.0.1:6379")
    kw, flag, mark = seen[-1]
    assert "_node_ip_address" not in kw and flag is False and mark is None and len(watched) == 1
    assert ray_constants.ENABLE_RAY_CLUSTER == cluster_flag

    monkeypatch.setattr(ray._private.worker, "_global_node", _FakeNode("192.0.2.2"))
    with pytest.raises(KdrayError, match="not on loopback"):
        init_ray(None)
    assert shut and len(watched) == 1


def test_watchdog_runs_as_a_bare_file_without_kdray(tmp_path):
    """start_watchdog runs watchdog.py by its path with ``-I -S``: no site-packages, no kdray on
    the path; it must import the standard library only."""
    import ast

    tree = ast.parse(Path(watchdog.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
    assert local_ray.MARK_VAR == watchdog.MARK_VAR
    out = subprocess.run(WATCHDOG + ["--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--target" in out.stdout, out.stderr


@linux_only
def test_watchdog_ends_its_session_when_the_driver_dies(tmp_path):
    """Driver SIGKILLed: the watchdog ends a marked process, one that ignores SIGTERM, a recorded
    member and the unmarked child that member started; a bystander (no mark, or a recorded pid
    whose start time no longer matches: a recycled pid) lives on."""
    token = "t" + os.urandom(6).hex()
    marked_env = dict(os.environ, **{watchdog.MARK_VAR: token})
    started = []
    try:
        driver, _ = sleeper()
        marked, _ = sleeper(env=marked_env)
        stubborn, _ = sleeper(env=marked_env, ignore_term=True)
        member, member_kid = sleeper(child=True)
        other_token, _ = sleeper(env=dict(os.environ, **{watchdog.MARK_VAR: token + "x"}))
        bystander, _ = sleeper()
        started = [driver, marked, stubborn, member, other_token, bystander]
        kid = {member_kid: watchdog.start_time(member_kid)}
        recycled = f"{bystander.pid}:{watchdog.start_time(bystander.pid) - 1}"
        log = tmp_path / "watchdog.log"
        rc = subprocess.run(WATCHDOG + ["--token", token, "--log", str(log), "--target", target(driver.pid),
                                        "--member", target(member.pid), "--member", recycled],
                            timeout=30).returncode
        assert rc == 0  # the launcher left; the watchdog runs on, detached
        time.sleep(0.5)
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + SWEEP_BOUND_S
        while time.monotonic() < deadline and (
                any(p.poll() is None for p in (marked, stubborn, member)) or alive(kid)):
            time.sleep(0.2)
        assert all(p.poll() is not None for p in (marked, stubborn, member)), log.read_text()
        assert not alive(kid), log.read_text()
        assert stubborn.returncode == -signal.SIGKILL and marked.returncode == -signal.SIGTERM
        assert other_token.poll() is None and bystander.poll() is None, log.read_text()
        assert "driver" in log.read_text() and "SIGKILL to 1 process" in log.read_text()
    finally:
        for p in started:
            p.kill()
            p.wait()
        kill_all(kid if started else {})


@linux_only
def test_watchdog_spares_a_living_driver_when_its_ray_stops(tmp_path):
    """A Ray process of the session (here: the second --target) ends under a living driver, as at
    ray.shutdown(): the watchdog ends the rest of the session, never the driver, even if the driver
    carried the mark, and leaves."""
    token = "t" + os.urandom(6).hex()
    marked_env = dict(os.environ, **{watchdog.MARK_VAR: token})
    started = []
    try:
        driver, _ = sleeper(env=marked_env)
        gcs, _ = sleeper(env=marked_env)
        agent, _ = sleeper(env=marked_env)
        started = [driver, gcs, agent]
        log = tmp_path / "watchdog.log"
        subprocess.run(WATCHDOG + ["--token", token, "--log", str(log), "--target", target(driver.pid),
                                   "--target", target(gcs.pid)], timeout=30, check=True)
        time.sleep(0.5)
        gcs.kill()
        gcs.wait()
        deadline = time.monotonic() + SWEEP_BOUND_S
        while time.monotonic() < deadline and (agent.poll() is None or "done" not in log.read_text()):
            time.sleep(0.2)
        assert agent.poll() is not None and "done" in log.read_text(), log.read_text()
        assert driver.poll() is None, log.read_text()
        assert not wait_gone(watchdogs_of({token}), 10), "the watchdog did not leave"
    finally:
        for p in started:
            p.kill()
            p.wait()


# ------------------------------------------------------------------------------------------------
# a real local Ray
# ------------------------------------------------------------------------------------------------
DRIVER = textwrap.dedent("""
    import subprocess
    import sys
    import time

    import ray

    from kdray.distributed.local_ray import init_ray

    init_ray(None)

    @ray.remote
    class Echo:
        def ping(self):
            return 1

    echo = Echo.remote()
    ray.get(echo.ping.remote())
    # a second driver joins through the loopback address (as `kdray tune --address` does)
    joined = subprocess.run([sys.executable, "-c", (
        "import ray; from kdray.distributed.local_ray import init_ray; init_ray(%r); "
        "print(ray.get(ray.remote(lambda: 7).remote()))") % ray.get_runtime_context().gcs_address],
        capture_output=True, text=True, timeout=180)
    print("READY", ray.get_runtime_context().gcs_address, joined.stdout.strip() or joined.stderr[-2000:],
          flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
@linux_only
def test_killed_driver_leaves_no_ray_process(tmp_path):
    """SIGKILL of a driver that started a local Ray (with an actor; a second driver joined it through
    its loopback address first): within SWEEP_BOUND_S none of its Ray's processes is left, the
    dashboard and runtime-env agents included (Ray alone leaves those up, listening, for about a
    minute), and the watchdog has gone too."""
    err = open(tmp_path / "driver.err", "w")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=err, text=True)
    procs, tokens = {}, set()
    try:
        ready = read_line(driver, 300, "READY").split(maxsplit=2)
        assert local_ray.is_loopback(ready[1].rsplit(":", 1)[0]), ready
        assert ready[2].strip() == "7", f"a second driver could not join at {ready[1]}: {ready[2]}"
        time.sleep(1)
        procs, tokens = session_processes(driver.pid)
        names = {p: _name(p) for p in procs}
        assert len(tokens) == 1, tokens
        watchdog = watchdogs_of(tokens)
        assert len(watchdog) == 1, "no watchdog runs for the local Ray"
        for needle in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::Echo"):
            assert any(needle in n for n in names.values()), (needle, sorted(names.values()))

        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
        left = wait_gone({**procs, **watchdog}, SWEEP_BOUND_S,
                         also=lambda: session_processes_by_token(tokens))
        assert not left, "left running %ds after the driver's SIGKILL: %s" % (
            SWEEP_BOUND_S, sorted(_name(p) or str(p) for p in left))
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(30)
        err.close()
        kill_all(procs)


def session_processes_by_token(tokens) -> dict:
    return {p: s for p, (_, s) in watchdog.all_processes().items() if _mark_of(p) in tokens}


TINY_SPACE = """name: ports
samples: 1
base: {dataset: fake, image_size: 16, student: resnet8, batch_size: 64, device: cpu, method: ce, epochs: 8}
params:
  lr: {type: float, low: 0.01, high: 0.1}
"""


@pytest.mark.slow
@linux_only
def test_local_sweep_listens_on_loopback_only(tmp_path):
    """Every listening socket of every process of a local `kdray tune` (driver, GCS, raylet,
    dashboard and its modules, agents, Tune and Train actors, the Train worker with torch's
    rendezvous store), sampled while the sweep runs, is on 127.0.0.1 / ::1; and once the sweep has
    ended, none of its processes is left."""
    import ray  # noqa: F401  (Ray vendors psutil)

    psutil = pytest.importorskip("psutil")
    space = tmp_path / "ports.yaml"
    space.write_text(TINY_SPACE)
    err = open(tmp_path / "tune.err", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kdray", "--workdir", str(tmp_path / "w"), "tune",
                             # 2 workers: a TorchTrainer, its workers and torch's rendezvous store
                             # (a 1-worker trial trains in Tune's trial process)
                             "--no-track", "--space", str(space), "--workers", "2"], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=err)
    listeners, seen, tokens = {}, {}, set()
    try:
        deadline = time.monotonic() + 420
        while proc.poll() is None and time.monotonic() < deadline:
            procs, found = session_processes(proc.pid)
            procs[proc.pid] = watchdog.start_time(proc.pid)
            tokens |= found
            seen.update({p: s for p, s in procs.items() if s is not None})
            try:
                conns = psutil.net_connections(kind="inet")
            except psutil.Error:
                conns = []
            for c in conns:
                if c.status == psutil.CONN_LISTEN and c.pid in procs:
                    listeners.setdefault((c.pid, c.laddr.ip, c.laddr.port), _name(c.pid))
            time.sleep(1.0)
        assert proc.poll() == 0, "the sweep failed or timed out: " + (tmp_path / "tune.err").read_text()[-3000:]
        owners = " ".join(listeners.values())
        for needle in ("gcs_server", "raylet", "dashboard", "ray::DashboardAgent", "ray::RayTrainWorker"):
            assert needle in owners, f"no listener of {needle} seen: the sample missed part of the sweep"
        off = sorted(f"{ip}:{port} ({name})" for (pid, ip, port), name in listeners.items()
                     if not local_ray.is_loopback(ip))
        assert not off, f"{len(off)} of {len(listeners)} listeners not on loopback: {off}"
        left = wait_gone(seen, SWEEP_BOUND_S, also=lambda: session_processes_by_token(tokens))
        assert not left, f"left running after the sweep ended: {sorted(_name(p) for p in left)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        err.close()
        kill_all(seen)
