#!/usr/bin/env bash
# Start this project's processes by hand, on hosts without systemd units (a lab machine,
# nodes borrowed from a batch scheduler), like seed 001's launch_distributed.sh:
#
#   deploy/launch.sh head          on the head host: Redis (deploy/redis.conf) + a control worker
#   deploy/launch.sh workers N     on a worker host: N supervised workers, one per GPU
#                                  (GPUs 0..N-1), or N CPU workers on a host without GPUs
#   deploy/launch.sh status        the cluster's workers, from the registry
#   deploy/launch.sh stop          stop what this script started on this host
#
# Everything comes from the environment, nothing is assumed (a second cluster, or a
# test, runs on its own port):
#   REDIS_PASSWORD     head: required; Redis refuses clients without it
#   REDIS_PORT         head: default 6379
#   REDIS_BIND         head: addresses Redis listens on; default 127.0.0.1 (add the
#                      cluster network's address, e.g. "127.0.0.1 10.0.0.1")
#   ORCH_BROKER_URL    workers/status: redis://:PASSWORD@head:PORT/0 (head prints it)
#   ORCH_RESULTS_ROOT  where results go; the same shared path on every host
#   ACCEPT_GPU_RUNS=1  workers without GPUs also take runs that ask for a GPU
#   EXIT_WHEN_IDLE=S   workers leave after S seconds with no work (batch-scheduler nodes)
#   LAUNCH_DIR         pid files, generated config and logs
#                      (default ~/.local/state/orchestrator/launch)
#   ORCHESTRATOR       how to run the CLI (default `orchestrator`, else `python3 -m orchestrator`)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
launch_dir="${LAUNCH_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/orchestrator/launch}"
python="${PYTHON:-python3}"
if [[ -n "${ORCHESTRATOR:-}" ]]; then
    read -r -a orch <<<"$ORCHESTRATOR"
elif command -v orchestrator >/dev/null; then
    orch=(orchestrator)
else
    orch=("$python" -m orchestrator)
fi

die() { echo "launch.sh: $*" >&2; exit 2; }

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
    exit 2
}

# A password may contain URL-special characters: percent-encode it for the URL.
# (Passed through the environment, not argv, so `ps` never shows it.)
url_password() { PW="$1" "$python" -c 'import os, urllib.parse; print(urllib.parse.quote(os.environ["PW"], safe=""))'; }

redis_alive() { REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -p "$1" ping 2>/dev/null | grep -q PONG; }

start_head() {
    [[ -n "${REDIS_PASSWORD:-}" ]] || die "set REDIS_PASSWORD: the head's Redis never runs without a password"
    command -v redis-server >/dev/null || die "redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)"
    local port="${REDIS_PORT:-6379}" bind="${REDIS_BIND:-127.0.0.1}"
    local dir="$launch_dir/redis"
    mkdir -p "$dir"
    if [[ -f "$dir/redis.pid" ]] && kill -0 "$(cat "$dir/redis.pid")" 2>/dev/null; then
        die "Redis already runs (pid $(cat "$dir/redis.pid")); \`$0 stop\` first"
    fi
    # Our settings on top of deploy/redis.conf (persistence, no eviction, password): the
    # last value of a directive wins. The file holds the password, so only we read it;
    # quoted, with \ and " escaped, as Redis's config parser expects.
    local quoted="${REDIS_PASSWORD//\\/\\\\}"
    quoted="${quoted//\"/\\\"}"
    (umask 077; cat >"$dir/redis.conf" <<EOF
include $here/redis.conf
port $port
bind $bind
dir $dir
logfile $dir/redis.log
daemonize no
requirepass "$quoted"
EOF
    )
    redis-server "$dir/redis.conf" >>"$dir/redis.out" 2>&1 &
    echo $! >"$dir/redis.pid"
    for _ in $(seq 1 100); do
        redis_alive "$port" && break
        kill -0 "$(cat "$dir/redis.pid")" 2>/dev/null || { tail -5 "$dir/redis.out" "$dir/redis.log" >&2 || true; die "Redis did not start"; }
        sleep 0.1
    done
    redis_alive "$port" || die "Redis did not answer on port $port"
    echo "redis: pid $(cat "$dir/redis.pid"), port $port, data in $dir"

    export ORCH_BROKER_URL="redis://:$(url_password "$REDIS_PASSWORD")@127.0.0.1:$port/0"
    # The control worker runs supervised (restarted if it dies), like `workers` below.
    "${orch[@]}" workers up --gpus none --control --state-dir "$launch_dir/head"
    echo "on each worker host: export ORCH_BROKER_URL='redis://:<REDIS_PASSWORD>@$(hostname):$port/0'"
    echo "then: deploy/launch.sh workers N"
}

start_workers() {
    local n="${1:-}"
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "workers N: N must be a number >= 1, got '${n}'"
    [[ -n "${ORCH_BROKER_URL:-}" ]] || die "set ORCH_BROKER_URL=redis://:PASSWORD@head:PORT/0 (\`$0 head\` prints it)"
    local count
    count="$("${orch[@]}" gpus --json | "$python" -c 'import json, sys; print(len(json.load(sys.stdin)["gpus"]))')"
    local args=()
    if (( count > 0 )); then
        (( n <= count )) || die "workers $n: this host has only $count GPUs (one worker per GPU)"
        args=(--gpus "$(seq -s, 0 $((n - 1)))")
    else
        echo "no GPU on $(hostname): starting $n CPU workers"
        args=(--cpu "$n")
        if [[ "${ACCEPT_GPU_RUNS:-0}" == 1 ]]; then args+=(--accept-gpu-runs); fi
    fi
    if [[ -n "${EXIT_WHEN_IDLE:-}" ]]; then args+=(--exit-when-idle "$EXIT_WHEN_IDLE"); fi
    "${orch[@]}" workers up "${args[@]}" --state-dir "$launch_dir/workers"
}

status() {
    [[ -n "${ORCH_BROKER_URL:-}" ]] || die "set ORCH_BROKER_URL to see the cluster's workers"
    "${orch[@]}" workers list
}

stop_all() {
    # Workers first (each running run goes back to its queue), Redis last: it must still
    # be there to take those runs back.
    for part in workers head; do
        if [[ -d "$launch_dir/$part" ]]; then
            "${orch[@]}" workers down --state-dir "$launch_dir/$part"
        fi
    done
    local pidfile="$launch_dir/redis/redis.pid"
    if [[ -f "$pidfile" ]]; then
        local pid
        pid="$(cat "$pidfile")"
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"  # Redis flushes its append-only file, then exits
            for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && die "Redis (pid $pid) did not stop within 30 s"
            echo "redis: stopped (pid $pid)"
        fi
        rm -f "$pidfile"
    fi
}

case "${1:-}" in
    head) start_head ;;
    workers) start_workers "${2:-}" ;;
    status) status ;;
    stop) stop_all ;;
    *) usage ;;
esac
