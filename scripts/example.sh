#!/usr/bin/env bash
# Runs the seed scenario example (examples/seed_scenario.rs) with one command:
#     scripts/example.sh
# Starts a private nx-27017 test server on a free port (unless EVENTSYNC_TEST_MONGODB_URI
# names a server to use), builds eventsyncd, runs the example (which starts the daemon
# itself), and stops everything it started when it ends, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/testenv/lib.sh   # ensure_venv, free_ports, ping_uri

server_pid=""
cleanup() {
    local rc=$?
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        echo "example: stopped the test server (pid $server_pid)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "${EVENTSYNC_TEST_MONGODB_URI:-}" ]; then
    ensure_venv
    read -r port <<<"$(free_ports 1)"
    mkdir -p .testenv
    scripts/testenv/launch_server.sh "$port" </dev/null >.testenv/example-server.log 2>&1 &
    server_pid=$!
    EVENTSYNC_TEST_MONGODB_URI="mongodb://127.0.0.1:$port/?directConnection=true"
    for _ in $(seq 150); do
        ping_uri "$EVENTSYNC_TEST_MONGODB_URI" && break
        kill -0 "$server_pid" 2>/dev/null || { cat .testenv/example-server.log >&2; exit 1; }
        sleep 0.2
    done
    echo "example: test server (pid $server_pid) on $EVENTSYNC_TEST_MONGODB_URI" >&2
fi
export EVENTSYNC_TEST_MONGODB_URI
cargo build --quiet --bin eventsyncd
cargo run --quiet --example seed_scenario
