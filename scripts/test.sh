#!/usr/bin/env bash
# Runs the whole test suite: starts the MongoDB-compatible test server (unless
# EVENTSYNC_TEST_MONGODB_URI already names one, e.g. a real `mongod --replSet`),
# then every test. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
set -o pipefail
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
mkdir -p .testenv
log=.testenv/test-output.log
: > "$log"
cargo test --all-targets "$@" 2>&1 | tee -a "$log"
cargo test --doc 2>&1 | tee -a "$log"
# The thin client builds and passes its tests without the daemon's dependencies.
cargo test --no-default-features --features client --test diff_props 2>&1 | tee -a "$log"
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
echo "cargo tests: $passed passed, $failed failed"
