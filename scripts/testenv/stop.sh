#!/usr/bin/env bash
# stop.sh: stops the server that start.sh started (if any).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PIDFILE="$STATE/server.pid"
[ -f "$PIDFILE" ] || exit 0
PID="$(cat "$PIDFILE")"
if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null && grep -q nx_launcher "/proc/$PID/cmdline" 2>/dev/null; then
    kill "$PID" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$PID" 2>/dev/null && kill -9 "$PID" 2>/dev/null || true
    echo "testenv: stopped nx-27017 (pid $PID)" >&2
fi
rm -f "$PIDFILE" "$STATE/uri"
