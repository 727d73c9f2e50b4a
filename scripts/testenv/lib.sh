# Shared by start.sh / launch_server.sh (sourced, not executed).
# Everything here writes diagnostics to stderr only: stdout of start.sh is
# reserved for the `export ...` line.

TESTENV_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$TESTENV_DIR/../.." && pwd)"
VENV="$REPO/.venv-test"
STATE="$REPO/.testenv"
NX_VERSION="0.8.1"
LAUNCHER="$TESTENV_DIR/nx_launcher.py"

# Create $VENV with nx-27017 pinned, unless it is already there.
ensure_venv() {
    mkdir -p "$STATE"
    if venv_ok; then return 0; fi
    (
        # Concurrent callers (parallel tests) wait for one installer.
        flock -w 600 9 || { echo "testenv: timed out waiting for venv lock" >&2; exit 1; }
        if venv_ok; then exit 0; fi
        echo "testenv: installing nx-27017==$NX_VERSION into $VENV" >&2
        rm -rf "$VENV"
        "${PYTHON:-python3}" -m venv "$VENV" >&2 || exit 1
        "$VENV/bin/python" -m pip install --quiet "nx-27017==$NX_VERSION" >&2 || exit 1
        venv_ok || { echo "testenv: venv at $VENV is unusable after install" >&2; exit 1; }
    ) 9>"$STATE/venv.lock"
}

venv_ok() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$NX_VERSION" >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version
import nx_27017, pymongo  # noqa: F401
sys.exit(0 if version("nx-27017") == sys.argv[1] else 1)
PY
}

# Sets STORAGE_ARGS to the launcher arguments selecting the storage for PATH
# (empty: in memory).  PATH is a directory holding one SQLite file per
# database (created if missing), so databases stay isolated as in MongoDB.
# An existing regular file is used as a single-file db (all databases then
# share collections: a.x is b.x).
storage_args() {
    local path="$1"
    if [ -z "$path" ]; then
        STORAGE_ARGS=(--db memory)
    elif [ -f "$path" ]; then
        echo "testenv: $path is a file: single-file mode, databases share collections" >&2
        STORAGE_ARGS=(--db "$path")
    else
        mkdir -p "$path"
        STORAGE_ARGS=(--data-dir "$path")
    fi
}

abs_path() {
    case "$1" in
        /*) printf '%s' "$1" ;;
        *) printf '%s/%s' "$PWD" "$1" ;;
    esac
}

free_port() {
    free_ports 1
}

# free_ports N: N different free loopback ports on one line. All N sockets are bound
# before any is released, so the OS cannot hand out one port twice (two separate
# free_port calls can return the same port: a daemon's [sync] and [ops] then collide).
free_ports() {
    "$VENV/bin/python" - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# ping URI once (exit status)
ping_uri() {
    "$VENV/bin/python" - "$1" >/dev/null 2>&1 <<'PY'
import sys
from pymongo import MongoClient
c = MongoClient(sys.argv[1], serverSelectionTimeoutMS=1000, connectTimeoutMS=1000)
c.admin.command("ping")
PY
}

shell_quote() {
    printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}
