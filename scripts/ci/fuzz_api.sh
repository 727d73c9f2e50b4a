#!/usr/bin/env bash
# Fuzzes the sync API from its OpenAPI document with schemathesis (PyPI, pinned).
#     scripts/ci/fuzz_api.sh
# Installs schemathesis into $REPO/.venv-test (reused; the test server nx-27017 lives there
# too), starts the test server and an eventsyncd with a bearer token, runs schemathesis
# against /v1/openapi.json (bounded: few examples per operation, < 3 minutes) and fails on
# any 5xx, a status code or content type the document does not list, or a response that
# does not match its schema. The live (SSE) route is excluded: its response never ends.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
SCHEMATHESIS_VERSION="4.32.5"
VENV="$REPO/.venv-test"
MAX_EXAMPLES="${FUZZ_MAX_EXAMPLES:-50}"
TIME_LIMIT="${FUZZ_TIME_LIMIT:-170}"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# Capture, then match: `cmd | grep -q` fails under pipefail when grep closes the pipe early.
installed_schemathesis="$("$VENV/bin/schemathesis" --version 2>/dev/null || true)"
if [[ "$installed_schemathesis" != *"$SCHEMATHESIS_VERSION"* ]]; then
    "$VENV/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi

eval "$(scripts/testenv/start.sh 2>/dev/null)"
cargo build --quiet --bin eventsyncd

. scripts/testenv/lib.sh   # free_ports
# Both at once: two free_port calls can return the same port.
read -r SYNC_PORT OPS_PORT <<<"$(free_ports 2)"
TOKEN="fuzz-token-$(date +%s)-0123456789"
SUFFIX="$$_$(date +%s)"
WORK="$(mktemp -d)"
cat > "$WORK/config.toml" <<TOML
[mongodb]
uri = "$EVENTSYNC_TEST_MONGODB_URI"
event_database = "fuzz_log_$SUFFIX"

[[streams]]
database = "fuzz_app_$SUFFIX"
collection = "players"

[pipeline]
max_await_ms = 100

[lease]
holder_id = "fuzz"

[sync]
listen = "127.0.0.1:$SYNC_PORT"
tokens = ["$TOKEN"]
max_page_size = 50
max_request_bytes = 65536

[ops]
listen = "127.0.0.1:$OPS_PORT"

[log]
level = "warn"
TOML

target/debug/eventsyncd --config "$WORK/config.toml" > "$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
cleanup() {
    kill "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

BASE="http://127.0.0.1:$SYNC_PORT"
for _ in $(seq 1 150); do
    if curl -fsS -H "Authorization: Bearer $TOKEN" "$BASE/v1/streams" > /dev/null 2>&1; then
        break
    fi
    kill -0 "$DAEMON_PID" 2>/dev/null || { echo "eventsyncd exited:"; cat "$WORK/daemon.log"; exit 1; }
    sleep 0.2
done

status=0
timeout --signal=INT "$TIME_LIMIT" "$VENV/bin/schemathesis" run "$BASE/v1/openapi.json" \
    --header "Authorization: Bearer $TOKEN" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --exclude-path "/v1/streams/{stream}/live" \
    --phases examples,coverage,fuzzing \
    --max-examples "$MAX_EXAMPLES" \
    --request-timeout 10 \
    --workers 2 \
    --seed 1 \
    --no-color || status=$?

if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
    echo "eventsyncd died during the fuzz run:"
    cat "$WORK/daemon.log"
    exit 1
fi
if grep -q "panicked" "$WORK/daemon.log"; then
    echo "eventsyncd panicked:"
    grep -A5 "panicked" "$WORK/daemon.log"
    exit 1
fi
if [ "$status" -eq 124 ]; then
    echo "schemathesis hit the ${TIME_LIMIT}s limit"
    exit 1
fi
exit "$status"
