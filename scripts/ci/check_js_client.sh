#!/usr/bin/env bash
# Builds and tests the TypeScript sync client (clients/js): unit tests (shared golden
# fixtures, reconnect/dedupe/gap logic), integration tests against eventsyncd and the test
# server (mixed load, kill -9, reload), and the browser test of the boss-raid demo in
# Debian's Chromium. Installs what it needs: Chromium (apt) and the npm packages (npm ci).
# Usage: bash scripts/ci/check_js_client.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
start=$(date +%s)

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
    echo "check_js_client: Node >= 20 is needed (found $(node --version))" >&2
    exit 1
fi
CHROMIUM_PATH="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM_PATH" ]; then
    echo "== installing Chromium (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
export CHROMIUM_PATH

echo "== build eventsyncd"
# Built the way the Rust integration tests build it (the same feature set as
# scripts/test.sh, so after it this is a no-op instead of a second compile of the deps).
cargo test --quiet --no-run --test golden_fixtures
export EVENTSYNC_BIN="$PWD/target/debug/eventsyncd"

started=0
if [ -z "${EVENTSYNC_TEST_MONGODB_URI:-}" ]; then
    eval "$(scripts/testenv/start.sh)"
    started=1
fi
export EVENTSYNC_TEST_MONGODB_URI
root="$PWD"
cleanup() { if [ "$started" = 1 ]; then "$root/scripts/testenv/stop.sh" >/dev/null 2>&1 || true; fi; }
trap cleanup EXIT

cd clients/js
echo "== npm ci and build"
npm ci --no-audit --no-fund --loglevel=error
npm run --silent build

log=$(mktemp)
run() {
    echo "== $1"
    shift
    # the node test runner exits non-zero on any failure; keep its summary for the total
    "$@" 2>&1 | tee -a "$log"
}
# --test-force-exit and --test-timeout: a failed assertion that leaves a client retrying
# must fail the run, not hang it
nt=(node --test --test-reporter=spec --test-force-exit --test-timeout=300000)
run "unit tests" "${nt[@]}" test/unit/
run "integration tests (eventsyncd + test server)" "${nt[@]}" --test-concurrency=1 test/integration/
run "browser test (Chromium, boss-raid demo)" "${nt[@]}" test/browser/
echo "== package size"
node scripts/size.mjs
if [ -f artifacts/latency.json ]; then echo "write → browser latency: $(tr -d '\n ' < artifacts/latency.json)"; fi
echo "screenshot: clients/js/artifacts/raid.png"
passed=$(grep -Eo '^ℹ pass [0-9]+' "$log" | awk '{s+=$3} END {print s+0}')
failed=$(grep -Eo '^ℹ fail [0-9]+' "$log" | awk '{s+=$3} END {print s+0}')
rm -f "$log"
echo "== check_js_client finished in $(( $(date +%s) - start )) s"
echo "js client tests: $passed passed, $failed failed"
[ "$failed" = 0 ]
