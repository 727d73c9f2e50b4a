#!/usr/bin/env bash
# Runs the whole test suite: starts the MongoDB-compatible test server (unless
# EVENTSYNC_TEST_MONGODB_URI already names one, e.g. a real `mongod --replSet`),
# then every test binary — all of them, also when one fails (--no-fail-fast).
# Usage: scripts/test.sh [extra cargo test args, e.g. --test api_sync]
#
# Always ends with the line `cargo tests: N passed, M failed` (also after a build error
# or an interrupt) and exits non-zero when anything failed. Tests write their temporary
# files under a private TMPDIR, removed at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .testenv
log="${EVENTSYNC_TEST_LOG:-.testenv/test-output.log}"   # the full output, for the count
: > "$log"
started=0
run_tmp="$(mktemp -d "${TMPDIR:-/tmp}/eventsync-test-run.XXXXXX")"
status=0

summary() {
    local rc=$?
    [ "$rc" -eq 0 ] || status=$rc
    # `|| true`: grep finds nothing when no test ran (a build error).
    passed=$( (grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" || true) | awk '{s+=$4} END {print s+0}')
    failed=$( (grep -Eo '[0-9]+ failed;' "$log" || true) | awk '{s+=$1} END {print s+0}')
    if [ "$status" -eq 0 ] && [ "$failed" -gt 0 ]; then status=1; fi
    if [ "$started" = 1 ]; then scripts/testenv/stop.sh >/dev/null 2>&1 || true; fi
    rm -rf "$run_tmp"
    echo "cargo tests: $passed passed, $failed failed"
    exit "$status"
}
trap summary EXIT
trap 'status=130; exit 130' INT TERM

if [ -z "${EVENTSYNC_TEST_MONGODB_URI:-}" ]; then
    eval "$(scripts/testenv/start.sh)"
    started=1
fi
export EVENTSYNC_TEST_MONGODB_URI
echo "test server: $EVENTSYNC_TEST_MONGODB_URI" >&2
# Temporary files of the tests (and of the daemons they start) go here.
export TMPDIR="$run_tmp"

# run CMD...: runs one cargo invocation, output to the terminal and the log; a failure
# is remembered and the next invocation runs anyway.
run() {
    local rc=0
    "$@" 2>&1 | tee -a "$log" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "scripts/test.sh: \`$*\` exited with $rc" | tee -a "$log" >&2
        status=1
    fi
}
run cargo test --no-fail-fast --all-targets "$@"
run cargo test --no-fail-fast --doc
# The thin client builds and passes its tests without the daemon's dependencies.
run cargo test --no-fail-fast --no-default-features --features client --test diff_props
