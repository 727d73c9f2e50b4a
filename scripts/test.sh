#!/usr/bin/env bash
# Runs the whole test suite: starts the MongoDB-compatible test server (unless
# EVENTSYNC_TEST_MONGODB_URI already names one, e.g. a real `mongod --replSet`),
# then every test. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=0
if [ -z "${EVENTSYNC_TEST_MONGODB_URI:-}" ]; then
    eval "$(scripts/testenv/start.sh)"
    started=1
fi
export EVENTSYNC_TEST_MONGODB_URI
cleanup() { if [ "$started" = 1 ]; then scripts/testenv/stop.sh >/dev/null 2>&1 || true; fi; }
trap cleanup EXIT
echo "test server: $EVENTSYNC_TEST_MONGODB_URI" >&2
cargo test --all-targets "$@"
# The thin client builds without the daemon's dependencies.
cargo test --no-default-features --features client --lib --test diff_props
