#!/usr/bin/env bash
# Services kdray runs on the Ray head node, used by every clusters/*.yaml (synced to
# ~/kdray-cluster/ by file_mounts).
#
#   kdray-head.sh env     write $KDRAY_STATE/kdray.env (MLFLOW_TRACKING_URI, KDRAY_OPTUNA_STORAGE);
#                         the cluster files `source` it before `ray start`, so every Ray job on
#                         the head (the sweep's driver) inherits it
#   kdray-head.sh start   start the MLflow tracking server (after `ray start --head`); it stops by
#                         itself when the Ray head stops (`ray stop`, `ray down`)
#   kdray-head.sh stop    stop it now
#   kdray-head.sh status  print the tracking URI and whether the server answers
#
# State lives in $KDRAY_STATE (default ~/kdray-state), on the head's persistent disk:
#   mlflow.db             MLflow backend store (sqlite), unless KDRAY_MLFLOW_BACKEND is set
#                         (e.g. postgresql://user:pw@host/db for a managed database)
#   mlflow-artifacts/     artifacts, served by the tracking server (--serve-artifacts)
#   optuna.db             Optuna study storage (sqlite), unless KDRAY_OPTUNA_STORAGE is set.
#                         Only the sweep's driver touches it: Ray Tune's OptunaSearch runs in the
#                         Tune driver process on the head, trials on workers never open it.
#
# Network: MLflow binds the head's cluster-internal address (workers log to it), never 0.0.0.0;
# from your laptop reach it through SSH port forwarding (see clusters/README.md).
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

case "${1:-}" in
env)
    mkdir -p "$STATE"
    cat > "$STATE/kdray.env" <<EOF
export MLFLOW_TRACKING_URI=$URI
export KDRAY_OPTUNA_STORAGE=$OPTUNA
EOF
    cat "$STATE/kdray.env"
    ;;
start)
    stop
    mkdir -p "$STATE/mlflow-artifacts"
    rm -f "$PIDFILE"
    # own session and process group, so `stop` (or the watchdog) takes every MLflow process
    setsid bash "$0" _serve > "$STATE/mlflow.log" 2>&1 < /dev/null &
    for _ in $(seq 240); do # at most ~120 s
        if [ -s "$PIDFILE" ] && answers; then
            echo "MLflow tracking server at $URI (backend $BACKEND)"
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
    mlflow server --host "$HEAD_IP" --port "$PORT" --workers "$WORKERS" \
        --backend-store-uri "$BACKEND" \
        --artifacts-destination "$STATE/mlflow-artifacts" --serve-artifacts &
    mlflow_pid=$!
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
    if answers; then echo "MLflow up at $URI"; else echo "MLflow not answering at $URI"; exit 1; fi
    ;;
*)
    echo "usage: $0 env|start|stop|status" >&2
    exit 2
    ;;
esac
