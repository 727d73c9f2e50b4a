#!/usr/bin/env bash
# Runs eventsyncd with the shipped config.toml against a local MongoDB-compatible server.
# If nothing answers on 127.0.0.1:27017, starts the nx-27017 test server there (installed
# into .venv-test on first use, data under .testenv/local-db). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
server_pid=""
if ! (exec 3<>/dev/tcp/127.0.0.1/27017) 2>/dev/null; then
    mkdir -p .testenv/local-db
    scripts/testenv/launch_server.sh 27017 "$PWD/.testenv/local-db" > .testenv/local-server.log 2>&1 &
    server_pid=$!
    for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/27017) 2>/dev/null && break; sleep 0.2; done
    echo "started a local nx-27017 server on 127.0.0.1:27017 (log: .testenv/local-server.log)" >&2
fi
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true; }
trap cleanup EXIT
cargo run --release --bin eventsyncd -- --config config.toml "$@"
