#!/usr/bin/env bash
# Checks scripts/test.sh itself with one deliberately failing test
# (tests/daemon_config.rs harness_selftest_fails_with_a_daemon_in_scope, armed by
# EVENTSYNC_HARNESS_SELFTEST): every test binary still runs, the closing line
# `cargo tests: N passed, M failed` is printed with M >= 1, the exit status is non-zero,
# the failure shows the daemon's log, and no temporary directory is left behind.
# Only the tests whose name contains "harness" run, so it takes seconds once built.
#
#   bash scripts/ci/check_test_sh.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
. scripts/testenv/lib.sh   # ensure_venv, free_ports

log() { printf 'check_test_sh: %s\n' "$*" >&2; }
die() { printf 'check_test_sh: FAIL: %s\n' "$*" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/eventsync-check-test-sh.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/tmp"

# The shell helper hands out distinct ports.
ensure_venv
ports="$(free_ports 50)"
[ "$(tr ' ' '\n' <<<"$ports" | sort -u | wc -l)" -eq 50 ] || die "free_ports 50 repeated a port: $ports"

rc=0
TMPDIR="$WORK/tmp" EVENTSYNC_HARNESS_SELFTEST="$WORK/report" EVENTSYNC_TEST_LOG="$WORK/test-output.log" \
    scripts/test.sh -- harness >"$WORK/out.txt" 2>&1 || rc=$?
out="$(cat "$WORK/out.txt")"
show() { tail -n 60 "$WORK/out.txt" >&2; }

[ "$rc" -ne 0 ] || { show; die "scripts/test.sh exited 0 although a test failed"; }
closing="$(tail -n 1 "$WORK/out.txt")"
[[ "$closing" =~ ^cargo\ tests:\ [0-9]+\ passed,\ ([0-9]+)\ failed$ ]] \
    || { show; die "the last line is not the closing count: $closing"; }
[ "${BASH_REMATCH[1]}" -ge 1 ] || { show; die "the closing line counts no failure: $closing"; }
# Binaries after the failing one ran (cargo runs tests/*.rs in name order).
for later in tests/ops_readiness.rs tests/fault_network.rs "Doc-tests eventsync"; do
    [[ "$out" == *"$later"* ]] || { show; die "$later did not run after the failure"; }
done
[[ "$out" == *"--- eventsyncd (pid"* && "$out" == *"pipeline.batch_size"* ]] \
    || { show; die "the failing test did not show its daemon's log"; }
left="$(find "$WORK/tmp" -mindepth 1 -maxdepth 1 | head -n 5 || true)"
[ -z "$left" ] || die "temporary files left behind: $left"
log "ok: $closing (exit $rc), every binary ran, the daemon's log was shown, nothing left in TMPDIR"
