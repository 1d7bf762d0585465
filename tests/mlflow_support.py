"""Test support for a real `mlflow server` on loopback and the MLflow UI in headless Chromium.

Everything here is real: a real `mlflow server` process tree (uvicorn) with a sqlite backend and
server-side artifact storage, and Debian's `chromium` rendering the real MLflow React UI. All
traffic stays on 127.0.0.1 (the server binds there; Chromium's resolver maps every other host to
an error and proxies are bypassed).

Helpers are generic so that a test can point them at any experiment:

    server = start_mlflow_server(tmp_path)          # or the `mlflow_server` fixture
    url = experiment_url(server.url, experiment_id)
    dom = dump_dom(url)                             # rendered DOM, for text assertions
    missing = missing_names(dom, ["parent", "child-0"])
    screenshot(url, "out.png")
    server.stop()                                   # kills the whole process group
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0

# Environment for the server: no job-execution runner (MLflow 3.x otherwise starts a huey
# consumer with ~8 worker processes of ~270 MB each and a temp dir under /dev/shm), and no proxy.
_SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_SERVER_JOB_ENABLE_PERIODIC_TASKS": "false",
    # no usage telemetry from the server (the UI's telemetry worker also goes through it):
    # traffic stays on loopback
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PYTHONUNBUFFERED": "1",
}


def _no_proxy_env(env: dict) -> dict:
    """Drop proxy settings so nothing is routed off the machine, and exempt loopback."""
    for k in list(env):
        if k.lower() in ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy"):
            env.pop(k)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET without any proxy (urllib would otherwise honour *_proxy variables)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        return r.status, r.read()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# /proc helpers (psutil is not installed in this venv)
# --------------------------------------------------------------------------------------------

def _proc_stat(pid: int) -> dict | None:
    """ppid, pgid, sid and start time (clock ticks) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces/parens: split after the last ')'
    rest = raw[raw.rindex(")") + 2:].split()
    # rest[0]=state, [1]=ppid, [2]=pgrp, [3]=session, ... [19]=starttime
    return {"pid": pid, "state": rest[0], "ppid": int(rest[1]), "pgid": int(rest[2]),
            "sid": int(rest[3]), "start": int(rest[19])}


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def session_processes(sid: int) -> list[dict]:
    """Live (non-zombie) processes whose session id or process group is `sid`."""
    out = []
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st and st["state"] != "Z" and (st["sid"] == sid or st["pgid"] == sid):
            out.append(st)
    return out


def descendants(pid: int) -> list[dict]:
    """All live descendants of pid (by ppid chain), pid itself included if alive."""
    stats = [s for s in (_proc_stat(p) for p in _all_pids()) if s]
    children: dict[int, list[dict]] = {}
    for s in stats:
        children.setdefault(s["ppid"], []).append(s)
    root = _proc_stat(pid)
    out = [root] if root and root["state"] != "Z" else []
    stack = [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            if c["state"] != "Z":
                out.append(c)
            stack.append(c["pid"])
    return out


def _mem_kb(pid: int, key: str) -> int:
    """A field (kB) from /proc/<pid>/smaps_rollup (Pss, Rss) or 0 if unavailable."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def _is_same_process(st: dict) -> bool:
    """True if the pid in `st` is still the same process (guards against pid reuse)."""
    now = _proc_stat(st["pid"])
    return bool(now and now["start"] == st["start"] and now["state"] != "Z")


# --------------------------------------------------------------------------------------------
# mlflow server
# --------------------------------------------------------------------------------------------

def mlflow_executable() -> str:
    """The `mlflow` console script of the running interpreter's environment."""
    exe = Path(sys.executable).parent / "mlflow"
    if not exe.exists():
        raise FileNotFoundError(f"no mlflow next to {sys.executable}")
    return str(exe)


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path
    root: Path
    start_seconds: float = 0.0
    _known: list = field(default_factory=list)  # every process seen in the tree (for stop())

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    def processes(self) -> list[dict]:
        """Live processes of the server: its session/process group plus any descendant."""
        seen = {s["pid"]: s for s in session_processes(self.pid)}
        for s in descendants(self.pid):
            seen.setdefault(s["pid"], s)
        for s in seen.values():
            if not any(k["pid"] == s["pid"] and k["start"] == s["start"] for k in self._known):
                self._known.append(s)
        return sorted(seen.values(), key=lambda s: s["pid"])

    def memory(self) -> dict:
        """Memory of the whole process tree: count, summed RSS and PSS in MB, per-process RSS."""
        procs = self.processes()
        rss = {p["pid"]: _mem_kb(p["pid"], "Rss") for p in procs}
        pss = sum(_mem_kb(p["pid"], "Pss") for p in procs)
        return {
            "processes": len(procs),
            "rss_mb": round(sum(rss.values()) / 1024, 1),
            "pss_mb": round(pss / 1024, 1),
            "per_process": [(p["pid"], round(rss[p["pid"]] / 1024, 1), _cmdline(p["pid"])[:120])
                            for p in procs],
        }

    def health(self, timeout: float = 2.0) -> bool:
        try:
            status, _body = _http_get(f"{self.url}/health", timeout=timeout)
            return status == 200
        except (urllib.error.URLError, OSError, ConnectionError):
            return False

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def leftovers(self) -> list[dict]:
        """Processes of this server still alive: same session/group, or a pid seen before."""
        alive = {s["pid"]: s for s in session_processes(self.pid)}
        for k in self._known:
            if _is_same_process(k):
                alive.setdefault(k["pid"], k)
        return list(alive.values())

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the whole process group, SIGKILL after `timeout`; assert nothing is left."""
        self.processes()  # remember every member before signalling
        pgid = self.pid  # started with start_new_session=True: pgid == sid == pid

        def _signal(sig):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            for k in self._known:  # anything that left the group
                if _is_same_process(k):
                    try:
                        os.kill(k["pid"], sig)
                    except ProcessLookupError:
                        pass

        _signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.proc.poll()  # reap our direct child
            if not self.leftovers():
                break
            time.sleep(0.2)
        else:
            _signal(signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.leftovers():
                self.proc.poll()
                time.sleep(0.1)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        left = self.leftovers()
        if left:
            raise RuntimeError("mlflow server processes survived stop(): "
                               + "; ".join(f"{p['pid']} {_cmdline(p['pid'])[:100]}" for p in left))


def start_mlflow_server(tmp_dir, *, timeout: float = START_TIMEOUT_S, workers: int = 1) -> Server:
    """Start a real `mlflow server` on 127.0.0.1:<free port> and wait until /health answers.

    Backend: sqlite:///<tmp_dir>/mlflow.db. Artifacts are served by the server
    (--serve-artifacts, stored under <tmp_dir>/artifacts), so clients upload over HTTP with
    `mlflow-artifacts:` URIs. One uvicorn worker, no job-execution runner. The server runs in
    its own session (process group == session == its pid); stop() kills the whole group.
    """
    root = Path(tmp_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "artifacts").mkdir(exist_ok=True)
    log = root / "mlflow-server.log"
    env = _no_proxy_env({**os.environ, **_SERVER_ENV})
    env.pop("MLFLOW_TRACKING_URI", None)

    last_err = ""
    for _attempt in range(3):  # a free port can be taken between probe and bind: retry
        port = free_port()
        cmd = [
            mlflow_executable(), "server",
            "--host", LOOPBACK, "--port", str(port),
            "--workers", str(workers),
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination", str(root / "artifacts"),
        ]
        t0 = time.monotonic()
        with open(log, "ab") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL,
                                    stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        server = Server(url=f"http://{LOOPBACK}:{port}", port=port, proc=proc, log=log, root=root)
        deadline = t0 + timeout
        try:
            while time.monotonic() < deadline:
                server.processes()  # track children as they appear
                if proc.poll() is not None:
                    break
                if server.health():
                    server.start_seconds = round(time.monotonic() - t0, 2)
                    server.processes()
                    return server
                time.sleep(0.25)
        except BaseException:
            server.stop()
            raise
        tail = server.log_text()[-3000:]
        server.stop()
        if proc.returncode is None or "address already in use" not in tail.lower():
            raise RuntimeError(
                f"mlflow server did not answer /health within {timeout:.0f}s "
                f"(exit code {proc.returncode}); log {log}:\n{tail}")
        last_err = tail
    raise RuntimeError(f"mlflow server could not bind a port after 3 tries:\n{last_err}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback for the module; always stopped afterwards."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop()


def experiment_url(server_url: str, experiment_id: str, *, flat: bool = True) -> str:
    """URL of an experiment's runs page in the MLflow 3.x UI (a React app with a hash router).

    The default view ("Sort: Created") nests child runs under a collapsed parent row, so only
    the parent's name is in the page. With `flat=True` the page is sorted by run name instead,
    which turns nesting off (the UI nests only when sorted by creation time and unfiltered):
    the parent and every child are listed as rows.
    """
    url = f"{server_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    if flat:
        url += "?orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"
    return url


# --------------------------------------------------------------------------------------------
# Chromium
# --------------------------------------------------------------------------------------------

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
APT_TIMEOUT_S = 900


# Debian's /usr/bin/chromium is a shell wrapper that adds flags from /etc/chromium.d
# (--enable-remote-extensions, --load-extension, GPU rasterization, Google API keys in the
# environment) and prints a shell error about `findmnt` here. The browser itself is
# /usr/lib/chromium/chromium: run that directly when it is there.
DEBIAN_CHROMIUM_BINARY = "/usr/lib/chromium/chromium"


def find_chromium() -> str | None:
    if os.access(DEBIAN_CHROMIUM_BINARY, os.X_OK):
        return DEBIAN_CHROMIUM_BINARY
    for name in CHROMIUM_NAMES:
        p = shutil.which(name)
        if p:
            return p
    return None


def ensure_chromium() -> str:
    """Path of a chromium binary; installs Debian's `chromium` with apt-get when missing.

    Calls pytest.skip with the exact reason when it is missing and cannot be installed.
    """
    found = find_chromium()
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and apt-get needs root (not root here)")
    if not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and there is no apt-get on this machine")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [
        ["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"],
        ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y",
         "--no-install-recommends", "chromium"],
    ]
    for cmd in steps:
        try:
            r = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=APT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.skip(f"chromium is not installed and `{' '.join(cmd)}` "
                        f"timed out after {APT_TIMEOUT_S}s")
        if r.returncode != 0:
            tail = (r.stdout + r.stderr).strip()[-800:]
            pytest.skip(f"chromium is not installed and `{' '.join(cmd)}` failed "
                        f"(exit {r.returncode}): {tail}")
    found = find_chromium()
    if not found:
        pytest.skip("apt-get install chromium succeeded but no chromium binary is on PATH")
    return found


def _chromium_cmd(chromium: str, profile: str, size, budget_ms: int) -> list[str]:
    w, h = size
    return [
        chromium,
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--no-first-run", "--no-default-browser-check",
        "--hide-scrollbars", "--mute-audio", "--disable-extensions", "--disable-sync",
        "--disable-component-update", "--disable-default-apps", "--disable-breakpad",
        "--disable-features=Translate,MediaRouter,OptimizationHints,AutofillServerCommunication",
        "--metrics-recording-only", "--password-store=basic", "--use-mock-keychain",
        # only loopback: no proxy, and every host name except 127.0.0.1 fails to resolve
        "--no-proxy-server",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}",
        f"--window-size={w},{h}",
        f"--virtual-time-budget={budget_ms}",
    ]


def _run_chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run chromium in its own session; on timeout kill its whole process group."""
    env = _no_proxy_env(dict(os.environ))
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise RuntimeError(f"chromium timed out after {timeout}s: {err[-2000:]!r}")
    finally:
        try:  # helpers (zygote, gpu, renderer) share its process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10  # bounded: wait until its whole session is gone
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = session_processes(proc.pid)
        if left:
            raise RuntimeError("chromium processes survived: "
                               + "; ".join(f"{q['pid']} {_cmdline(q['pid'])[:80]}" for q in left))
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


# Virtual-time budget: the run table of a small experiment is rendered after ~5 s of virtual
# time (measured: 8 s wall on 2 busy cores); wait_for_names() retries with larger budgets.
DEFAULT_WAIT_MS = 10000
# The run table is an ag-grid that renders only the rows in view: dump the DOM from a tall
# window so that a sweep's runs are all in the DOM (about 30 px per row).
DOM_SIZE = (1400, 3000)


def screenshot(url: str, png_path, *, wait_ms: int = DEFAULT_WAIT_MS, size=(1400, 900),
               timeout: float = 120.0, chromium: str | None = None) -> str:
    """Headless Chromium renders `url` (virtual time budget `wait_ms`) and writes a PNG."""
    if not url.startswith(f"http://{LOOPBACK}"):
        raise ValueError(f"only loopback URLs are allowed here: {url}")
    chromium = chromium or ensure_chromium()
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    if png.exists():
        png.unlink()
    with tempfile.TemporaryDirectory(prefix="kdray-chromium-") as profile:
        args = _chromium_cmd(chromium, profile, size, wait_ms) + [f"--screenshot={png}", url]
        r = _run_chromium(args, timeout)
    if not png.exists() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {r.returncode}): "
                           f"{r.stderr.decode(errors='replace')[-2000:]}")
    return str(png)


def dump_dom(url: str, *, wait_ms: int = DEFAULT_WAIT_MS, size=DOM_SIZE,
             timeout: float = 120.0, chromium: str | None = None) -> str:
    """The DOM of `url` after rendering in headless Chromium (`--dump-dom`)."""
    if not url.startswith(f"http://{LOOPBACK}"):
        raise ValueError(f"only loopback URLs are allowed here: {url}")
    chromium = chromium or ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="kdray-chromium-") as profile:
        args = _chromium_cmd(chromium, profile, size, wait_ms) + ["--dump-dom", url]
        r = _run_chromium(args, timeout)
    dom = r.stdout.decode(errors="replace")
    if r.returncode != 0 and not dom:
        raise RuntimeError(f"chromium --dump-dom failed (exit {r.returncode}): "
                           f"{r.stderr.decode(errors='replace')[-2000:]}")
    return dom


def missing_names(dom: str, names) -> list[str]:
    """Which of `names` do not appear in the rendered DOM (HTML-escaped forms accepted)."""
    import html

    return [n for n in names if n not in dom and html.escape(n) not in dom]


def wait_for_names(url: str, names, *, budgets_ms=(10000, 30000, 60000), **kw) -> str:
    """dump_dom with growing virtual-time budgets until every name is listed; returns the DOM.

    Bounded: at most len(budgets_ms) Chromium runs. The caller asserts on missing_names().
    """
    dom = ""
    for b in budgets_ms:
        dom = dump_dom(url, wait_ms=b, **kw)
        if not missing_names(dom, names):
            break
    return dom


def check_experiment_page(server_url: str, experiment_id: str, names, png_path, *,
                          size=(1400, 900)) -> dict:
    """Open the experiment's runs page in headless Chromium, keep a screenshot, report.

    Returns {"url", "dom", "missing" (names not listed), "png", "png_stats"}; the caller
    asserts (e.g. `assert not r["missing"]`). Generic: any experiment id, any run names.
    """
    chromium = ensure_chromium()
    url = experiment_url(server_url, experiment_id, flat=True)
    dom, wait_ms = "", DEFAULT_WAIT_MS
    for wait_ms in (10000, 30000, 60000):  # bounded: at most three DOM renders
        dom = dump_dom(url, wait_ms=wait_ms, chromium=chromium)
        if not missing_names(dom, names):
            break
    # the screenshot gets the budget that rendered every name in the DOM
    png = screenshot(url, png_path, size=size, wait_ms=wait_ms, chromium=chromium)
    return {"url": url, "dom": dom, "missing": missing_names(dom, names), "png": png,
            "wait_ms": wait_ms, "png_stats": png_stats(png)}


def artifacts_dir() -> Path:
    """Where tests keep screenshots: $KDRAY_TEST_ARTIFACTS, else /tmp/kdray-shots (never the
    checkout or the cwd)."""
    d = Path(os.environ.get("KDRAY_TEST_ARTIFACTS") or Path(tempfile.gettempdir()) / "kdray-shots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def grid_rows(dom: str, words) -> dict:
    """The runs table as rendered: row index -> which of ``words`` its cells show (as a whole cell
    text). The table is an ag-grid: a row is split over its pinned and scrolling containers, each
    part carrying ``row-index``; only the columns in the window are rendered (dump a wide one)."""
    import html
    import re

    marks = [(m.start(), int(m.group(1))) for m in re.finditer(r'row-index="(\d+)"', dom)]
    rows: dict = {}
    for (start, index), (end, _) in zip(marks, marks[1:] + [(len(dom), -1)]):
        part = dom[start:end]
        rows.setdefault(index, set()).update(w for w in words if f">{html.escape(w)}<" in part)
    return rows


def png_stats(png_path) -> dict:
    """Size and a few content measures of a PNG (for 'non-trivial' assertions)."""
    from PIL import Image, ImageStat

    with Image.open(png_path) as im:
        rgb = im.convert("RGB")
        gray = rgb.convert("L")
        stat = ImageStat.Stat(gray)
        colors = rgb.getcolors(maxcolors=1 << 20)
        return {
            "width": rgb.width, "height": rgb.height,
            "bytes": Path(png_path).stat().st_size,
            "stddev": stat.stddev[0],
            "distinct_colors": len(colors) if colors is not None else 1 << 20,
            "extrema": gray.getextrema(),
        }
