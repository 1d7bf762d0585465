#!/usr/bin/env bash
# Services kdray runs on the Ray head node, used by every clusters/*.yaml (synced to
# ~/kdray-cluster/ by file_mounts), and the host firewall of the on-prem nodes.
#
#   kdray-head.sh env     write $KDRAY_STATE/kdray.env (MLFLOW_TRACKING_URI, KDRAY_OPTUNA_STORAGE);
#                         the cluster files `source` it before `ray start`, so every Ray job on
#                         the head (the sweep's driver) inherits it. It never holds a credential:
#                         a KDRAY_OPTUNA_STORAGE URL with a password is refused (use ~/.pgpass)
#   kdray-head.sh start   start the MLflow tracking server (after `ray start --head`) behind
#                         MLflow's basic authentication; it stops by itself when the Ray head
#                         stops (`ray stop`, `ray down`)
#   kdray-head.sh stop    stop it now
#   kdray-head.sh status  print the tracking URI and whether the server answers
#   kdray-head.sh firewall HOST_IP...
#                         (onprem.yaml, on every node) drop new TCP connections to Ray's and
#                         MLflow's ports unless they come over loopback or from one of the
#                         HOST_IPs, the cluster's own hosts. KDRAY_FIREWALL_DRY_RUN=1 prints the
#                         iptables commands instead of running them.
#
# State lives in $KDRAY_STATE (default ~/kdray-state), on the head's persistent disk:
#   mlflow.db             MLflow backend store (sqlite), unless KDRAY_MLFLOW_BACKEND is set
#                         (e.g. postgresql://user@host/db for a managed database; its password
#                         belongs in ~/.pgpass: `start` refuses a URL that holds one)
#   mlflow-artifacts/     artifacts, served by the tracking server (--serve-artifacts)
#   mlflow-auth.ini       MLflow's basic-auth configuration (MLFLOW_AUTH_CONFIG_PATH); no password
#   mlflow-auth.db        MLflow's user store, rebuilt at every `start` (see below)
#   optuna.db             Optuna study storage (sqlite), unless KDRAY_OPTUNA_STORAGE is set.
#                         Only the sweep's driver touches it: Ray Tune's OptunaSearch runs in the
#                         Tune driver process on the head, trials on workers never open it.
#
# MLflow credentials: ~/.mlflow/credentials (or $KDRAY_MLFLOW_CREDENTIALS), the INI file that
# MLflow's own clients read ([mlflow] mlflow_tracking_username, mlflow_tracking_password). The
# cluster files ship it from the laptop to every node (file_mounts), so the sweep's driver on the
# head and the trials on the workers authenticate with no variable or file that kdray writes.
# `start` makes that user MLflow's admin (MLFLOW_AUTH_ADMIN_USERNAME/_PASSWORD, set for the server
# process only) in a user store rebuilt at each start, so a new password takes effect at the next
# start (`ray up`). Nothing here prints the password or writes it to a file.
#
# Network: MLflow binds the head's cluster-internal address (workers log to it), never 0.0.0.0,
# and answers nothing but /health without the credentials; from your laptop reach it through
# SSH port forwarding (see clusters/README.md).
set -euo pipefail

STATE=${KDRAY_STATE:-$HOME/kdray-state}
PORT=${KDRAY_MLFLOW_PORT:-5000}
HEAD_IP=${KDRAY_HEAD_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}
HEAD_IP=${HEAD_IP:-127.0.0.1}
BACKEND=${KDRAY_MLFLOW_BACKEND:-sqlite:///$STATE/mlflow.db}
OPTUNA=${KDRAY_OPTUNA_STORAGE:-sqlite:///$STATE/optuna.db}
WORKERS=${KDRAY_MLFLOW_WORKERS:-2}
PIDFILE=$STATE/mlflow.pgid
URI="http://$HEAD_IP:$PORT"
CREDENTIALS=${KDRAY_MLFLOW_CREDENTIALS:-$HOME/.mlflow/credentials}
AUTH_INI=$STATE/mlflow-auth.ini
AUTH_DB=$STATE/mlflow-auth.db
# MLflow's background job runners (GenAI judges) take ~270 MB each and kdray needs none.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

ray_head_alive() {
    # the Ray head is up while its GCS server runs on this machine (bash builtins only: no
    # procps needed, no process spawned every 5 s)
    local f c
    for f in /proc/[0-9]*/comm; do
        { read -r c < "$f"; } 2> /dev/null || continue
        [ "$c" = gcs_server ] && return 0
    done
    return 1
}

answers() {
    python - "$URI" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/health", timeout=3).read()
except Exception:
    sys.exit(1)
EOF
}

mask() {
    # the URL with its password, if any, replaced by *** (for log lines)
    sed -E 's#(://[^/:@]*):[^/@]*@#\1:***@#' <<< "$1"
}

has_password() { [[ $1 =~ ://[^/:@]*:[^/@]*@ ]]; }

read_credentials() {
    # MLFLOW_USER and MLFLOW_PASSWORD from $CREDENTIALS, read the way MLflow's clients read it
    local out
    if [ ! -s "$CREDENTIALS" ]; then
        echo "kdray-head: no MLflow credentials at $CREDENTIALS: make them on your laptop, the" \
            "cluster file ships them to every node (clusters/README.md, step 0)" >&2
        return 1
    fi
    out=$(python - "$CREDENTIALS" <<'EOF'
import configparser, sys
c = configparser.ConfigParser()
c.read(sys.argv[1])
s = c["mlflow"] if c.has_section("mlflow") else {}
user, pw = s.get("mlflow_tracking_username", ""), s.get("mlflow_tracking_password", "")
if not user or len(pw) < 12 or "\n" in user + pw:
    sys.exit("needs [mlflow] with mlflow_tracking_username and a mlflow_tracking_password "
             "of 12 characters or more")
print(user)
print(pw)
EOF
) || { echo "kdray-head: unusable MLflow credentials file $CREDENTIALS" >&2; return 1; }
    { read -r MLFLOW_USER; read -r MLFLOW_PASSWORD; } <<< "$out"
}

auth_enforced() {
    # MLflow's API refuses a request without credentials (401) and takes ours (stdin: user, then
    # password, so neither shows on a command line). The script goes in with -c: a heredoc on
    # `python -` would take stdin, and the credentials piped in would never reach it.
    local script
    script=$(cat <<'EOF'
import base64, sys, urllib.error, urllib.request
url = sys.argv[1] + "/api/2.0/mlflow/experiments/search?max_results=1"
user, pw = sys.stdin.readline().rstrip("\n"), sys.stdin.readline().rstrip("\n")
try:
    urllib.request.urlopen(url, timeout=5)
    sys.exit("kdray-head: MLflow answers its API without credentials: authentication is off")
except urllib.error.HTTPError as exc:
    if exc.code != 401:
        sys.exit(f"kdray-head: MLflow answered HTTP {exc.code}, not 401, without credentials")
token = base64.b64encode(f"{user}:{pw}".encode()).decode()
req = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
try:
    urllib.request.urlopen(req, timeout=5).read()
except urllib.error.HTTPError as exc:
    sys.exit(f"kdray-head: MLflow refused the credentials of {user!r} (HTTP {exc.code})")
EOF
)
    python -c "$script" "$URI"
}

stop() {
    [ -f "$PIDFILE" ] || return 0
    local pg cmd
    pg=$(cat "$PIDFILE")
    # only our own group (the pid file sits on a persistent disk and may predate a reboot)
    cmd=$( { tr '\0' ' ' < "/proc/$pg/cmdline"; } 2> /dev/null || true)
    if [ -n "$pg" ] && [[ $cmd == *"kdray-head.sh _serve"* ]]; then
        kill -TERM -- "-$pg" 2> /dev/null || true
        for _ in $(seq 50); do
            kill -0 -- "-$pg" 2> /dev/null || break
            sleep 0.2
        done
        kill -KILL -- "-$pg" 2> /dev/null || true
    fi
    rm -f "$PIDFILE"
}

# -- on-prem host firewall ------------------------------------------------------------------------
FW_CHAIN=KDRAY-RAY

fw_ports() {
    # MLflow; Ray's GCS (6379), object manager where pinned (8076), dashboard (8265); the Ray
    # client server and worker ports (10001-19999, Ray's defaults); and everything from the
    # kernel's ephemeral range up to 65535, where Ray picks its other ports (raylet, object
    # manager, agents, metrics: a random port above one the kernel hands out) and where
    # torch.distributed and NCCL listen in the trials.
    local eph
    read -r eph _ < /proc/sys/net/ipv4/ip_local_port_range
    echo "$PORT 6379 8076 8265 10001:19999 $eph:65535"
}

fw_apply() {
    # fw_apply iptables|ip6tables [HOST_IP...]: the chain, rebuilt, and the jump to it from INPUT.
    # Its rules only ever drop (RETURN hands everything else back to the machine's own rules).
    local ipt=$1 h p
    shift
    local -a run=("$ipt" -w)
    [ "$(id -u)" = 0 ] || run=(sudo -n "$ipt" -w)
    if [ -n "${KDRAY_FIREWALL_DRY_RUN:-}" ]; then
        run=(echo "$ipt")
        "${run[@]}" -N "$FW_CHAIN"
    else
        command -v "$ipt" > /dev/null || {
            echo "kdray-head: $ipt not found: install iptables (clusters/README.md)" >&2
            exit 1
        }
        "${run[@]}" -N "$FW_CHAIN" 2> /dev/null || "${run[@]}" -F "$FW_CHAIN"
    fi
    "${run[@]}" -A "$FW_CHAIN" -i lo -j RETURN
    for h in "$@"; do
        "${run[@]}" -A "$FW_CHAIN" -s "$h" -j RETURN
    done
    for p in $(fw_ports); do
        "${run[@]}" -A "$FW_CHAIN" -p tcp --syn --dport "$p" -j DROP
    done
    if [ -n "${KDRAY_FIREWALL_DRY_RUN:-}" ]; then
        "${run[@]}" -I INPUT 1 -j "$FW_CHAIN"
    else
        "${run[@]}" -C INPUT -j "$FW_CHAIN" 2> /dev/null || "${run[@]}" -I INPUT 1 -j "$FW_CHAIN"
    fi
}

firewall() {
    [ "$#" -gt 0 ] || { echo "usage: $0 firewall HOST_IP..." >&2; exit 2; }
    PATH="$PATH:/usr/sbin:/sbin" # where iptables lives, off a non-root user's PATH on Debian
    local h
    local -a v4=() v6=()
    for h in "$@"; do
        if [[ $h == *:* ]]; then v6+=("$h"); else v4+=("$h"); fi
    done
    fw_apply iptables ${v4[@]+"${v4[@]}"}
    # with IPv6 on, the same ports, open over IPv6 only to the IPv6 hosts given (else: loopback)
    if [ -e /proc/net/if_inet6 ] || [ -n "${KDRAY_FIREWALL_DRY_RUN:-}" ]; then
        fw_apply ip6tables ${v6[@]+"${v6[@]}"}
    fi
    if [ -z "${KDRAY_FIREWALL_DRY_RUN:-}" ]; then
        echo "kdray-head: TCP ports $(fw_ports) open only to loopback and $*"
    fi
}

case "${1:-}" in
env)
    if has_password "$OPTUNA"; then
        echo "kdray-head: KDRAY_OPTUNA_STORAGE ($(mask "$OPTUNA")) holds a password, which would" \
            "land in kdray.env: give the URL without it and keep the password in ~/.pgpass" >&2
        exit 1
    fi
    mkdir -p "$STATE"
    cat > "$STATE/kdray.env" <<EOF
export MLFLOW_TRACKING_URI=$URI
export KDRAY_OPTUNA_STORAGE=$OPTUNA
EOF
    cat "$STATE/kdray.env"
    ;;
start)
    stop
    if has_password "$BACKEND"; then
        echo "kdray-head: KDRAY_MLFLOW_BACKEND ($(mask "$BACKEND")) holds a password, which MLflow" \
            "may log: give the URL without it and keep the password in ~/.pgpass" >&2
        exit 1
    fi
    read_credentials
    python -c "import flask_wtf; from mlflow.environment_variables import MLFLOW_AUTH_ADMIN_PASSWORD" ||
        {
            echo "kdray-head: this MLflow cannot run behind basic auth here: it needs the" \
                "mlflow[auth] extra (Flask-WTF) and MLFLOW_AUTH_ADMIN_PASSWORD (MLflow 3.17)" >&2
            exit 1
        }
    mkdir -p "$STATE/mlflow-artifacts"
    cat > "$AUTH_INI" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$AUTH_DB
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    rm -f "$AUTH_DB" # one user, kdray's, made again from the current credentials
    rm -f "$PIDFILE"
    # own session and process group, so `stop` (or the watchdog) takes every MLflow process
    setsid bash "$0" _serve > "$STATE/mlflow.log" 2>&1 < /dev/null &
    for _ in $(seq 240); do # at most ~120 s
        if [ -s "$PIDFILE" ] && answers; then
            if ! printf '%s\n%s\n' "$MLFLOW_USER" "$MLFLOW_PASSWORD" | auth_enforced; then
                stop
                exit 1
            fi
            echo "MLflow tracking server at $URI (backend $(mask "$BACKEND")," \
                "basic auth as $MLFLOW_USER)"
            exit 0
        fi
        sleep 0.5
    done
    echo "MLflow did not answer at $URI; last log lines:" >&2
    tail -n 30 "$STATE/mlflow.log" >&2 || true
    exit 1
    ;;
_serve)
    echo $$ > "$PIDFILE" # we are the process-group leader (setsid)
    read_credentials
    secret_key=$(python -c "import secrets; print(secrets.token_hex(32))")
    # The credentials and the backend URL reach the server through its environment only, not
    # its command line (which `ps` shows every user of the machine).
    MLFLOW_AUTH_CONFIG_PATH="$AUTH_INI" MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_USER" \
        MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_PASSWORD" MLFLOW_FLASK_SERVER_SECRET_KEY="$secret_key" \
        MLFLOW_BACKEND_STORE_URI="$BACKEND" \
        mlflow server --host "$HEAD_IP" --port "$PORT" --workers "$WORKERS" --app-name basic-auth \
        --artifacts-destination "$STATE/mlflow-artifacts" --serve-artifacts &
    mlflow_pid=$!
    unset MLFLOW_PASSWORD secret_key
    # watchdog: the server lives exactly as long as the Ray head (checks every 5 s)
    while kill -0 "$mlflow_pid" 2> /dev/null && ray_head_alive; do
        sleep 5
    done
    echo "kdray-head: Ray head gone or MLflow exited; stopping MLflow"
    rm -f "$PIDFILE"
    kill -TERM -- "-$$" 2> /dev/null || true
    ;;
stop)
    stop
    ;;
status)
    if answers; then
        echo "MLflow up at $URI (backend $(mask "$BACKEND"))"
    else
        echo "MLflow not answering at $URI (backend $(mask "$BACKEND"))"
        exit 1
    fi
    ;;
firewall)
    shift
    firewall "$@"
    ;;
*)
    echo "usage: $0 env|start|stop|status|firewall HOST_IP..." >&2
    exit 2
    ;;
esac
