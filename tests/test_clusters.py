"""Offline checks of clusters/*.yaml: Ray's own config validation plus kdray's rules.

kdray's rules (see clusters/README.md):
  * Ray is pinned, in images and pip installs, to exactly the installed Ray version, and no
    deprecated rayproject/ray-ml image is used;
  * cloud files: a head node type without GPUs, GPU worker types that declare their GPUs with
    min/max workers, at least one spot/preemptible type; on-prem: the local provider and a head
    started without GPUs;
  * every node installs kdray; the head runs MLflow with a persistent store;
  * nothing listens publicly: the dashboard binds 127.0.0.1, MLflow never 0.0.0.0, no port
    published by Docker, no security-group rule open to the world but SSH;
  * Ray's token authentication is on: every `ray start` runs with RAY_AUTH_MODE=token, login shells
    too, and the token (~/.ray/auth_token) and MLflow's credentials (~/.mlflow/credentials) come
    to every node through file_mounts from files outside the repository, never written into a
    cluster file; MLflow on the head runs behind basic auth (`kdray-head.sh start`);
  * Ray's ports are open to the cluster's own hosts only: on AWS the security group Ray makes for
    the cluster, spelt out in provider.security_group (Ray's name for it, no extra rule, no
    SecurityGroupIds), with the inbound rules the header lists equal to those Ray's own
    `_create_default_inbound_rules` writes; on GCP a network tag on every node and the firewall
    rules the file documents for it; on-prem an iptables chain naming exactly head_ip and
    worker_ips (its rules are checked by a dry run of `kdray-head.sh firewall`);
  * the on-prem SSH key is the cluster's own: `ray up` copies auth.ssh_private_key to the head as
    ~/ray_bootstrap_key.pem, so it must not be a personal default key (~/.ssh/id_ed25519, ...) nor
    lie inside the repository, and the header says how it is made (`ssh-keygen -f` that file).
What only a real cloud account can check (instance types, images, quotas, IAM) is listed in
clusters/README.md.
"""

from __future__ import annotations

import ast
import ipaddress
import itertools
import os
import re
import shlex
import subprocess
import sys
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
# Where Ray reads its token when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set, and where
# MLflow's clients read their user and password (mlflow.utils.credentials)
RAY_TOKEN = "~/.ray/auth_token"
MLFLOW_CREDENTIALS = "~/.mlflow/credentials"
GCP_TAG = "kdray-gcp"
# The TCP ports `kdray-head.sh firewall` closes to everything but the cluster's hosts, besides the
# ephemeral range (5000: MLflow; 6379: GCS; 8076: object manager; 8265: dashboard; 10001-19999:
# Ray client server and worker ports)
FIREWALL_PORTS = {"5000", "6379", "8076", "8265", "10001:19999"}
# The key files ssh(1) tries by default, i.e. a user's personal keys: never a cluster's key, which
# `ray up` copies to the head as ~/ray_bootstrap_key.pem
PERSONAL_KEYS = {"id_rsa", "id_dsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk",
                 "id_xmss", "identity"}
RAY_AWS_CONFIG = Path(ray.__file__).parent / "autoscaler" / "_private" / "aws" / "config.py"


def ray_aws_inbound_rules(extra: list[dict], own_group: str = "sg-self") -> list[dict]:
    """The inbound rules Ray writes into the security group it makes for an AWS cluster, from the
    installed Ray's own functions (ray/autoscaler/_private/aws/config.py imports boto3, which
    kdray does not need: the three pure functions are taken from its source)."""
    wanted = {"_create_default_inbound_rules", "_create_default_intracluster_inbound_rules",
              "_create_default_ssh_inbound_rules"}
    tree = ast.parse(RAY_AWS_CONFIG.read_text())
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {f.name for f in funcs} == wanted, "Ray's AWS provider changed: check the security group"
    ns: dict = {"itertools": itertools}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(RAY_AWS_CONFIG), "exec"), ns)
    return ns["_create_default_inbound_rules"]({own_group}, extra)


def describe_aws_rules(perms: list[dict], group_name: str, own_group: str = "sg-self") -> set[tuple[str, str]]:
    """(what, from) for each source of each IpPermission, as the header of aws-gpu.yaml writes them."""
    out = set()
    for perm in perms:
        proto, lo, hi = str(perm.get("IpProtocol")), perm.get("FromPort"), perm.get("ToPort")
        if proto == "-1":
            what = "all protocols, all ports"
        else:
            what = f"{proto} {lo}" if lo == hi else f"{proto} {lo}-{hi}"
        for pair in perm.get("UserIdGroupPairs", []):
            gid = pair.get("GroupId")
            out.add((what, f"the group itself ({group_name})" if gid == own_group else f"group {gid}"))
        out |= {(what, r["CidrIp"]) for r in perm.get("IpRanges", [])}
        out |= {(what, r["CidrIpv6"]) for r in perm.get("Ipv6Ranges", [])}
    return out


def documented_aws_rules(raw: str) -> set[tuple[str, str]]:
    """The `#   inbound: WHAT  from: SOURCE` lines of a file's comments."""
    return {(m.group(1), m.group(2)) for m in re.finditer(
        r"^#\s+inbound:\s+(.+?)\s+from:\s+(.+?)\s*$", raw, flags=re.M)}


def comment_text(raw: str) -> str:
    return "\n".join(ln.lstrip()[1:] for ln in raw.splitlines() if ln.lstrip().startswith("#"))


def key_problems(cfg: dict, raw: str) -> list[str]:
    """The SSH key `ray up` copies to the head: the cluster's own, never a personal one."""
    problems = []
    key = (cfg.get("auth") or {}).get("ssh_private_key")
    if not key:
        if cfg["provider"]["type"] == "local":
            problems.append("no auth.ssh_private_key: the local provider needs the cluster's own key")
        return problems
    if Path(key).name in PERSONAL_KEYS:
        problems.append(f"auth.ssh_private_key {key} is a personal key: `ray up` copies it to the head "
                        "as ~/ray_bootstrap_key.pem; use a key made for the cluster")
    if _in_repo(key):
        problems.append(f"auth.ssh_private_key {key} is inside the repository (./clusters goes to every node)")
    comments = comment_text(raw)
    made = re.findall(r"ssh-keygen\b[^\n]*?\s-f\s+(\S+)", comments)
    if made != [key] or "ray_bootstrap_key.pem" not in comments:
        problems.append(f"the header does not say why and how the cluster key is made "
                        f"(ssh-keygen ... -f {key}, ~/ray_bootstrap_key.pem); it has {made}")
    return problems


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


def gcp_firewall_rules(raw: str) -> list[dict]:
    """The `gcloud compute firewall-rules create` commands written in a file's comments, as
    {"name": ..., "--flag": value} (continuation lines joined)."""
    lines = [ln.lstrip("#").strip() for ln in raw.splitlines() if ln.lstrip().startswith("#")]
    joined, cur = [], ""
    for ln in lines:
        cur = f"{cur} {ln.rstrip(chr(92)).strip()}" if cur else ln.rstrip(chr(92)).strip()
        if not ln.endswith(chr(92)):
            joined.append(cur)
            cur = ""
    rules = []
    for cmd in joined:
        if "gcloud compute firewall-rules create" not in cmd:
            continue
        words = shlex.split(cmd[cmd.index("gcloud compute firewall-rules create"):])
        rule = {"name": words[4]}
        for w in words[5:]:
            key, _, value = w.partition("=")
            rule[key] = value
        rules.append(rule)
    return rules


def _gcp_rule_problems(cfg: dict, raw: str) -> list[str]:
    """Every node carries the tag; the documented rules admit the world on SSH only and the
    tagged VMs on everything, and deny the rest before the default network's allow rules."""
    problems = []
    for name, nt in (cfg.get("available_node_types") or {}).items():
        tags = ((nt.get("node_config") or {}).get("tags") or {}).get("items") or []
        if GCP_TAG not in tags:
            problems.append(f"{name}: node_config.tags lacks {GCP_TAG} (the firewall rules' target)")
    rules = [r for r in gcp_firewall_rules(raw) if r.get("--target-tags") == GCP_TAG]
    prio = lambda r: int(r.get("--priority", 1000))  # noqa: E731 - gcloud's default
    allows = [r for r in rules if r.get("--action", "").upper() == "ALLOW" or "--allow" in r]
    denies = [r for r in rules if r.get("--action", "").upper() == "DENY"]
    for r in rules:
        if r.get("--direction", "INGRESS").upper() != "INGRESS":
            problems.append(f"firewall rule {r['name']} is not an INGRESS rule")
    cluster = [r for r in allows if r.get("--source-tags") == GCP_TAG and "--source-ranges" not in r]
    deny_all = [r for r in denies if r.get("--rules") == "all" and r.get("--source-ranges") == "0.0.0.0/0"]
    if not cluster:
        problems.append(f"no firewall rule admits the cluster's own VMs (--source-tags={GCP_TAG})")
    if not deny_all:
        problems.append(f"no firewall rule denies everything else to --target-tags={GCP_TAG}")
    for r in allows:
        if r in cluster:
            continue
        if r.get("--rules", r.get("--allow")) != "tcp:22":
            problems.append(f"firewall rule {r['name']} admits {r.get('--rules')} from beyond the cluster")
    for d in deny_all:
        if not 0 <= prio(d) < 65534:  # the default network's allow rules have priority 65534
            problems.append(f"firewall rule {d['name']} does not take precedence over default-allow-*")
        for a in allows:
            if prio(a) >= prio(d):  # at equal priority a deny wins
                problems.append(f"firewall rule {a['name']} comes after the deny rule {d['name']}")
    networks = {r.get("--network", "default") for r in rules}
    if len(networks) > 1:
        problems.append(f"the firewall rules are on different networks: {sorted(networks)}")
    return problems


def firewall_hosts(cmds: list[str]) -> list[set[str]] | None:
    """The host lists of the `kdray-head.sh firewall HOST...` commands (None without one)."""
    found = []
    for c in cmds:
        m = re.search(r"kdray-head\.sh firewall((?:\s+[0-9A-Fa-f.:]+)+)\s*$", c.strip())
        if m:
            found.append(set(m.group(1).split()))
    return found or None


def check_cluster_file(path: Path, ray_version: str) -> list[str]:
    """kdray's rules for one cluster file; returns the list of problems (empty when fine)."""
    problems: list[str] = []
    raw = path.read_text()
    cfg = yaml.safe_load(raw)
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
        if perm.get("FromPort") == 22 and perm.get("ToPort") == 22:
            continue
        if cidrs & PUBLIC_CIDRS:
            problems.append(f"security group opens {perm} to the world")
        else:
            problems.append(f"security group opens {perm} beyond the cluster's own nodes")

    # -- Ray token authentication and MLflow's credentials ---------------------------------------
    setup_cmds = cfg.get("setup_commands") or []
    for remote, what in ((RAY_TOKEN, "Ray's token"), (MLFLOW_CREDENTIALS, "MLflow's credentials")):
        src = mounts.get(remote)
        if not src:
            problems.append(f"file_mounts do not ship {what} to {remote}")
        elif not (src.startswith("~/") or os.path.isabs(src)) or _in_repo(src):
            problems.append(f"{what} come from {src!r}: keep secrets outside the repository")
    for c in cmds:
        m = re.search(r"\bray start\b", c)
        if m and not re.search(r"\bRAY_AUTH_MODE=token\b", c[: m.start()]):
            problems.append(f"`ray start` without RAY_AUTH_MODE=token before it: {c!r}")
    if not any(re.search(r"RAY_AUTH_MODE=token", c) and "~/.bashrc" in c for c in setup_cmds):
        problems.append("setup_commands do not turn token authentication on for login shells")
    if not any(re.search(r"test -s ~/\.ray/auth_token\b", c) for c in setup_cmds):
        problems.append("setup_commands do not check that Ray's token reached the node")
    if re.search(r"RAY_AUTH_TOKEN\w*\s*[=:]|RAY_AUTH_MODE\s*=\s*(?!token)|MLFLOW_TRACKING_PASSWORD"
                 r"|MLFLOW_AUTH_ADMIN_PASSWORD|mlflow_tracking_password|https?://[^/\s:@]+:[^/\s@]+@",
                 text):
        problems.append("the file sets a token or password itself, points Ray at another token, "
                        "or turns authentication off")

    # -- Ray's ports: open to the cluster's own hosts only ---------------------------------------------
    if provider == "aws":
        for name, nt in (cfg.get("available_node_types") or {}).items():
            if "SecurityGroupIds" in (nt.get("node_config") or {}):
                problems.append(f"{name}: SecurityGroupIds replaces the security group Ray makes for the cluster")
        sg = cfg["provider"].get("security_group") or {}
        group = sg.get("GroupName")
        if group is None or not isinstance(sg.get("IpPermissions"), list):
            problems.append("provider.security_group is not spelt out (GroupName and IpPermissions)")
        elif group != f"ray-autoscaler-{cfg.get('cluster_name')}":
            problems.append(f"security_group.GroupName {group!r}: a group not made for this cluster alone")
        else:
            ray_rules = describe_aws_rules(ray_aws_inbound_rules(sg["IpPermissions"]), group)
            said = documented_aws_rules(raw)
            if said != ray_rules:
                problems.append(f"the header's inbound rules differ from what Ray writes into {group}: "
                                f"header {sorted(said)}, Ray {sorted(ray_rules)}")
    elif provider == "gcp":
        problems += _gcp_rule_problems(cfg, raw)
    elif provider == "local":
        hosts = {cfg["provider"].get("head_ip"), *(cfg["provider"].get("worker_ips") or [])}
        lists = firewall_hosts(setup_cmds)
        if not lists:
            problems.append("setup_commands do not run `kdray-head.sh firewall` with the cluster's hosts")
        for got in lists or []:
            if got != hosts:
                problems.append(f"the firewall admits {sorted(got)}, the cluster's hosts are {sorted(hosts)}")
        if lists and not re.search(r"kdray-head\.sh firewall", setup_cmds[0]):
            problems.append("the firewall is not the first setup command")
    else:
        problems.append(f"no port rules known for provider {provider!r}")

    # -- the SSH key ray up copies to the head -----------------------------------------------------
    problems += key_problems(cfg, raw)
    return problems


def _in_repo(src: str) -> bool:
    path = Path(os.path.expanduser(src)) if src.startswith("~") else Path(src)
    if not path.is_absolute():
        path = CLUSTERS.parent / path
    return path.resolve().is_relative_to(CLUSTERS.parent.resolve())


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
    server = text[text.index("mlflow server --host"):]
    server = server[: server.index("&\n")]
    if "--app-name basic-auth" not in server:
        problems.append("kdray-head.sh: MLflow is not started behind basic auth (--app-name basic-auth)")
    if "--backend-store-uri" in server:
        problems.append("kdray-head.sh: the backend URL (and any password in it) on MLflow's command line")
    for var in ("MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_BACKEND_STORE_URI"):
        if not re.search(rf'{var}="\$\w+"', text):
            problems.append(f"kdray-head.sh: the MLflow server gets no {var} from a variable")
    if "auth_enforced" not in text[text.index("\nstart)"):]:
        problems.append("kdray-head.sh: `start` does not check that MLflow refuses requests without credentials")
    return problems


def head_script(*args: str, tmp_path: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run kdray-head.sh with HOME and KDRAY_STATE in tmp_path and this venv's python first on PATH."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KDRAY_", "MLFLOW_", "RAY_AUTH"))}
    base.update(HOME=str(home), KDRAY_STATE=str(tmp_path / "state"),
                PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    base.update(env or {})
    return subprocess.run(["bash", str(HEAD_SCRIPT), *args], env=base, capture_output=True, text=True,
                          check=check, timeout=60)


def firewall_verdict(rules: list[list[str]], src: str, dport: int, iface: str = "eth0") -> str:
    """What the KDRAY-RAY chain does with a new TCP connection (SYN): DROP, or RETURN (left to
    the machine's other rules)."""
    for r in rules:
        words, opts = r[3:], {}  # after "<ipt> -A CHAIN"; --syn is the one option without a value
        while words:
            key = words.pop(0)
            opts[key] = True if key == "--syn" else words.pop(0)
        if "-i" in opts and opts["-i"] != iface:
            continue
        if "-s" in opts and ipaddress.ip_address(src) not in ipaddress.ip_network(opts["-s"]):
            continue
        if "--dport" in opts:
            lo, _, hi = opts["--dport"].partition(":")
            if not int(lo) <= dport <= int(hi or lo):
                continue
        return opts["-j"]
    return "RETURN"


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


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_token_auth_and_port_rules(path: Path) -> None:
    """The security rules, spelt out per file (check_cluster_file enforces them too)."""
    cfg = load(path)
    mounts = cfg["file_mounts"]
    assert mounts[RAY_TOKEN] and mounts[MLFLOW_CREDENTIALS]
    assert not _in_repo(mounts[RAY_TOKEN]) and not _in_repo(mounts[MLFLOW_CREDENTIALS])
    starts = [c for c in all_commands(cfg) if "ray start" in c]
    assert len(starts) == 2 and all("export RAY_AUTH_MODE=token;" in c for c in starts), starts
    provider = cfg["provider"]
    if provider["type"] == "aws":
        # Ray's own group for this cluster, spelt out, with no rule of ours: Ray writes two
        group = f"ray-autoscaler-{cfg['cluster_name']}"
        assert provider["security_group"] == {"GroupName": group, "IpPermissions": []}
        assert all("SecurityGroupIds" not in nt["node_config"] for nt in cfg["available_node_types"].values())
        rules = {("all protocols, all ports", f"the group itself ({group})"), ("tcp 22", "0.0.0.0/0")}
        assert describe_aws_rules(ray_aws_inbound_rules([]), group) == rules
        assert documented_aws_rules(path.read_text()) == rules
    elif provider["type"] == "gcp":
        rules = {r["name"]: r for r in gcp_firewall_rules(path.read_text())}
        assert rules["kdray-gcp-allow-cluster"]["--source-tags"] == GCP_TAG
        assert rules["kdray-gcp-deny-others"]["--action"] == "DENY"
        assert rules["kdray-gcp-allow-ssh"]["--rules"] == "tcp:22"
    else:
        assert firewall_hosts(cfg["setup_commands"]) == [{provider["head_ip"], *provider["worker_ips"]}]


def test_ray_writes_aws_rules_only_into_an_empty_group() -> None:
    """What aws-gpu.yaml and the README say of Ray 2.58's AWS provider, in its source: the rules go
    into a group only when it has none (so a narrowed SSH rule survives later `ray up`s), and the
    extra IpPermissions are added to the two default rules, never in place of them."""
    src = RAY_AWS_CONFIG.read_text()
    upsert = src[src.index("def _upsert_security_group_rules"):src.index("def _update_inbound_rules")]
    assert "if not sg.ip_permissions:" in upsert
    extra = {"FromPort": 443, "ToPort": 443, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}
    rules = ray_aws_inbound_rules([extra])
    assert len(rules) == 3 and rules[-1] == extra
    assert {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]} in rules


def test_onprem_uses_a_dedicated_cluster_key() -> None:
    """`ray up` copies auth.ssh_private_key to the head as ~/ray_bootstrap_key.pem: onprem.yaml names
    a key made for the cluster, never the user's own, and the file and the README say why and how
    it is made and installed."""
    path = CLUSTERS / "onprem.yaml"
    raw = path.read_text()
    key = load(path)["auth"]["ssh_private_key"]
    assert key == "~/.ssh/kdray-cluster"
    assert Path(key).name not in PERSONAL_KEYS and not _in_repo(key)
    assert key_problems(load(path), raw) == []
    readme = (CLUSTERS / "README.md").read_text()
    for text in (comment_text(raw), readme):
        assert "ray_bootstrap_key.pem" in text
        assert f"ssh-keygen -t ed25519 -N '' -C kdray-cluster -f {key}" in text
        assert f"ssh-copy-id -i {key}.pub" in text
    assert "id_ed25519" not in yaml.safe_dump(load(path))
    # the cloud files name no key: Ray makes one per cluster (~/.ssh/ray-autoscaler_*)
    assert all("ssh_private_key" not in load(f)["auth"] for f in CLOUD)


def test_head_script() -> None:
    assert head_script_problems() == []
    subprocess.run(["bash", "-n", str(HEAD_SCRIPT)], check=True)


def test_head_script_env(tmp_path: Path) -> None:
    """`kdray-head.sh env` writes the URIs the sweep's driver inherits, and no secret."""
    (tmp_path / "home" / ".mlflow").mkdir(parents=True)
    (tmp_path / "home" / ".mlflow" / "credentials").write_text(
        "[mlflow]\nmlflow_tracking_username = kdray\nmlflow_tracking_password = pw-never-written-1\n")
    (tmp_path / "home" / ".ray").mkdir()
    (tmp_path / "home" / ".ray" / "auth_token").write_text("ray-token-never-written")
    out = head_script("env", tmp_path=tmp_path, env={"KDRAY_HEAD_IP": "10.1.2.3"})
    env = (tmp_path / "state" / "kdray.env").read_text()
    assert "MLFLOW_TRACKING_URI=http://10.1.2.3:5000" in env, out.stdout
    assert f"KDRAY_OPTUNA_STORAGE=sqlite:///{tmp_path}/state/optuna.db" in env
    for secret in ("pw-never-written-1", "ray-token-never-written"):
        assert secret not in env + out.stdout + out.stderr


def test_head_script_refuses_a_password_in_the_optuna_url(tmp_path: Path) -> None:
    out = head_script("env", tmp_path=tmp_path, check=False,
                      env={"KDRAY_OPTUNA_STORAGE": "postgresql://kd:s3cret-pw@db.internal/optuna"})
    assert out.returncode != 0
    assert "s3cret-pw" not in out.stdout + out.stderr and "kd:***@db.internal" in out.stderr
    assert not (tmp_path / "state" / "kdray.env").exists()


def test_head_script_start_refuses_a_password_in_the_backend_url(tmp_path: Path) -> None:
    out = head_script("start", tmp_path=tmp_path, check=False, env={
        "KDRAY_HEAD_IP": "127.0.0.1", "KDRAY_MLFLOW_BACKEND": "postgresql://kd:s3cret-pw@db.internal/mlflow"})
    assert out.returncode != 0 and "kd:***@db.internal" in out.stderr
    assert "s3cret-pw" not in out.stdout + out.stderr
    assert not (tmp_path / "state" / "mlflow.pgid").exists()


def test_head_script_masks_the_backend_password(tmp_path: Path) -> None:
    """Log lines show the MLflow backend URL with its password masked (nothing listens on the
    port: `status` only reports)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = head_script("status", tmp_path=tmp_path, check=False, env={
        "KDRAY_HEAD_IP": "127.0.0.1", "KDRAY_MLFLOW_PORT": str(port),
        "KDRAY_MLFLOW_BACKEND": "postgresql://kd:s3cret-pw@db.internal/mlflow"})
    assert out.returncode == 1 and "not answering" in out.stdout
    assert "kd:***@db.internal/mlflow" in out.stdout and "s3cret-pw" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    "content, expected",
    [(None, "no MLflow credentials"),
     ("[mlflow]\nmlflow_tracking_username = kdray\nmlflow_tracking_password = short-pw\n", "unusable"),
     ("[other]\nmlflow_tracking_username = kdray\n", "unusable")],
    ids=["missing", "short-password", "no-section"],
)
def test_head_script_start_needs_credentials(tmp_path: Path, content, expected: str) -> None:
    """MLflow never starts without usable credentials, and the password is never echoed."""
    if content is not None:
        (tmp_path / "home" / ".mlflow").mkdir(parents=True)
        (tmp_path / "home" / ".mlflow" / "credentials").write_text(content)
    out = head_script("start", tmp_path=tmp_path, check=False, env={"KDRAY_HEAD_IP": "127.0.0.1"})
    assert out.returncode != 0 and expected in out.stderr, out.stderr
    assert "short-pw" not in out.stdout + out.stderr
    assert not (tmp_path / "state" / "mlflow.pgid").exists()  # nothing was started


def test_head_script_firewall_rules(tmp_path: Path) -> None:
    """The on-prem firewall (dry run: the iptables commands it would run): Ray's and MLflow's
    ports take new connections from loopback and the named hosts only; SSH and other ports are
    left alone; the chain only drops and is jumped to first from INPUT."""
    hosts = ["192.168.1.10", "192.168.1.11", "fd00::12"]
    out = head_script("firewall", *hosts, tmp_path=tmp_path, env={"KDRAY_FIREWALL_DRY_RUN": "1"})
    cmds = [line.split() for line in out.stdout.splitlines()]
    assert out.stderr == "" and cmds and all(c[0] in ("iptables", "ip6tables") for c in cmds), out.stdout
    eph = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
    for ipt, own in (("iptables", hosts[:2]), ("ip6tables", hosts[2:])):
        mine = [c for c in cmds if c[0] == ipt]
        assert mine[0] == [ipt, "-N", "KDRAY-RAY"] and mine[-1] == [ipt, "-I", "INPUT", "1", "-j", "KDRAY-RAY"]
        rules = mine[1:-1]
        assert all(r[1:3] == ["-A", "KDRAY-RAY"] and r[-1] in ("RETURN", "DROP") for r in rules), rules
        assert {r[r.index("-s") + 1] for r in rules if "-s" in r} == set(own)
        dropped = {r[r.index("--dport") + 1] for r in rules if r[-1] == "DROP"}
        assert dropped == FIREWALL_PORTS | {f"{eph}:65535"}
        assert all("--syn" in r and "tcp" in r for r in rules if r[-1] == "DROP")
        outsider, member = ("203.0.113.9", own[0]) if ipt == "iptables" else ("2001:db8::9", own[0])
        for port in (5000, 6379, 8076, 8265, 10001, 15000, 19999, int(eph), 52365, 65535):
            assert firewall_verdict(rules, outsider, port) == "DROP", (ipt, port)
            assert firewall_verdict(rules, member, port) == "RETURN", (ipt, port)
            assert firewall_verdict(rules, outsider, port, iface="lo") == "RETURN", (ipt, port)
        for port in (22, 80, 443, 2049):
            assert firewall_verdict(rules, outsider, port) == "RETURN", (ipt, port)


def test_head_script_firewall_needs_hosts(tmp_path: Path) -> None:
    out = head_script("firewall", tmp_path=tmp_path, check=False, env={"KDRAY_FIREWALL_DRY_RUN": "1"})
    assert out.returncode == 2 and "usage" in out.stderr


# -- the checks catch what they claim to catch ---------------------------------------------------


def _comments(name: str) -> str:
    return "".join(ln for ln in (CLUSTERS / name).read_text().splitlines(keepends=True)
                   if ln.lstrip().startswith("#"))


def _mutated(tmp_path: Path, name: str, edit) -> Path:
    """A copy of a cluster file with `edit` applied to its YAML (its comments, which hold the GCP
    firewall rules, kept)."""
    cfg = load(CLUSTERS / name)
    edit(cfg)
    out = tmp_path / name
    out.write_text(_comments(name) + yaml.safe_dump(cfg))
    return out


def _mutated_text(tmp_path: Path, name: str, old: str, new: str) -> Path:
    text = (CLUSTERS / name).read_text()
    assert old in text, old
    out = tmp_path / name
    out.write_text(text.replace(old, new))
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


def _no_auth_mode(cmds: list[str]) -> list[str]:
    return [c.replace("export RAY_AUTH_MODE=token;", "") for c in cmds]


ALL = ("aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml")
AUTH_AND_PORT_MUTATIONS = [
    # token authentication, in every file
    *[(f, lambda c: c["file_mounts"].pop(RAY_TOKEN), "Ray's token") for f in ALL],
    *[(f, lambda c: c.__setitem__("worker_start_ray_commands", _no_auth_mode(c["worker_start_ray_commands"])),
       "without RAY_AUTH_MODE=token") for f in ALL],
    *[(f, lambda c: c.__setitem__("head_start_ray_commands", _no_auth_mode(c["head_start_ray_commands"])),
       "without RAY_AUTH_MODE=token") for f in ALL],
    ("onprem.yaml", lambda c: c["setup_commands"].__setitem__(
        3, c["setup_commands"][3].replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled")), "login shells"),
    ("gcp-gpu.yaml", lambda c: c["setup_commands"].pop(0), "reached the node"),
    ("aws-gpu.yaml", lambda c: c["file_mounts"].__setitem__(RAY_TOKEN, "./clusters/auth_token"),
     "outside the repository"),
    ("gcp-gpu.yaml", lambda c: c["file_mounts"].pop(MLFLOW_CREDENTIALS), "MLflow's credentials"),
    ("onprem.yaml", lambda c: c["worker_start_ray_commands"].append("RAY_AUTH_TOKEN=abc123 ray status"),
     "token or password"),
    ("aws-gpu.yaml", lambda c: c["head_setup_commands"].append("export MLFLOW_TRACKING_PASSWORD=hunter2hunter2"),
     "token or password"),
    # ports
    ("aws-gpu.yaml", lambda c: c["available_node_types"]["gpu_t4_spot"]["node_config"].__setitem__(
        "SecurityGroupIds", ["sg-0123"]), "SecurityGroupIds"),
    ("aws-gpu.yaml", lambda c: c["provider"].__setitem__("security_group", {"IpPermissions": [
        {"FromPort": 6379, "ToPort": 6379, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}]}),
     "beyond the cluster"),
    ("aws-gpu.yaml", lambda c: c["provider"].__setitem__("security_group", {"GroupName": "shared-sg"}),
     "GroupName"),
    ("gcp-gpu.yaml", lambda c: c["available_node_types"]["gpu_t4_spot"]["node_config"].pop("tags"), GCP_TAG),
    ("onprem.yaml", lambda c: c["setup_commands"].pop(0), "kdray-head.sh firewall"),
    ("onprem.yaml", lambda c: c["provider"]["worker_ips"].append("192.168.1.13"), "the firewall admits"),
    ("onprem.yaml", lambda c: c["setup_commands"].append(c["setup_commands"].pop(0)), "first setup command"),
    ("aws-gpu.yaml", lambda c: c["provider"].pop("security_group"), "not spelt out"),
    ("aws-gpu.yaml", lambda c: c["provider"]["security_group"]["IpPermissions"].append(
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "UserIdGroupPairs": [{"GroupId": "sg-0123"}]}),
     "header's inbound rules differ"),
    ("aws-gpu.yaml", lambda c: c.__setitem__("cluster_name", "kdray-other"), "GroupName"),
    # the SSH key ray up copies to the head
    *[("onprem.yaml", lambda c, k=k: c["auth"].__setitem__("ssh_private_key", k), "personal key")
      for k in ("~/.ssh/id_ed25519", "~/.ssh/id_rsa", "/home/me/.ssh/id_ecdsa", "~/.ssh/id_dsa")],
    ("onprem.yaml", lambda c: c["auth"].__setitem__("ssh_private_key", "./clusters/kdray-cluster"),
     "inside the repository"),
    ("onprem.yaml", lambda c: c["auth"].pop("ssh_private_key"), "no auth.ssh_private_key"),
    ("onprem.yaml", lambda c: c["auth"].__setitem__("ssh_private_key", "~/.ssh/other-cluster-key"),
     "how the cluster key is made"),
    ("aws-gpu.yaml", lambda c: c["auth"].__setitem__("ssh_private_key", "~/.ssh/id_ed25519"), "personal key"),
]


@pytest.mark.parametrize("name, edit, expected", AUTH_AND_PORT_MUTATIONS,
                         ids=[f"{i}-{m[0]}-{m[2][:24]}" for i, m in enumerate(AUTH_AND_PORT_MUTATIONS)])
def test_auth_and_port_rules_reject(tmp_path: Path, name: str, edit, expected: str) -> None:
    bad = _mutated(tmp_path, name, edit)
    problems = check_cluster_file(bad, ray.__version__)
    assert any(expected in p for p in problems), problems


GCP_RULE_MUTATIONS = [
    ("--priority=1000 --action=DENY", "--priority=65535 --action=DENY", "precedence over default-allow"),
    ("--action=DENY --rules=all", "--action=DENY --rules=tcp:6379", "denies everything else"),
    ("--source-tags=kdray-gcp", "--source-ranges=10.128.0.0/9", "cluster's own VMs"),
    ("--rules=tcp:22 --source-ranges=0.0.0.0/0", "--rules=tcp:22,tcp:8265 --source-ranges=0.0.0.0/0",
     "from beyond the cluster"),
    ("kdray-gcp-allow-ssh --network=default --direction=INGRESS \\\n#     --priority=900",
     "kdray-gcp-allow-ssh --network=default --direction=INGRESS \\\n#     --priority=1000", "comes after"),
]


@pytest.mark.parametrize("old, new, expected", GCP_RULE_MUTATIONS, ids=[m[2] for m in GCP_RULE_MUTATIONS])
def test_gcp_firewall_rules_reject(tmp_path: Path, old: str, new: str, expected: str) -> None:
    bad = _mutated_text(tmp_path, "gcp-gpu.yaml", old, new)
    problems = check_cluster_file(bad, ray.__version__)
    assert any(expected in p for p in problems), problems


TEXT_MUTATIONS = [
    # the header of aws-gpu.yaml lists the rules Ray writes, all of them and no other
    ("aws-gpu.yaml", "#   inbound: tcp 22                    from: 0.0.0.0/0\n", "", "header's inbound rules differ"),
    ("aws-gpu.yaml", "from: 0.0.0.0/0\n", "from: 203.0.113.0/24\n", "header's inbound rules differ"),
    ("aws-gpu.yaml", "#   inbound: tcp 22 ", "#   inbound: tcp 8265 ", "header's inbound rules differ"),
    # onprem.yaml says why its key is not yours, and how it is made
    ("onprem.yaml", "~/ray_bootstrap_key.pem", "the head", "how the cluster key is made"),
    ("onprem.yaml", "-f ~/.ssh/kdray-cluster\n", "-f ~/.ssh/id_ed25519\n", "how the cluster key is made"),
]


@pytest.mark.parametrize("name, old, new, expected", TEXT_MUTATIONS,
                         ids=[f"{i}-{m[0]}" for i, m in enumerate(TEXT_MUTATIONS)])
def test_header_rules_reject(tmp_path: Path, name: str, old: str, new: str, expected: str) -> None:
    bad = _mutated_text(tmp_path, name, old, new)
    problems = check_cluster_file(bad, ray.__version__)
    assert any(expected in p for p in problems), problems
