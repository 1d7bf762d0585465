"""End to end: `ray up` of clusters/onprem.yaml on hosts made of Linux namespaces.

What happens (tests/netns_cluster.py builds the hosts):
  1. three hosts (head + 2 workers), each a network + PID + mount + UTS namespace with its own
     sshd on port 22 and a per-run SSH key, a private HOME and /tmp, and a copy-on-write overlay of
     the project's venv (so `pip install` on a host never touches the real venv);
  2. a wheel of kdray is built (`pip wheel --no-deps`), as clusters/README.md tells users;
  3. a test copy of clusters/onprem.yaml (only IPs, SSH user/key, local paths, the venv location
     and `ray start` resource flags changed) goes through `ray up`: the setup commands put the
     firewall on every host and install the wheel, the head starts MLflow behind basic auth
     (clusters/kdray-head.sh); the run's own Ray token and MLflow credentials (made like
     clusters/README.md says) travel by the cluster file's file_mounts;
  4. through `ray dashboard` (SSH port forwarding, like a user) a small sweep is sent with
     `ray job submit ... -- kdray tune ...` (RAY_AUTH_MODE=token, the run's token); its trials
     must run on more than one node and MLflow on the head must hold the parent run and one
     child run per trial. Without the token the dashboard refuses, without the credentials MLflow
     does; from this machine (not one of the cluster's hosts) Ray's and MLflow's ports take no
     connection while SSH does; neither secret shows in kdray.env, the job's output or MLflow;
  5. `ray down`, then `ray stop` on each worker over SSH (clusters/README.md): no process may be
     left on any host but its sshd. Whatever happens, the hosts are destroyed at the end.

Marked `cluster` (deselect with `-m "not cluster"`). Skips when not root, without `ip netns`,
overlayfs, or when openssh-server/rsync cannot be installed. Set KDRAY_E2E_STANDIN=1 to submit a
tiny Ray+MLflow script instead of `kdray tune` (used to debug the harness itself).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netns_cluster as nc  # noqa: E402

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("KDRAY_E2E_VENV", REPO / ".venv"))
ONPREM = REPO / "clusters" / "onprem.yaml"
SAMPLES = 4
EXPERIMENT = "kdray-cluster-e2e"
# All hosts share this machine: tell Ray what each may use. The head takes no CPU, so trials can
# only run on the workers; two CPUs per worker fit one trial (1 train worker + its 0.01-CPU
# driver) but not two, so two concurrent trials land on two nodes.
HEAD_FLAGS = "--num-cpus=0 --memory=2000000000 --object-store-memory=150000000"
WORKER_FLAGS = "--num-cpus=2 --memory=2500000000 --object-store-memory=150000000"
# README step 7 (the local provider's `ray get-worker-ips` only knows the head: the workers are
# launched by the autoscaler on the head)
WORKER_IPS = "import sys, yaml; print(*yaml.safe_load(open(sys.argv[1]))['provider']['worker_ips'])"
SITE_BASHRC = (
    "export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true"
    " OMP_NUM_THREADS=1"
)

STANDIN_JOB = r'''
"""Stand-in for `kdray tune`: tasks spread over the nodes, each logs a child run to MLflow."""
import json, os, socket, sys, time
import mlflow, ray
from mlflow.tracking import MlflowClient

uri, experiment, samples = os.environ["MLFLOW_TRACKING_URI"], sys.argv[1], int(sys.argv[2])
ray.init(address="auto")
mlflow.set_tracking_uri(uri)
exp_id = mlflow.set_experiment(experiment).experiment_id
parent = MlflowClient(uri).create_run(exp_id, run_name="sweep").info.run_id

@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def trial(i, uri, exp_id, parent):
    import mlflow, ray
    from mlflow.tracking import MlflowClient
    ip = ray.util.get_node_ip_address()
    c = MlflowClient(uri)
    run = c.create_run(exp_id, run_name=f"trial-{i}", tags={"mlflow.parentRunId": parent})
    c.log_param(run.info.run_id, "node_ip", ip)
    c.log_metric(run.info.run_id, "val_acc", 0.1 * i)
    c.set_terminated(run.info.run_id)
    time.sleep(2)
    return {"trial": i, "node_ip": ip, "val_acc": 0.1 * i}

results = ray.get([trial.remote(i, uri, exp_id, parent) for i in range(samples)])
MlflowClient(uri).set_terminated(parent)
print(json.dumps({"trials": results}))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_wheel(out: Path) -> Path:
    """`pip wheel --no-deps -w dist .` as the README says (without build isolation when the
    backend is already installed, so no registry access is needed)."""
    out.mkdir(parents=True, exist_ok=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out)]
    res = nc.sh([*pip, "--no-build-isolation", str(REPO)], timeout=300, check=False)
    if res.returncode != 0:
        nc.sh([*pip, str(REPO)], timeout=600)
    wheels = list(out.glob("kdray-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _entrypoint(workdir: Path, standin: bool) -> tuple[list[str], list[str]]:
    """(ray job submit arguments before `--`, the command after it). The `$VAR`s expand on the
    head (`bash -c`), from the environment kdray-head.sh gave the Ray head; `ray job submit`
    itself quotes every argument."""
    if standin:
        (workdir / "standin_job.py").write_text(STANDIN_JOB)
        return ["--working-dir", str(workdir)], ["python", "standin_job.py", EXPERIMENT, str(SAMPLES)]
    # search_spaces/quick.yaml, made smaller: two 1-epoch teachers, 2-epoch students
    import yaml

    space = yaml.safe_load((REPO / "search_spaces" / "quick.yaml").read_text())
    space["name"] = EXPERIMENT
    space["base"]["epochs"] = 2
    space["teachers"] = dict(space.get("teachers") or {}, count=2, epochs=1)
    space["scheduler"] = {"grace_period": 1, "reduction_factor": 2}
    (workdir / "e2e.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    # The workdir (teachers, Ray Train's storage_path) on the directory every host mounts, like
    # NFS on-prem: trials on the workers must read the teachers the driver trained on the head.
    cmd = (
        f"kdray --workdir {nc.SHARED_MOUNT}/kdray-work tune --space e2e.yaml --samples {SAMPLES}"
        f" --concurrency 2 --workers 1 --experiment {EXPERIMENT} --address auto"
        ' --optuna-storage "$KDRAY_OPTUNA_STORAGE" --json'
    )  # MLflow: $MLFLOW_TRACKING_URI, which the head's Ray (hence the job) has from kdray.env
    return ["--working-dir", str(workdir)], ["bash", "-c", cmd]


def _last_json(text: str) -> dict:
    """The last line of the job's output that parses as a JSON object (`kdray tune --json`)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"no JSON result in the job output:\n{text[-3000:]}")


def _wait_nodes(api: str, want: int, cluster: nc.NetnsCluster, timeout: float = 180) -> list[dict]:
    deadline = time.monotonic() + timeout
    nodes: list[dict] = []
    while time.monotonic() < deadline:
        try:
            nodes = _get_json(f"{api}/api/v0/nodes?limit=100", headers=cluster.ray_auth_header())[
                "data"
            ]["result"]["result"]
        except Exception:  # noqa: BLE001 - dashboard still starting
            nodes = []
        alive = [n for n in nodes if n.get("state") == "ALIVE"]
        if len(alive) >= want:
            return alive
        time.sleep(2)
    raise TimeoutError(f"{want} alive nodes not reached: {nodes}\n{cluster.describe()}")


def _get_json(
    url: str, payload: dict | None = None, timeout: float = 15, headers: dict | None = None
) -> dict:
    assert url.startswith("http://127.0.0.1:"), url  # only through our forwards
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read().decode())


def _http_status(url: str, timeout: float = 15) -> int:
    """The HTTP status of a GET without any credentials."""
    assert url.startswith("http://127.0.0.1:"), url
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _mlflow_runs(mlflow_url: str, headers: dict) -> list[dict]:
    base = f"{mlflow_url}/api/2.0/mlflow"
    try:
        exp = _get_json(f"{base}/experiments/get-by-name?experiment_name={EXPERIMENT}", headers=headers)
    except urllib.error.HTTPError as exc:
        raise AssertionError(
            f"MLflow on the head has no experiment {EXPERIMENT!r} ({exc}): the sweep did not log "
            "to $MLFLOW_TRACKING_URI"
        ) from None
    exp_id = exp["experiment"]["experiment_id"]
    res = _get_json(
        f"{base}/runs/search", {"experiment_ids": [exp_id], "max_results": 1000}, headers=headers
    )
    return res.get("runs", [])


def _connects(ip: str, port: int, timeout: float = 3) -> bool:
    """Whether a TCP connection from this machine (not one of the cluster's hosts) to a host's
    port succeeds; the firewall drops the SYN of a refused one (timeout)."""
    assert ip.startswith(nc.SUBNET + "."), ip  # only the hosts made here
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def _listeners(cluster: nc.NetnsCluster) -> dict[int, set[str]]:
    """{port: {bound addresses}} of TCP listeners on the head."""
    out = cluster.ssh(cluster.head, "ss -Hltn", login=False).stdout
    ports: dict[int, set[str]] = {}
    for line in out.splitlines():
        local = line.split()[3]
        addr, _, port = local.rpartition(":")
        ports.setdefault(int(port), set()).add(addr.strip("[]"))
    return ports


def _run_value(run: dict, key: str) -> str | None:
    data = run.get("data", {})
    for section in ("params", "tags", "metrics"):
        for item in data.get(section, []):
            if item.get("key") == key:
                return str(item.get("value"))
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = nc.skip_reason()
    if reason:
        pytest.skip(reason)
    if not (VENV / "bin" / "ray").exists():
        pytest.skip(f"no venv with Ray at {VENV}")
    standin = os.environ.get("KDRAY_E2E_STANDIN") == "1"
    if not standin and not (REPO / "pyproject.toml").exists():
        pytest.skip("pyproject.toml missing: kdray cannot be built into a wheel yet")
    try:
        nc.ensure_mlflow_auth(VENV)
    except Exception as exc:  # noqa: BLE001 - reported as the skip reason
        pytest.skip(f"no mlflow[auth] (Flask-WTF) in {VENV} and it cannot be installed: {exc}")
    c = nc.NetnsCluster(workers=2, venv=VENV)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        nc.cleanup_leftovers()


def test_ray_up_sweep_mlflow_ray_down(cluster: nc.NetnsCluster, tmp_path: Path) -> None:
    standin = os.environ.get("KDRAY_E2E_STANDIN") == "1"
    t_start = time.monotonic()
    dist = tmp_path / "dist"
    if standin and os.environ.get("KDRAY_E2E_DIST"):
        dist = Path(os.environ["KDRAY_E2E_DIST"])
    else:
        _build_wheel(dist)
    cfg = cluster.cluster_config(
        ONPREM,
        file_mounts={
            "~/kdray-dist": str(dist),
            "~/kdray-cluster": str(REPO / "clusters"),
            # the secrets, made for this run (clusters/README.md, step 0)
            "~/.ray/auth_token": str(cluster.ray_token),
            "~/.mlflow/credentials": str(cluster.mlflow_credentials),
        },
        head_start_flags=HEAD_FLAGS,
        worker_start_flags=WORKER_FLAGS,
    )
    cluster.seed_bashrc(SITE_BASHRC)
    cfg_path = cluster.write_cluster_yaml(cfg)
    forward: subprocess.Popen | None = None
    timings: dict[str, float] = {}
    try:
        # -- ray up -----------------------------------------------------------------------------
        t0 = time.monotonic()
        up = cluster.ray("up", "-y", "--no-config-cache", str(cfg_path), timeout=600)
        timings["ray_up"] = time.monotonic() - t0
        assert "kdray-env" in (cluster.head.dir / "home" / ".bashrc").read_text(), up.stdout[-3000:]
        # the setup commands installed the wheel into each host's venv overlay
        for h in cluster.hosts[:1]:
            got = cluster.ssh(h, "python -c 'import kdray, ray; print(kdray.__file__, ray.__version__)'")
            assert str(VENV) in got.stdout and "2.58" in got.stdout, got.stdout

        # -- the dashboard through SSH port forwarding, as a user does -----------------------------
        port = _free_port()
        forward = subprocess.Popen(
            [str(VENV / "bin" / "ray"), "dashboard", "--no-config-cache", "-p", str(port), str(cfg_path)],
            env=cluster.client_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        api = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        nodes = _wait_nodes(api, want=3, cluster=cluster)
        timings["workers_joined"] = time.monotonic() - t0
        node_ips = {n["node_ip"] for n in nodes}
        assert node_ips == {h.ip for h in cluster.hosts}, node_ips
        # token authentication is on: without the token the dashboard's API refuses
        assert _http_status(f"{api}/api/v0/nodes?limit=1") == 401
        # the firewall: from this machine, not one of the cluster's hosts, only SSH connects
        assert _connects(cluster.head.ip, 22)
        for port in (6379, 5000, 8265):
            assert not _connects(cluster.head.ip, port), f"port {port} of the head is reachable"

        # -- the sweep --------------------------------------------------------------------------
        workdir = tmp_path / "job"
        workdir.mkdir()
        before, command = _entrypoint(workdir, standin)
        t0 = time.monotonic()
        job = cluster.ray(
            "job", "submit", "--address", api, *before, "--", *command, timeout=540, check=False
        )
        timings["sweep"] = time.monotonic() - t0
        assert job.returncode == 0 and "succeeded" in job.stdout, (
            f"{job.stdout[-8000:]}\n{job.stderr[-3000:]}\n{cluster.describe()}"
        )

        if not standin:  # the sweep's own --json result: every trial ran, on >1 node
            result = _last_json(job.stdout)
            errors = [t.get("error") for t in result.get("trials", []) if t.get("error")]
            assert not errors, f"{len(errors)} trial(s) failed, first: {errors[0]}"
            ips = {(t.get("metrics") or {}).get("node_ip") for t in result["trials"]} - {None}
            assert len(ips) >= 2, f"trials ran on {ips}"

        # -- MLflow on the head, through `ssh -L` to the URI in kdray.env (README step 5) ------
        env = cluster.ray("exec", "--no-config-cache", str(cfg_path), "cat ~/kdray-state/kdray.env").stdout
        m = re.search(r"MLFLOW_TRACKING_URI=http://([\d.]+:\d+)", env)
        assert m and m.group(1) == f"{cluster.head.ip}:5000", env
        mlflow_port = _free_port()
        mlflow_fwd = cluster.forward(cluster.head, mlflow_port, m.group(1))
        try:
            _wait_port(mlflow_port)
            mlflow_url = f"http://127.0.0.1:{mlflow_port}"
            # basic auth: only /health answers without the credentials
            assert _http_status(f"{mlflow_url}/health") == 200
            assert _http_status(f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1") == 401
            runs = _mlflow_runs(mlflow_url, cluster.mlflow_auth_header())
        finally:
            mlflow_fwd.terminate()
            mlflow_fwd.wait(timeout=10)
        # no secret in a file kdray writes, the job's output, MLflow's records or MLflow's log
        mlflow_log = cluster.head.dir / "home" / "kdray-state" / "mlflow.log"
        seen = "\n".join([env, job.stdout, job.stderr, json.dumps(runs),
                          mlflow_log.read_text(errors="replace") if mlflow_log.exists() else ""])
        for secret in (cluster.mlflow_password, cluster.ray_token.read_text().strip()):
            assert secret not in seen, "a secret leaked into kdray.env, the job output or MLflow"
        parents = [r for r in runs if not _run_value(r, "mlflow.parentRunId")]
        children = [r for r in runs if _run_value(r, "mlflow.parentRunId")]
        assert parents and len(children) >= SAMPLES, json.dumps(runs)[:3000]
        trial_ips = {_run_value(r, "node_ip") for r in children} - {None}
        assert len(trial_ips) >= 2, f"trials on {trial_ips}"
        assert trial_ips <= {h.ip for h in cluster.workers}, trial_ips
        assert (cluster.head.dir / "home" / "kdray-state" / "mlflow.db").exists()

        # -- nothing public: the dashboard on loopback only, MLflow on the head's address -------
        ports = _listeners(cluster)
        assert ports.get(8265) == {"127.0.0.1"}, ports
        assert ports.get(5000) == {cluster.head.ip}, ports
    except BaseException:
        print(cluster.describe(), file=sys.stderr)
        raise
    finally:
        if forward is not None:  # `ray dashboard` and its ssh child: the whole process group
            os.killpg(forward.pid, signal.SIGTERM)
            try:
                forward.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(forward.pid, signal.SIGKILL)
                forward.wait(timeout=10)
        # -- README step 7: ray down, then `ray stop` on each worker ---------------------------
        t0 = time.monotonic()
        got = nc.sh([str(VENV / "bin" / "python"), "-c", WORKER_IPS, str(cfg_path)], check=False)
        worker_ips = got.stdout.split()
        down = cluster.ray("down", "-y", str(cfg_path), timeout=180, check=False)
        by_ip = {h.ip: h for h in cluster.workers}
        stops = [
            subprocess.Popen([*cluster.ssh_args(), f"root@{ip}", 'bash -lc "ray stop"'],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for ip in worker_ips if ip in by_ip
        ]
        for p in stops:
            p.wait(timeout=120)
        timings["ray_down"] = time.monotonic() - t0

    assert down.returncode == 0, down.stderr[-3000:]
    assert sorted(worker_ips) == sorted(h.ip for h in cluster.workers), got.stdout
    # No process left on any host but its sshd: Ray, MLflow (its watchdog follows the Ray head
    # within ~5 s), the sweep. Bounded wait for processes that are exiting.
    deadline = time.monotonic() + 45
    left = cluster.leftover_processes()
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = cluster.leftover_processes()
    timings["cleanup_wait"] = time.monotonic() - deadline + 45
    # ...nor on this machine: Ray's ssh ControlMaster connections end (ControlPersist 10 s)
    client = cluster.client_processes()
    while client and time.monotonic() < deadline + 20:
        time.sleep(1)
        client = cluster.client_processes()
    timings["total"] = time.monotonic() - t_start
    nc.log("timings: " + json.dumps({k: round(v, 1) for k, v in timings.items()}))
    assert not left, f"processes left behind: {json.dumps(left, indent=1)}"
    assert not client, f"client processes left behind: {client}"
