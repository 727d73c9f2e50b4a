#!/usr/bin/env bash
# Runs scripts/example.sh (the seed scenario) and checks that it succeeds, explains the
# two patches it prints, and stops the test server it started.
#
#   bash scripts/ci/check_example.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
die() { printf 'check_example: FAIL: %s\n' "$*" >&2; exit 1; }
OUT="$(mktemp "${TMPDIR:-/tmp}/eventsync-example.XXXXXX")"
trap 'rm -f "$OUT"' EXIT
rc=0
env -u EVENTSYNC_TEST_MONGODB_URI scripts/example.sh >"$OUT" 2>&1 || rc=$?
out="$(cat "$OUT")"
[ "$rc" -eq 0 ] || { cat "$OUT" >&2; die "scripts/example.sh exited $rc"; }
[[ "$out" == *"seed scenario OK"* ]] || { cat "$OUT" >&2; die "the scenario did not finish"; }
[[ "$out" == *"the thin client's patch of this write (stamp left out)"* && "$out" == *"plus the stamp's changes"* ]] \
    || { cat "$OUT" >&2; die "the output does not say why the client's and the daemon's patches differ"; }
[[ "$out" =~ test\ server\ \(pid\ ([0-9]+)\) ]] || { cat "$OUT" >&2; die "no test server pid in the output"; }
pid="${BASH_REMATCH[1]}"
[[ "$out" == *"stopped the test server (pid $pid)"* ]] || die "example.sh did not say it stopped the server"
if kill -0 "$pid" 2>/dev/null; then die "the test server (pid $pid) is still running"; fi
printf 'check_example: ok (server pid %s stopped)\n' "$pid" >&2
