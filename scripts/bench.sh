#!/usr/bin/env bash
# Runs the benchmark: starts the MongoDB-compatible test server (unless
# EVENTSYNC_TEST_MONGODB_URI already names one, e.g. a real `mongod --replSet`),
# builds eventsyncd and eventsync-bench in release mode, and runs one measurement.
# Usage: scripts/bench.sh [eventsync-bench args, e.g. --docs 2000 --rate 1000 --out results.json]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The test server is left running (start.sh reuses it; stop it with scripts/testenv/stop.sh).
if [ -z "${EVENTSYNC_TEST_MONGODB_URI:-}" ]; then
    eval "$(scripts/testenv/start.sh)"
fi
export EVENTSYNC_TEST_MONGODB_URI
echo "server: $EVENTSYNC_TEST_MONGODB_URI" >&2
cargo build --release --bins
target/release/eventsync-bench "$@"
