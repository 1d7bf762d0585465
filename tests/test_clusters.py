"""Offline checks of clusters/*.yaml: Ray's own config validation plus kdray's rules.

kdray's rules (see clusters/README.md):
  * Ray is pinned, in images and pip installs, to exactly the installed Ray version, and no
    deprecated rayproject/ray-ml image is used;
  * cloud files: a head node type without GPUs, GPU worker types that declare their GPUs with
    min/max workers, at least one spot/preemptible type; on-prem: the local provider and a head
    started without GPUs;
  * every node installs kdray; the head runs MLflow with a persistent store;
  * nothing listens publicly: the dashboard binds 127.0.0.1, MLflow never 0.0.0.0, no port
    published by Docker, no security-group rule open to the world but SSH.
What only a real cloud account can check (instance types, images, quotas, IAM) is listed in
clusters/README.md.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
FILES = sorted(CLUSTERS.glob("*.yaml"))
CLOUD = [f for f in FILES if f.name != "onprem.yaml"]
HEAD_SCRIPT = CLUSTERS / "kdray-head.sh"
PUBLIC_CIDRS = {"0.0.0.0/0", "::/0"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def all_commands(cfg: dict) -> list[str]:
    keys = (
        "initialization_commands", "setup_commands", "head_setup_commands",
        "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
    )
    cmds = [c for k in keys for c in (cfg.get(k) or [])]
    for nt in (cfg.get("available_node_types") or {}).values():
        for k in keys:
            cmds += nt.get(k) or []
    return cmds


def check_cluster_file(path: Path, ray_version: str) -> list[str]:
    """kdray's rules for one cluster file; returns the list of problems (empty when fine)."""
    problems: list[str] = []
    cfg = yaml.safe_load(path.read_text())
    text = yaml.safe_dump(cfg)  # without the comments
    cmds = all_commands(cfg)
    joined = "\n".join(cmds)

    # -- Ray version pinned to the installed one ------------------------------------------------
    if "ray-ml" in text:
        problems.append("uses a deprecated rayproject/ray-ml image")
    pins = re.findall(r"ray\[[^\]]*\]==([\w.]+)", joined)
    if not pins:
        problems.append('no pip pin like "ray[default,tune,train]==X" in the setup commands')
    problems += [f"pip pins ray=={p}, installed is {ray_version}" for p in pins if p != ray_version]
    docker = cfg.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        img = docker.get(key)
        if img:
            m = re.fullmatch(r"rayproject/ray:([\d.]+)(-py\d+)?(-(cpu|gpu|cu\d+))?", img)
            if not m:
                problems.append(f"docker.{key} {img!r} is not a pinned rayproject/ray image")
            elif m.group(1) != ray_version:
                problems.append(f"docker.{key} is Ray {m.group(1)}, installed is {ray_version}")
    for nt_name, nt in (cfg.get("available_node_types") or {}).items():
        img = (nt.get("docker") or {}).get("worker_image") or (nt.get("docker") or {}).get("head_image")
        if img and ray_version not in img:
            problems.append(f"{nt_name}: image {img} not pinned to {ray_version}")

    # -- kdray installed everywhere, MLflow on the head --------------------------------------------
    setup = "\n".join(cfg.get("setup_commands") or [])
    if "kdray" not in setup or "pip install" not in setup:
        problems.append("setup_commands do not pip install kdray on every node")
    if "kdray-head.sh start" not in "\n".join(cfg.get("head_start_ray_commands") or []):
        problems.append("head_start_ray_commands do not start MLflow (kdray-head.sh start)")
    mounts = cfg.get("file_mounts") or {}
    if not any(Path(src).resolve() == CLUSTERS for src in _local_sources(mounts)):
        problems.append("file_mounts do not ship ./clusters (kdray-head.sh) to the nodes")

    # -- node types --------------------------------------------------------------------------
    provider = cfg["provider"]["type"]
    head_start = "\n".join(cfg.get("head_start_ray_commands") or [])
    if provider == "local":
        if "--num-gpus=0" not in head_start:
            problems.append("on-prem head is not started with --num-gpus=0")
    else:
        types = cfg.get("available_node_types") or {}
        head = cfg.get("head_node_type")
        if head not in types:
            problems.append(f"head_node_type {head!r} not in available_node_types")
        elif (types[head].get("resources") or {}).get("GPU", None) != 0:
            problems.append("the head node type must declare resources GPU: 0")
        workers = {n: t for n, t in types.items() if n != head}
        if not workers:
            problems.append("no worker node types")
        spot = 0
        for name, nt in workers.items():
            res = nt.get("resources") or {}
            if not isinstance(res.get("GPU"), int) or res["GPU"] < 1:
                problems.append(f"worker type {name} declares no GPUs (resources.GPU)")
            for key in ("min_workers", "max_workers"):
                if not isinstance(nt.get(key), int):
                    problems.append(f"worker type {name} has no {key}")
            nc = nt.get("node_config") or {}
            market = (nc.get("InstanceMarketOptions") or {}).get("MarketType")
            sched = nc.get("scheduling") or {}
            if isinstance(sched, list):  # Ray's own examples use a list of one-key dicts
                sched = {k: v for d in sched for k, v in d.items()}
            if market == "spot" or sched.get("preemptible") or sched.get("provisioningModel") == "SPOT":
                spot += 1
            if provider == "gcp" and (nc.get("guestAccelerators") or "g2-" in nc.get("machineType", "")):
                if sched.get("onHostMaintenance") != "TERMINATE":
                    problems.append(f"{name}: GCP GPU VMs need scheduling.onHostMaintenance TERMINATE")
        if not spot:
            problems.append("no spot/preemptible GPU worker type")

    # -- nothing listens publicly -----------------------------------------------------------------
    if re.search(r"\b0\.0\.0\.0\b(?!/0)", joined):
        problems.append("a command binds 0.0.0.0")
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head_start)
    if "ray start --head" in head_start.replace("\n", " ") and hosts != ["127.0.0.1"]:
        problems.append(f"dashboard must bind 127.0.0.1 (--dashboard-host), got {hosts}")
    for opt in docker.get("run_options", []) + docker.get("head_run_options", []) + docker.get(
        "worker_run_options", []
    ):
        if re.match(r"\s*(-p\b|--publish\b|-P\b|--publish-all\b|--network\b|--net\b)", opt):
            problems.append(f"docker run option {opt!r} publishes ports / changes the network")
    for perm in (cfg["provider"].get("security_group") or {}).get("IpPermissions", []):
        cidrs = {r.get("CidrIp") for r in perm.get("IpRanges", [])}
        cidrs |= {r.get("CidrIpv6") for r in perm.get("Ipv6Ranges", [])}
        if cidrs & PUBLIC_CIDRS and not (perm.get("FromPort") == 22 and perm.get("ToPort") == 22):
            problems.append(f"security group opens {perm} to the world")
    return problems


def _local_sources(mounts: dict) -> list[Path]:
    return [CLUSTERS.parent / Path(src) if not os.path.isabs(src) else Path(src) for src in mounts.values()]


def head_script_problems() -> list[str]:
    text = HEAD_SCRIPT.read_text()
    problems = []
    m = re.search(r"mlflow server --host (\S+)", text)
    if not m or "0.0.0.0" in m.group(1):
        problems.append("kdray-head.sh: MLflow must bind the head's cluster address, not 0.0.0.0")
    if "sqlite:///$STATE/mlflow.db" not in text:
        problems.append("kdray-head.sh: MLflow's default store is not a sqlite file in $STATE")
    return problems


# ----------------------------------------------------------------------------------------------


def test_there_are_cluster_files() -> None:
    assert {f.name for f in FILES} >= {"aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"}
    assert (CLUSTERS / "README.md").exists() and HEAD_SCRIPT.exists()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_ray_validates(path: Path) -> None:
    """Ray's own schema validation, as `ray up` runs it before touching any cloud."""
    cfg = prepare_config(load(path))
    validate_config(cfg)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_kdray_rules(path: Path) -> None:
    assert check_cluster_file(path, ray.__version__) == []


def test_head_script() -> None:
    assert head_script_problems() == []
    subprocess.run(["bash", "-n", str(HEAD_SCRIPT)], check=True)


def test_head_script_env(tmp_path: Path) -> None:
    """`kdray-head.sh env` writes the URIs the sweep's driver inherits."""
    out = subprocess.run(
        ["bash", str(HEAD_SCRIPT), "env"],
        env={**os.environ, "KDRAY_STATE": str(tmp_path), "KDRAY_HEAD_IP": "10.1.2.3"},
        capture_output=True, text=True, check=True, timeout=30,
    )
    env = (tmp_path / "kdray.env").read_text()
    assert "MLFLOW_TRACKING_URI=http://10.1.2.3:5000" in env, out.stdout
    assert f"KDRAY_OPTUNA_STORAGE=sqlite:///{tmp_path}/optuna.db" in env


# -- the checks catch what they claim to catch ---------------------------------------------------


def _mutated(tmp_path: Path, name: str, edit) -> Path:
    cfg = load(CLUSTERS / name)
    edit(cfg)
    out = tmp_path / name
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c.__setitem__("max_wrokers", 3),  # misspelt key
        lambda c: c["available_node_types"]["gpu_t4_spot"].__setitem__("min_workers", 99),
        lambda c: c["available_node_types"]["gpu_t4_spot"]["resources"].__setitem__("GPU", "one"),
        lambda c: c.__setitem__("head_node_type", "nope"),
    ],
    ids=["misspelt-key", "min-above-max", "non-integer-gpu", "unknown-head-type"],
)
def test_ray_validation_rejects(tmp_path: Path, edit) -> None:
    bad = _mutated(tmp_path, "aws-gpu.yaml", edit)
    with pytest.raises(Exception):
        validate_config(prepare_config(load(bad)))


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c["docker"].__setitem__("image", "rayproject/ray:2.30.0-py311-gpu"), "installed is"),
        (lambda c: c["docker"].__setitem__("image", "rayproject/ray-ml:2.30.0-gpu"), "ray-ml"),
        (lambda c: c.__setitem__("setup_commands", [s.replace("==2.", "==1.") for s in c["setup_commands"]]),
         "pip pins"),
        (lambda c: c["available_node_types"]["gpu_t4_spot"]["resources"].pop("GPU"), "declares no GPUs"),
        (lambda c: c["available_node_types"]["head"]["resources"].__setitem__("GPU", 1), "GPU: 0"),
        (lambda c: c["available_node_types"]["gpu_t4_spot"]["node_config"].pop("InstanceMarketOptions"),
         "spot"),
        (lambda c: c.__setitem__("head_start_ray_commands", [
            s.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
            for s in c["head_start_ray_commands"]]), "0.0.0.0"),
        (lambda c: c["docker"]["run_options"].append("-p 8265:8265"), "publishes"),
        (lambda c: c["provider"].__setitem__("security_group", {"IpPermissions": [
            {"FromPort": 5000, "ToPort": 5000, "IpProtocol": "tcp",
             "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}), "to the world"),
    ],
    ids=["old-ray", "ray-ml", "pip-pin", "no-gpu", "gpu-head", "no-spot", "dashboard-public",
         "docker-publish", "sg-open"],
)
def test_kdray_rules_reject(tmp_path: Path, edit, expected: str) -> None:
    bad = _mutated(tmp_path, "aws-gpu.yaml", edit)
    problems = check_cluster_file(bad, ray.__version__)
    assert any(expected in p for p in problems), problems
