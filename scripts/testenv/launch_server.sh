#!/usr/bin/env bash
# launch_server.sh PORT [DBPATH]
# Runs one nx-27017 server (through nx_launcher.py) on 127.0.0.1:PORT in the
# foreground (exec: the caller's child pid is the server; SIGTERM/SIGKILL it
# to stop).  Without DBPATH the data is in memory; with DBPATH it persists in
# that directory (one SQLite file per database; created if missing), so a
# server restarted on the same DBPATH keeps data and change-stream history.
# Installs the test venv first if it is missing (output on stderr).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 PORT [DBPATH]" >&2
    exit 2
fi
PORT="$1"
ensure_venv
storage_args "${2:-}"
exec "$VENV/bin/python" "$LAUNCHER" "${STORAGE_ARGS[@]}" --host 127.0.0.1 -p "$PORT"
