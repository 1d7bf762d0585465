"""Hosts made of Linux namespaces, for end-to-end tests of `ray up` (local provider).

Each "host" is a network namespace (veth pair to a bridge in the root namespace, its own IP in
10.213.7.0/24, no default route: it reaches nothing but the other hosts and the bridge) plus its
own PID, mount and UTS namespaces, running its own sshd on port 22 as PID 1. Inside its mount
namespace each host has a private HOME (/root), /tmp, /run, /dev/shm, /etc/hosts, and a
copy-on-write overlay over the project's virtualenv: `pip install` on a host writes only to that
host's overlay, never to the real venv. One directory is shared by all hosts, like an NFS mount,
at /mnt/kdray-shared. Killing a host's PID 1 kills every process on it, which is
what makes the cleanup reliable.

Everything created carries the prefix ``kdrt`` (namespaces, links, run directories under
/var/tmp), so `cleanup_leftovers()` can remove what a crashed earlier run left behind without
touching anything else. Network traffic goes only to the hosts created here.

Each run also makes the cluster's secrets, as clusters/README.md tells a user to: a Ray token
(`ray_auth_token`) and MLflow credentials (`mlflow-credentials`), mode 0600 in the run directory;
the test's copy of the cluster file ships them to the hosts, and `client_env()` points this
machine's `ray` commands at the token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH).

Requires root, iproute2, util-linux `unshare`, overlayfs, openssh-server, rsync and iptables
(`ensure_packages()` installs the last three with apt-get when missing: the on-prem cluster file
puts a firewall on every host, here in each host's own network namespace).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "kdrt"
SUBNET = "10.213.7"
BRIDGE = f"{PREFIX}-br0"
BRIDGE_IP = f"{SUBNET}.1"
RUN_BASE = Path("/var/tmp")
SSHD = "/usr/sbin/sshd"
HEAD_OCTET = 10
# Like an NFS export mounted on every host: the same directory at this path on each of them.
SHARED_MOUNT = "/mnt/kdray-shared"

# Environment for every Ray/MLflow client command we run: no telemetry, and Ray's client-side
# state (cluster state file, config cache) in our run directory instead of the shared /tmp/ray.
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_UP_enable_autoscaler_v2": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PYTHONUNBUFFERED": "1",
}


def log(msg: str) -> None:
    print(f"[netns-cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(
    args: list[str] | str,
    *,
    timeout: float = 60,
    check: bool = True,
    env: dict[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    """Run a command (bounded in time), capture its output."""
    if isinstance(args, str):
        args = ["bash", "-c", args]
    proc = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=input,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {shlex.join(args)}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


# --------------------------------------------------------------------------------------------
# Preconditions


def ensure_packages(timeout: float = 600) -> None:
    """Install openssh-server, rsync and iptables with apt-get when they are missing."""
    missing = [
        pkg
        for pkg, exe in (("openssh-server", SSHD), ("rsync", "rsync"), ("openssh-client", "ssh"),
                         ("iptables", "iptables"))
        if not (Path(exe).exists() if exe.startswith("/") else shutil.which(exe))
    ]
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise RuntimeError(f"missing {missing} and no apt-get to install them")
    log(f"apt-get install {missing}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sh(["apt-get", "update", "-qq"], timeout=timeout, env=env)
    sh(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], timeout=timeout, env=env)


def skip_reason() -> str | None:
    """Why this machine cannot run the namespace cluster, or None when it can."""
    if sys.platform != "linux":
        return "needs Linux namespaces"
    if os.geteuid() != 0:
        return "needs root (ip netns, unshare, mount)"
    for exe in ("ip", "unshare", "mount"):
        if not shutil.which(exe):
            return f"`{exe}` not found"
    probe = f"{PREFIX}-probe"
    sh(["ip", "netns", "del", probe], check=False)
    made = sh(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    sh(["ip", "netns", "del", probe], check=False)
    ovl = RUN_BASE / f"{PREFIX}-probe-ovl"
    shutil.rmtree(ovl, ignore_errors=True)
    for d in ("l", "u", "w", "m"):
        (ovl / d).mkdir(parents=True)
    try:
        res = sh(
            [
                "unshare", "--mount", "--propagation", "private", "mount", "-t", "overlay",
                "overlay", "-o", f"lowerdir={ovl}/l,upperdir={ovl}/u,workdir={ovl}/w", f"{ovl}/m",
            ],
            check=False,
        )
    finally:
        shutil.rmtree(ovl, ignore_errors=True)
    if res.returncode != 0:
        return f"overlayfs mounts fail here: {res.stderr.strip()}"
    try:
        ensure_packages()
    except Exception as exc:  # noqa: BLE001 - reported as the skip reason
        return f"cannot install openssh-server/rsync/iptables: {exc}"
    return None


def ensure_mlflow_auth(venv: Path, timeout: float = 600) -> None:
    """The hosts run the project's venv and have no network; MLflow on the head runs behind
    basic auth, which needs the mlflow[auth] extra (Flask-WTF). Install it into the venv, at the
    installed MLflow's version, when it is missing (as the cluster file's head_setup_commands do
    on a host with network)."""
    py = str(Path(venv) / "bin" / "python")
    if sh([py, "-c", "import flask_wtf"], check=False).returncode == 0:
        return
    version = sh([py, "-c", "import mlflow; print(mlflow.__version__)"]).stdout.strip()
    log(f"pip install mlflow[auth]=={version} into {venv}")
    sh([py, "-m", "pip", "install", "-q", f"mlflow[auth]=={version}"], timeout=timeout)


# --------------------------------------------------------------------------------------------
# Cleanup


def _netns_list() -> list[str]:
    out = sh(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    out = sh(["ip", "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def pids_with_cmdline(fragment: str) -> list[int]:
    """PIDs (root namespace view) whose command line contains `fragment`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmd:
            found.append(int(entry.name))
    return found


def _kill(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def cleanup_leftovers() -> None:
    """Remove everything with our prefix: processes in our namespaces, the namespaces, links,
    run directories, and ssh clients that used a key from one of our run directories."""
    for ns in _netns_list():
        if ns.startswith(f"{PREFIX}-"):
            _kill(_netns_pids(ns))
    for ns in _netns_list():
        if ns.startswith(f"{PREFIX}-"):
            for _ in range(20):
                if not _netns_pids(ns):
                    break
                time.sleep(0.25)
            sh(["ip", "netns", "del", ns], check=False)
    links = sh(["ip", "-o", "link", "show"], check=False).stdout
    for m in re.finditer(rf"^\d+: ({PREFIX}-[\w.-]+?)(@\S+)?:", links, re.M):
        sh(["ip", "link", "del", m.group(1)], check=False)
    # Ray's ssh ControlMaster processes started for a previous run (their -i key is in a run dir)
    _kill(pids_with_cmdline(str(RUN_BASE / f"{PREFIX}-run-")))
    for d in RUN_BASE.glob(f"{PREFIX}-run-*"):
        meta = d / "control_path"
        if meta.exists():
            shutil.rmtree(meta.read_text().strip(), ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The hosts


@dataclass
class Host:
    name: str
    ip: str
    dir: Path
    proc: subprocess.Popen | None = None

    @property
    def netns(self) -> str:
        return self.name


SSHD_CONFIG = """\
Port 22
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile {authorized_keys}
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
AllowTcpForwarding yes
PrintMotd no
MaxStartups 100:30:200
MaxSessions 64
LogLevel ERROR
Subsystem sftp internal-sftp
"""

INIT_SCRIPT = """\
set -eu
hostname {name}
{home_binds}
mount --rbind {dir}/home /root
mount --bind {dir}/tmp /tmp
mount -t tmpfs -o mode=755,size=64m tmpfs /run
mkdir -m 755 /run/sshd
mount -t tmpfs -o mode=1777,size=1g tmpfs /dev/shm
mount --bind {run}/hosts /etc/hosts
mount -t tmpfs -o mode=755,size=1m tmpfs /mnt
mkdir -p {shared_mnt}
mount --bind {run}/shared {shared_mnt}
mount -t overlay overlay -o lowerdir={venv},upperdir={dir}/venv-upper,workdir={dir}/venv-work {venv}
exec {sshd} -D -e -f {run}/sshd_config -h {run}/ssh_host_ed25519_key \\
    -o ListenAddress={ip} -o PidFile=none
"""


class NetnsCluster:
    """A head and N workers as namespace hosts. Use as a context manager:

        with NetnsCluster(workers=2, venv=Path(".venv")) as c:
            c.write_cluster_yaml(...); c.ray("up", ...)
    """

    def __init__(self, workers: int = 2, venv: Path | str = "/work/main/.venv") -> None:
        self.venv = Path(venv).resolve()
        self.run_id = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.cluster_name = f"{PREFIX}-{self.run_id}"
        self.dir = RUN_BASE / f"{PREFIX}-run-{self.run_id}"
        self.hosts = [
            Host(
                name=f"{PREFIX}-h{i}",
                ip=f"{SUBNET}.{HEAD_OCTET + i}",
                dir=self.dir / f"h{i}",
            )
            for i in range(workers + 1)
        ]
        self.key = self.dir / "id_ed25519"
        # the cluster's secrets (made in start(), shipped by the cluster file's file_mounts)
        self.ray_token = self.dir / "ray_auth_token"
        self.mlflow_credentials = self.dir / "mlflow-credentials"
        self.mlflow_user = "kdray"
        self.mlflow_password = secrets.token_urlsafe(24)
        self.client_tmp = self.dir / "client-tmp"
        self.control_path: Path | None = None
        self._bridge_made = False

    # -- topology ---------------------------------------------------------------------------

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def workers(self) -> list[Host]:
        return self.hosts[1:]

    def __enter__(self) -> "NetnsCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, ssh_timeout: float = 30) -> None:
        cleanup_leftovers()
        self.dir.mkdir(parents=True)
        self.client_tmp.mkdir()
        (self.dir / "shared").mkdir(mode=0o1777)
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.cluster_name, "-f", str(self.key)])
        # what `ray get-auth-token --generate` makes (64 hex digits), and MLflow's credentials file
        _write_secret(self.ray_token, secrets.token_hex(32))
        _write_secret(
            self.mlflow_credentials,
            f"[mlflow]\nmlflow_tracking_username = {self.mlflow_user}\n"
            f"mlflow_tracking_password = {self.mlflow_password}\n",
        )
        host_key = self.dir / "ssh_host_ed25519_key"
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)])
        authorized = self.dir / "authorized_keys"
        authorized.write_text(Path(f"{self.key}.pub").read_text())
        (self.dir / "sshd_config").write_text(SSHD_CONFIG.format(authorized_keys=authorized))
        hosts_lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        hosts_lines += [f"{h.ip} {h.name}" for h in self.hosts]
        (self.dir / "hosts").write_text("\n".join(hosts_lines) + "\n")
        # Where Ray's ssh ControlMaster sockets for this cluster go (so cleanup can remove them).
        import hashlib
        from getpass import getuser

        self.control_path = Path(
            "/tmp/ray_ssh_{}/{}".format(
                hashlib.sha256(getuser().encode()).hexdigest()[:10],
                hashlib.sha256(self.cluster_name.encode()).hexdigest()[:10],
            )
        )
        (self.dir / "control_path").write_text(str(self.control_path))

        sh(["ip", "link", "add", BRIDGE, "type", "bridge"])
        self._bridge_made = True
        sh(["ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE])
        sh(["ip", "link", "set", BRIDGE, "up"])
        for i, h in enumerate(self.hosts):
            self._start_host(i, h)
        deadline = time.monotonic() + ssh_timeout
        for h in self.hosts:
            while True:
                res = self.ssh(h, "true", timeout=10, check=False, login=False)
                if res.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd on {h.name} ({h.ip}) not reachable: {res.stderr}")
                time.sleep(0.3)
        log(f"{len(self.hosts)} hosts up: " + ", ".join(f"{h.name}={h.ip}" for h in self.hosts))

    def _start_host(self, i: int, h: Host) -> None:
        for sub in ("home", "tmp", "venv-upper", "venv-work"):
            (h.dir / sub).mkdir(parents=True)
        (h.dir / "home").chmod(0o700)
        (h.dir / "tmp").chmod(0o1777)
        (h.dir / "home" / ".bashrc").write_text("")
        # Debian's /etc/skel/.profile: login shells read ~/.bashrc
        (h.dir / "home" / ".profile").write_text(
            'if [ -n "$BASH_VERSION" ] && [ -f "$HOME/.bashrc" ]; then . "$HOME/.bashrc"; fi\n'
        )
        # The venv's base interpreter may live under the real /root (pyenv): keep it visible,
        # read-only, inside the host's private home.
        binds = []
        base = Path(os.path.realpath(self.venv / "bin" / "python3"))
        if base.is_relative_to("/root") and len(base.parts) > 2:
            top = Path("/root", base.parts[2])
            target = h.dir / "home" / top.name
            target.mkdir()
            binds += [f"mount --bind {top} {target}", f"mount -o remount,bind,ro {target}"]
        (h.dir / "init.sh").write_text(
            INIT_SCRIPT.format(
                name=h.name, dir=h.dir, run=self.dir, venv=self.venv, sshd=SSHD, ip=h.ip,
                home_binds="\n".join(binds), shared_mnt=SHARED_MOUNT,
            )
        )
        veth = f"{PREFIX}-v{i}"
        sh(["ip", "netns", "add", h.netns])
        sh(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns])
        sh(["ip", "link", "set", veth, "master", BRIDGE, "up"])
        nsx = ["ip", "netns", "exec", h.netns]
        sh([*nsx, "ip", "addr", "add", f"{h.ip}/24", "dev", "eth0"])
        sh([*nsx, "ip", "link", "set", "eth0", "up"])
        sh([*nsx, "ip", "link", "set", "lo", "up"])
        log_file = open(h.dir / "host.log", "wb")
        h.proc = subprocess.Popen(
            [
                *nsx, "unshare", "--mount", "--pid", "--uts", "--fork", "--mount-proc",
                "--propagation", "private", "--kill-child=SIGKILL",
                "bash", str(h.dir / "init.sh"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()

    def stop(self) -> None:
        """Tear everything down; safe to call twice and after a partial start."""
        # Each host's process group holds `unshare` and the host's PID 1 (sshd): when PID 1
        # exits, the kernel kills every process of the host's PID namespace.
        for h in self.hosts:
            if h.proc is not None and h.proc.poll() is None:
                _killpg(h.proc.pid, signal.SIGTERM)
        for h in self.hosts:
            if h.proc is not None:
                try:
                    h.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    _killpg(h.proc.pid, signal.SIGKILL)
                    h.proc.wait(timeout=10)
            if h.netns in _netns_list():
                _kill(_netns_pids(h.netns))
                for _ in range(40):
                    if not _netns_pids(h.netns):
                        break
                    time.sleep(0.25)
                sh(["ip", "netns", "del", h.netns], check=False)
        if self._bridge_made:
            sh(["ip", "link", "del", BRIDGE], check=False)
            self._bridge_made = False
        # ssh ControlMaster processes of `ray up` that used our key
        _kill(pids_with_cmdline(str(self.dir)), signal.SIGTERM)
        time.sleep(0.2)
        _kill(pids_with_cmdline(str(self.dir)))
        if self.control_path is not None:
            shutil.rmtree(self.control_path, ignore_errors=True)
            try:
                self.control_path.parent.rmdir()  # only when empty (another cluster may use it)
            except OSError:
                pass
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- talking to hosts --------------------------------------------------------------------

    def ssh_args(self) -> list[str]:
        return [
            "ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
        ]

    def ssh(
        self,
        host: Host,
        command: str,
        *,
        timeout: float = 60,
        check: bool = True,
        login: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run `command` on a host over SSH (by default through a login shell, `bash -lc`)."""
        remote = f"bash -lc {shlex.quote(command)}" if login else command
        return sh([*self.ssh_args(), f"root@{host.ip}", remote], timeout=timeout, check=check)

    def forward(self, host: Host, local_port: int, target: str) -> subprocess.Popen:
        """`ssh -N -L 127.0.0.1:<local_port>:<target> root@host` (stop it with .terminate())."""
        return subprocess.Popen(
            [*self.ssh_args(), "-N", "-o", "ExitOnForwardFailure=yes",
             "-L", f"127.0.0.1:{local_port}:{target}", f"root@{host.ip}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def processes(self, host: Host) -> list[tuple[int, str, str]]:
        """(pid, comm, cmdline) of every process on a host (root-namespace pids)."""
        out = []
        for pid in _netns_pids(host.netns):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out.append((pid, comm, cmd.strip()))
        return out

    def leftover_processes(self) -> dict[str, list[str]]:
        """Processes on each host other than its sshd (PID 1, and its sessions) and the
        `unshare` that holds the namespaces."""
        left = {}
        for h in self.hosts:
            others = [
                f"{pid} {comm}: {cmd[:160]}"
                for pid, comm, cmd in self.processes(h)
                if comm != "sshd" and not (h.proc is not None and pid == h.proc.pid)
            ]
            if others:
                left[h.name] = others
        return left

    def client_processes(self) -> list[str]:
        """Processes on this machine (outside the hosts) that use this run's files: the ssh
        clients and ControlMasters of `ray up`/`ray dashboard`."""
        ours = {h.proc.pid for h in self.hosts if h.proc is not None}
        for h in self.hosts:
            ours.update(_netns_pids(h.netns))
        out = []
        for pid in pids_with_cmdline(str(self.dir)):
            if pid in ours:
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            out.append(f"{pid}: {cmd[:200]}")
        return out

    def seed_bashrc(self, text: str) -> None:
        """Prepend lines to every host's ~/.bashrc (what a site admin would have there)."""
        for h in self.hosts:
            rc = h.dir / "home" / ".bashrc"
            rc.write_text(text.rstrip("\n") + "\n" + rc.read_text())

    # -- Ray client side ----------------------------------------------------------------------

    def client_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(QUIET_ENV)
        env["TMPDIR"] = str(self.client_tmp)
        env["RAY_TMPDIR"] = str(self.client_tmp)
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        env.pop("RAY_ADDRESS", None)
        # token authentication, with this cluster's token (RAY_AUTH_TOKEN would take precedence)
        env.pop("RAY_AUTH_TOKEN", None)
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(self.ray_token)
        env.update(extra)
        return env

    def ray_auth_header(self) -> dict[str, str]:
        """The header Ray's dashboard wants from an HTTP client when token auth is on."""
        return {"Authorization": f"Bearer {self.ray_token.read_text().strip()}"}

    def mlflow_auth_header(self) -> dict[str, str]:
        import base64

        pair = f"{self.mlflow_user}:{self.mlflow_password}".encode()
        return {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}

    def ray(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """Run the `ray` CLI of the venv from the root namespace (the user's laptop)."""
        t0 = time.monotonic()
        res = sh([str(self.venv / "bin" / "ray"), *args], timeout=timeout, check=False, env=self.client_env())
        log(f"ray {' '.join(args[:2])} -> rc={res.returncode} in {time.monotonic() - t0:.1f}s")
        (self.dir / "client.log").open("a").write(
            f"$ ray {shlex.join(args)}\n{res.stdout}\n{res.stderr}\n"
        ) if self.dir.exists() else None
        if check and res.returncode != 0:
            raise RuntimeError(
                f"ray {shlex.join(args)} failed ({res.returncode})\n"
                f"stdout:\n{res.stdout[-6000:]}\nstderr:\n{res.stderr[-6000:]}"
            )
        return res

    def cluster_config(
        self,
        template: Path,
        *,
        file_mounts: dict[str, str],
        head_start_flags: str = "",
        worker_start_flags: str = "",
        venv_placeholder: str = "~/kdray-venv",
    ) -> dict:
        """A test copy of an on-prem cluster file, pointed at these hosts.

        Only what has to differ on this machine is changed: the host IPs (in the provider and in
        the firewall command), the SSH user and key, the local paths of the file mounts (the
        same remote paths as the template's), the venv location (the project's venv, overlaid
        per host), and extra `ray start` flags (resources: all hosts share one machine).
        """
        import yaml

        text = template.read_text()
        text = text.replace(f"$HOME/{venv_placeholder[2:]}", str(self.venv))
        text = text.replace(venv_placeholder, str(self.venv))
        cfg = yaml.safe_load(text)
        old_ips = [cfg["provider"]["head_ip"], *cfg["provider"]["worker_ips"]]
        cfg["cluster_name"] = self.cluster_name
        cfg["provider"]["head_ip"] = self.head.ip
        cfg["provider"]["worker_ips"] = [h.ip for h in self.workers]
        cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(self.key)}
        if set(file_mounts) != set(cfg.get("file_mounts") or {}):
            raise ValueError(f"file mounts {sorted(file_mounts)} differ from the template's "
                             f"{sorted(cfg.get('file_mounts') or {})}")
        cfg["file_mounts"] = file_mounts

        def firewall_hosts(cmd: str) -> str:  # `kdray-head.sh firewall <the template's IPs>`
            if "kdray-head.sh firewall" not in cmd:
                return cmd
            words = cmd.split()
            if sorted(w for w in words if w in old_ips) != sorted(old_ips):
                raise ValueError(f"the firewall command names other hosts than the provider: {cmd!r}")
            return " ".join([w for w in words if w not in old_ips] + [h.ip for h in self.hosts])

        cfg["setup_commands"] = [firewall_hosts(c) for c in cfg.get("setup_commands") or []]

        def add_flags(cmds: list[str], flags: str) -> list[str]:
            return [re.sub(r"(ray start\b)", rf"\1 {flags}", c) if flags else c for c in cmds]

        cfg["head_start_ray_commands"] = add_flags(cfg["head_start_ray_commands"], head_start_flags)
        cfg["worker_start_ray_commands"] = add_flags(cfg["worker_start_ray_commands"], worker_start_flags)
        return cfg

    def write_cluster_yaml(self, cfg: dict) -> Path:
        import yaml

        path = self.dir / "cluster.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def describe(self) -> str:
        """Diagnostics for a failed test: host logs and the tails of Ray/MLflow logs."""
        parts = []
        for h in self.hosts:
            hl = h.dir / "host.log"
            if hl.exists():
                parts.append(f"--- {h.name} host.log\n{hl.read_text()[-2000:]}")
            logs = h.dir / "tmp" / "ray" / "session_latest" / "logs"
            for name in ("monitor.log", "monitor.err", "raylet.err", "gcs_server.err"):
                f = logs / name
                if f.exists():
                    parts.append(f"--- {h.name} {name}\n{f.read_text(errors='replace')[-2000:]}")
            ml = h.dir / "home" / "kdray-state" / "mlflow.log"
            if ml.exists():
                parts.append(f"--- {h.name} mlflow.log\n{ml.read_text(errors='replace')[-2000:]}")
        cl = self.dir / "client.log"
        if cl.exists():
            parts.append(f"--- client.log\n{cl.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)


def _smoke() -> None:  # pragma: no cover - manual check: python tests/netns_cluster.py
    reason = skip_reason()
    if reason:
        print("cannot run:", reason)
        return
    with NetnsCluster(workers=2) as c:
        for h in c.hosts:
            print(h.name, c.ssh(h, "hostname; id -u; echo $HOME; ls /tmp; ip -4 -o addr show eth0").stdout)
        print(textwrap.indent(json.dumps(c.leftover_processes(), indent=1), "  "))
    print("netns after:", [n for n in _netns_list() if n.startswith(PREFIX)])


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) > 1 and sys.argv[1] == "cleanup":
        cleanup_leftovers()
    else:
        _smoke()
