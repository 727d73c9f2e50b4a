#!/usr/bin/env bash
# start.sh [--db-file DBPATH]
# Starts a MongoDB-compatible test server in the background (nx-27017 via
# nx_launcher.py, in memory unless --db-file is given: DBPATH is a directory,
# one SQLite file per database) and prints, on stdout only:
#     export EVENTSYNC_TEST_MONGODB_URI='mongodb://127.0.0.1:PORT/?directConnection=true'
# so callers can   eval "$(scripts/testenv/start.sh)".
# Idempotent: reuses the server it started before (state in $REPO/.testenv/)
# while it answers ping.  If EVENTSYNC_TEST_MONGODB_URI is already set, starts
# nothing and echoes it.  Stop with scripts/testenv/stop.sh.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

emit() { echo "export EVENTSYNC_TEST_MONGODB_URI=$(shell_quote "$1")"; }

if [ -n "${EVENTSYNC_TEST_MONGODB_URI:-}" ]; then
    emit "$EVENTSYNC_TEST_MONGODB_URI"
    exit 0
fi

DBPATH=""
while [ $# -gt 0 ]; do
    case "$1" in
        --db-file) DBPATH="${2:?--db-file needs a path}"; shift 2 ;;
        --db-file=*) DBPATH="${1#--db-file=}"; shift ;;
        *) echo "usage: $0 [--db-file DBPATH]" >&2; exit 2 ;;
    esac
done
[ -z "$DBPATH" ] || DBPATH="$(abs_path "$DBPATH")"

ensure_venv
PIDFILE="$STATE/server.pid"
URIFILE="$STATE/uri"
LOG="$STATE/server.log"

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null && grep -q nx_launcher "/proc/$1/cmdline" 2>/dev/null; }

exec 8>"$STATE/start.lock"
flock -w 120 8 || { echo "testenv: timed out waiting for start lock" >&2; exit 1; }

if [ -f "$PIDFILE" ] && [ -f "$URIFILE" ]; then
    OLDPID="$(cat "$PIDFILE")"
    OLDURI="$(cat "$URIFILE")"
    if alive "$OLDPID" && ping_uri "$OLDURI"; then
        emit "$OLDURI"
        exit 0
    fi
    alive "$OLDPID" && kill "$OLDPID" 2>/dev/null || true
    rm -f "$PIDFILE" "$URIFILE"
fi

storage_args "$DBPATH"
for attempt in 1 2 3; do
    PORT="$(free_port)"
    URI="mongodb://127.0.0.1:$PORT/?directConnection=true"
    # fd 8 (the start lock) must not stay open in the server
    (cd "$STATE" && exec "$VENV/bin/python" "$LAUNCHER" "${STORAGE_ARGS[@]}" \
        --host 127.0.0.1 -p "$PORT" </dev/null >"$LOG" 2>&1 8>&-) &
    PID=$!
    deadline=$((SECONDS + 30))
    while [ $SECONDS -lt $deadline ]; do
        if ! kill -0 "$PID" 2>/dev/null; then break; fi
        if ping_uri "$URI"; then
            echo "$PID" >"$PIDFILE"
            echo "$URI" >"$URIFILE"
            echo "testenv: nx-27017 (pid $PID) on $URI, log $LOG" >&2
            emit "$URI"
            exit 0
        fi
        sleep 0.2
    done
    if kill -0 "$PID" 2>/dev/null; then
        kill "$PID" 2>/dev/null || true
        echo "testenv: server did not answer ping within 30 s; log:" >&2
        cat "$LOG" >&2
        exit 1
    fi
    if ! grep -qi "address already in use" "$LOG"; then break; fi
    echo "testenv: port $PORT taken, retrying" >&2
done
echo "testenv: server exited; log:" >&2
cat "$LOG" >&2
exit 1
