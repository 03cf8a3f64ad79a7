#!/usr/bin/env bash
# A fake autoscaling Ray cluster on this machine (cluster/local.yaml), for trying the
# autoscaler and the service's elastic population without a cloud account.
#
#   cluster/local.sh start    start the head (2 CPUs) with the fake autoscaler
#   cluster/local.sh status   `ray status` of that cluster (fake worker nodes show up here)
#   cluster/local.sh stop     stop every process of that cluster, then check none is left
#
# Then, from another shell (start prints the exact lines):
#   export RAY_ADDRESS=<printed address> RAY_AUTH_MODE=token
#   python -c "import ray; ray.init(); from ray.autoscaler.sdk import request_resources; \
#              request_resources(num_cpus=5)"      # 2 on the head + 3 fake 1-CPU workers
#   es-service submit --address http://127.0.0.1:8265 configs/quick.yaml
#
# A job's run directory is under the head's results root: $ES_RESULTS_ROOT as set when
# `start` runs (the head's processes and job drivers inherit it), else ~/es-service-runs.
#
# How it differs from a bare `ray start` / `ray stop` (both of which still work):
# * The head runs with its own --temp-dir (default /tmp/ray-es-local) instead of /tmp/ray,
#   so a plain `ray.init()` elsewhere on this machine (tests, another checkout) keeps
#   starting its own private instance instead of silently joining this cluster.
# * Every process of the cluster is started inside one new process group (session) whose
#   id is kept in a state file; `stop` signals that group and the processes descended from
#   it (Ray workers, job drivers), in `ray stop`'s order: raylets, then the rest, then
#   gcs_server; SIGKILL after a grace period. It never touches other Ray clusters on the
#   machine, which `ray stop` would (it kills every Ray process of the user by name).
# * Token authentication is on (RAY_AUTH_MODE=token). The token is ~/.ray/auth_token (or
#   $RAY_AUTH_TOKEN_PATH), created by `ray get-auth-token --generate` with mode 0600 if
#   missing; clients on this machine use the same file, with RAY_AUTH_MODE=token set
#   (ray.init() also picks it up by itself). A token file others can read is reported.
#
# Environment knobs: ES_LOCAL_HEAD_CPUS (2), ES_LOCAL_TEMP_DIR (/tmp/ray-es-local),
# ES_LOCAL_DASHBOARD_PORT (8265), ES_LOCAL_GCS_PORT (6379, which the fake provider assumes;
# another port is written into a copy of local.yaml in the temp dir as provider.gcs_address),
# ES_LOCAL_CLIENT_PORT (10001, the Ray client server), ES_LOCAL_AGENT_PORT (0 = any free port),
# ES_LOCAL_STOP_GRACE_S (10), ES_LOCAL_STATE (state file), RAY (the ray CLI to use).
# Needs bash >= 4 (mapfile) and a POSIX `ps`.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
CONFIG="$HERE/local.yaml"
HEAD_CPUS="${ES_LOCAL_HEAD_CPUS:-2}"
TEMP_DIR="${ES_LOCAL_TEMP_DIR:-/tmp/ray-es-local}"
DASHBOARD_PORT="${ES_LOCAL_DASHBOARD_PORT:-8265}"
GCS_PORT="${ES_LOCAL_GCS_PORT:-6379}"
CLIENT_PORT="${ES_LOCAL_CLIENT_PORT:-10001}"
# The dashboard agent's HTTP port (Ray's default is a fixed 52365, which a second Ray
# instance on the same machine can't bind, and then job submission fails with "No
# available agent to submit job"); 0 = any free port, as the fake worker nodes use.
AGENT_PORT="${ES_LOCAL_AGENT_PORT:-0}"
GRACE_S="${ES_LOCAL_STOP_GRACE_S:-10}"
STATE="${ES_LOCAL_STATE:-${TMPDIR:-/tmp}/es-local-cluster-$(id -u).state}"

if [[ -n "${RAY:-}" ]]; then
    :
elif [[ -x "$REPO/.venv/bin/ray" ]]; then
    RAY="$REPO/.venv/bin/ray"
elif command -v ray >/dev/null 2>&1; then
    RAY="$(command -v ray)"
else
    echo "local.sh: no 'ray' CLI found (create .venv with 'make install', or set RAY=...)" >&2
    exit 2
fi
PYTHON="$(dirname "$RAY")/python"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"

# Token authentication on for everything this script runs.
export RAY_AUTH_MODE=token

die() { echo "local.sh: $*" >&2; exit 1; }

# --- state file: PGID=..., ADDRESS=..., TEMP_DIR=... ---------------------------------
read_state() {
    PGID="" ADDRESS="" STATE_TEMP_DIR=""
    [[ -f "$STATE" && -O "$STATE" ]] || return 1
    local key value
    while IFS='=' read -r key value; do  # parsed, not sourced: it lives in a shared /tmp
        case "$key" in
            PGID) [[ "$value" =~ ^[0-9]+$ ]] && PGID="$value" ;;
            ADDRESS) ADDRESS="$value" ;;
            TEMP_DIR_USED) STATE_TEMP_DIR="$value" ;;
        esac
    done <"$STATE"
    [[ -n "$PGID" ]]
}

# PIDs of the cluster: members of its process group plus all their descendants (Ray
# puts job drivers and some workers in process groups of their own).
cluster_pids() {
    local pgid="$1"
    ps -A -o pid= -o ppid= -o pgid= | awk -v g="$pgid" '
        { pid[NR]=$1; ppid[NR]=$2; grp[NR]=$3; if ($3 == g) mark[$1]=1 }
        END {
            do { added=0
                 for (i in pid) if (!(pid[i] in mark) && (ppid[i] in mark)) { mark[pid[i]]=1; added=1 }
            } while (added)
            for (p in mark) print p
        }'
}

# Ray processes (binaries or modules of the ray package) that name the cluster's temp dir
# on their command line: a second net for anything that escaped the process group. A
# `tail -f $TEMP_DIR/...` of yours does not match.
temp_dir_pids() {
    local dir="$1"
    [[ -n "$dir" ]] || return 0
    ps -A -o pid= -o args= | awk -v d="$dir" '
        index($0, d) > 0 && (index($0, "/ray/") > 0 || index($0, "ray::") > 0) \
            && $2 != "awk" { print $1 }'
}

# cluster_pids, but only if that process group still holds a Ray process of the cluster's
# temp dir: after a crash and a long time, the group id could belong to someone else.
our_pids() {
    local pids p
    pids="$(cluster_pids "$PGID")"
    [[ -n "$pids" ]] || return 0
    for p in $(temp_dir_pids "$STATE_TEMP_DIR"); do
        if grep -qx "$p" <<<"$pids"; then
            echo "$pids"
            return 0
        fi
    done
}

alive() {  # list the given pids that still exist and are not zombies
    local p st
    for p in "$@"; do
        st="$(ps -o stat= -p "$p" 2>/dev/null || true)"
        [[ -n "$st" && "$st" != Z* ]] && echo "$p"
    done
    return 0
}

wait_gone() {  # wait_gone SECONDS PID... ; returns 0 when all are gone
    local deadline=$((SECONDS + $1)); shift
    while (( SECONDS < deadline )); do
        [[ -z "$(alive "$@")" ]] && return 0
        sleep 0.5
    done
    [[ -z "$(alive "$@")" ]]
}

term_and_wait() {  # term_and_wait SECONDS PID...: SIGTERM, then wait up to SECONDS
    local seconds="$1"; shift
    (( $# )) || return 0
    kill -TERM "$@" 2>/dev/null || true
    wait_gone "$seconds" "$@" || true
}

cmd_start() {
    if read_state; then
        if [[ -n "$(our_pids)" ]]; then
            die "already running (process group $PGID, address $ADDRESS); '$0 stop' first"
        fi
        rm -f "$STATE"
    fi
    mkdir -p "$TEMP_DIR"
    # Make sure a token exists (no-op when it is already there). Ray writes it with the
    # process umask: 077 keeps it (and a new ~/.ray) private to this user.
    (umask 077 && "$RAY" get-auth-token --generate >/dev/null 2>&1) || die "could not create an auth token"
    local token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" mode
    mode="$(stat -c %a "$token_file" 2>/dev/null || stat -f %Lp "$token_file" 2>/dev/null || true)"
    if [[ -n "$mode" && "$mode" != 600 && "$mode" != 400 ]]; then
        echo "local.sh: warning: the auth token $token_file has mode $mode (others may read it): chmod 600 $token_file" >&2
    fi

    local config="$CONFIG"
    if [[ "$GCS_PORT" != 6379 ]]; then
        # The fake provider connects its nodes to <node ip>:6379 unless the config names the GCS.
        config="$TEMP_DIR/local-autoscaling.yaml"
        "$PYTHON" - "$CONFIG" "$config" "$GCS_PORT" <<'PY' || die "could not write $config"
import sys, yaml
from ray._private.services import get_node_ip_address
source, target, port = sys.argv[1:]
data = yaml.safe_load(open(source))
data["provider"]["gcs_address"] = f"{get_node_ip_address()}:{port}"
with open(target, "w") as f:
    yaml.safe_dump(data, f)
PY
    fi

    local log pgid_file
    log="$(mktemp "${TMPDIR:-/tmp}/es-local-start.XXXXXX")"
    pgid_file="$(mktemp "${TMPDIR:-/tmp}/es-local-pgid.XXXXXX")"
    # Start `ray start` as the leader of a new session, so that every process it and the
    # fake autoscaler spawn shares one process-group id that `stop` can signal.
    if ! "$PYTHON" - "$pgid_file" env RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1 \
        "$RAY" start --head --num-cpus="$HEAD_CPUS" --autoscaling-config="$config" \
        --port="$GCS_PORT" --ray-client-server-port="$CLIENT_PORT" \
        --temp-dir="$TEMP_DIR" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --dashboard-agent-listen-port="$AGENT_PORT" --disable-usage-stats \
        >"$log" 2>&1 <<'PY'
import os, sys
pgid_file, argv = sys.argv[1], sys.argv[2:]
if os.getpgrp() == os.getpid():  # a group leader cannot call setsid(): fork first
    child = os.fork()
    if child:
        sys.exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
os.setsid()
with open(pgid_file, "w") as f:
    f.write(str(os.getpgrp()))
os.execvp(argv[0], argv)
PY
    then
        cat "$log" >&2
        local pg; pg="$(cat "$pgid_file" 2>/dev/null || true)"
        rm -f "$log" "$pgid_file"
        if [[ -n "$pg" ]]; then
            printf 'PGID=%s\nADDRESS=\nTEMP_DIR_USED=%s\n' "$pg" "$TEMP_DIR" >"$STATE"
            cmd_stop >/dev/null 2>&1 || true
        fi
        die "ray start failed (output above)"
    fi
    local pgid address
    pgid="$(cat "$pgid_file")"
    address="$(cat "$TEMP_DIR/ray_current_cluster" 2>/dev/null || true)"
    rm -f "$pgid_file" "$log"
    printf 'PGID=%s\nADDRESS=%s\nTEMP_DIR_USED=%s\n' "$pgid" "$address" "$TEMP_DIR" >"$STATE"
    cat <<EOF
Fake autoscaling cluster up: head with $HEAD_CPUS CPUs, up to 3 fake 1-CPU workers
(cluster/local.yaml), process group $pgid, temp dir $TEMP_DIR.
  export RAY_ADDRESS=$address RAY_AUTH_MODE=token
  python -c "import ray; ray.init(); from ray.autoscaler.sdk import request_resources; request_resources(num_cpus=5)"
  $0 status                         # watch fake nodes join, then leave when idle
  dashboard / job API: http://127.0.0.1:$DASHBOARD_PORT (token: ${RAY_AUTH_TOKEN_PATH:-~/.ray/auth_token})
  es-service submit --address http://127.0.0.1:$DASHBOARD_PORT configs/quick.yaml
  runs go to ${ES_RESULTS_ROOT:-~/es-service-runs}/<config>-<job id> (ES_RESULTS_ROOT when starting sets it)
  $0 stop
EOF
}

cmd_status() {
    read_state || { echo "not running (no state file $STATE)"; return 3; }
    local pids; pids="$(our_pids)"
    if [[ -z "$pids" ]]; then
        echo "not running (process group $PGID is gone; '$0 stop' cleans up)"
        return 3
    fi
    echo "process group $PGID: $(echo "$pids" | wc -l | tr -d ' ') processes; address $ADDRESS"
    "$RAY" status --address "$ADDRESS"
}

cmd_stop() {
    if ! read_state; then
        echo "not running (no state file $STATE)"
        return 0
    fi
    local -a all raylets=() gcs=() others=() left remaining
    mapfile -t all < <({ our_pids; temp_dir_pids "$STATE_TEMP_DIR"; } | sort -un)
    local p name share=$(( (GRACE_S + 2) / 3 ))
    for p in "${all[@]}"; do
        name="$(ps -o comm= -p "$p" 2>/dev/null || true)"
        case "$name" in
            raylet) raylets+=("$p") ;;
            gcs_server) gcs+=("$p") ;;
            "") ;;
            *) others+=("$p") ;;
        esac
    done
    # Same order as `ray stop`: raylets first (their agents fate-share with them), then
    # the rest, GCS last; each step gets a third of the grace period.
    term_and_wait "$share" "${raylets[@]}"
    term_and_wait "$share" "${others[@]}"
    term_and_wait "$share" "${gcs[@]}"
    # Whatever is still alive (including processes spawned meanwhile) gets SIGKILL.
    mapfile -t all < <({ printf '%s\n' "${all[@]}"; our_pids; temp_dir_pids "$STATE_TEMP_DIR"; } | sort -un)
    mapfile -t left < <(alive "${all[@]}")
    if (( ${#left[@]} )); then
        echo "SIGKILL to ${#left[@]} process(es) still alive after ${GRACE_S}s"
        kill -KILL "${left[@]}" 2>/dev/null || true
        wait_gone 5 "${left[@]}" || true
    fi
    # Verify: nothing of the group, its descendants or its temp dir is left.
    # shellcheck disable=SC2046  # one pid per word is what we want here
    mapfile -t remaining < <(alive "${all[@]}" $(our_pids) $(temp_dir_pids "$STATE_TEMP_DIR"))
    if (( ${#remaining[@]} )); then
        echo "local.sh: these processes of the cluster are still alive:" >&2
        ps -o pid=,pgid=,args= -p "$(IFS=,; echo "${remaining[*]}")" >&2 || true
        return 1
    fi
    # Forget the address, as `ray stop` does (only in the cluster's own temp dir).
    [[ -n "$STATE_TEMP_DIR" ]] && rm -f "$STATE_TEMP_DIR/ray_current_cluster"
    rm -f "$STATE"
    echo "stopped: no process of the cluster (process group $PGID, temp dir $STATE_TEMP_DIR) is left"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
