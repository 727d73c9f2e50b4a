#!/usr/bin/env bash
# Runs eventsyncd with the shipped config.toml against a local MongoDB-compatible server.
#     scripts/run-local.sh [eventsyncd args]
# If EVENTSYNC__MONGODB__URI is set, uses that server. Otherwise, if nothing answers on
# 127.0.0.1:27017, starts the nx-27017 test server there (installed into .venv-test on
# first use, data under .testenv/local-db). Once the daemon is ready it prints where the
# sync API, the OpenAPI document and the metrics are, and a curl command that fetches
# the events. Ctrl-C stops everything it started.
#
# Environment: the daemon's own overrides (EVENTSYNC__SYNC__LISTEN, EVENTSYNC__OPS__LISTEN,
# EVENTSYNC__MONGODB__URI, …) are honoured; RUN_LOCAL_PROFILE=dev builds in debug mode
# (default: release).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
server_pid=""
daemon_pid=""
cleanup() {
    local rc=$?
    if [ -n "$daemon_pid" ]; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "${EVENTSYNC__MONGODB__URI:-}" ] && ! (exec 3<>/dev/tcp/127.0.0.1/27017) 2>/dev/null; then
    mkdir -p .testenv/local-db
    scripts/testenv/launch_server.sh 27017 "$PWD/.testenv/local-db" </dev/null > .testenv/local-server.log 2>&1 &
    server_pid=$!
    for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/27017) 2>/dev/null && break; sleep 0.2; done
    echo "started a local nx-27017 server on 127.0.0.1:27017 (log: .testenv/local-server.log)" >&2
fi

profile="${RUN_LOCAL_PROFILE:-release}"
case "$profile" in
    release) cargo build --release --bin eventsyncd; bin="${CARGO_TARGET_DIR:-target}/release/eventsyncd" ;;
    dev) cargo build --bin eventsyncd; bin="${CARGO_TARGET_DIR:-target}/debug/eventsyncd" ;;
    *) echo "RUN_LOCAL_PROFILE must be release or dev" >&2; exit 2 ;;
esac

# Where the ports are: the environment overrides config.toml (both as in the daemon).
toml_listen() {
    awk -v s="[$1]" '$0 == s { on = 1; next } /^\[/ { on = 0 }
        on && $1 == "listen" { gsub(/"/, "", $3); print $3; exit }' config.toml
}
sync_addr="${EVENTSYNC__SYNC__LISTEN:-$(toml_listen sync)}"
ops_addr="${EVENTSYNC__OPS__LISTEN:-$(toml_listen ops)}"
sync_addr="${sync_addr/0.0.0.0/127.0.0.1}"
ops_addr="${ops_addr/0.0.0.0/127.0.0.1}"
stream="$(awk '/^\[\[streams\]\]/ { on = 1; next } /^\[/ { on = 0 }
    on && $1 == "database" { gsub(/"/, "", $3); db = $3 }
    on && $1 == "collection" { gsub(/"/, "", $3); print db "." $3; exit }' config.toml)"

"$bin" --config config.toml "$@" &
daemon_pid=$!
started=$SECONDS
until curl -fsS "http://$ops_addr/readyz" >/dev/null 2>&1; do
    kill -0 "$daemon_pid" 2>/dev/null || { wait "$daemon_pid" || exit $?; exit 1; }
    if [ $((SECONDS - started)) -eq 30 ]; then
        echo "run-local: not ready after 30 s; see the log above and curl http://$ops_addr/readyz" >&2
    fi
    sleep 0.2
done
auth=""
if [ -n "${EVENTSYNC__SYNC__TOKENS:-}" ]; then auth=" -H \"Authorization: Bearer \${EVENTSYNC__SYNC__TOKENS%%,*}\""; fi
cat >&2 <<EOF

eventsync is ready ($((SECONDS - started)) s after start):
  sync API   http://$sync_addr/v1        (OpenAPI: http://$sync_addr/v1/openapi.json)
  metrics    http://$ops_addr/metrics     (health: /healthz, readiness: /readyz)
  stream     $stream
Fetch every event of the stream:
  curl -s$auth -X POST http://$sync_addr/v1/sync/missing -H 'content-type: application/json' -d '{"vector": {"streams": [{"stream": "$stream", "position": 0}]}}'
Follow it live (Server-Sent Events):
  curl -sN$auth http://$sync_addr/v1/streams/$stream/live

EOF
wait "$daemon_pid"
