#!/usr/bin/env bash
# Runs every README.md code block marked to run, in order, against a fresh test server and
# a daemon started by scripts/run-local.sh, and compares their output with the README's.
#
#   bash scripts/ci/check_readme.sh [FILE.md]     (default README.md)
#
# Markers (HTML comments on the line before a fenced block):
#   <!-- ci: run -->      the next ```sh (bash -euo pipefail) or ```python (the test venv's
#                         Python, with pymongo) block is run from the repository root;
#   <!-- ci: output -->   the next block is the expected stdout of the run block before it:
#                         compared as JSON values (one or more), with times and the lease
#                         holder masked, and an Int64 written as {"$numberLong": "N"} equal
#                         to N (nx-27017 reads small Int64 values back as Int32); text that
#                         is not JSON is compared line by line.
# Addresses in the blocks are those of scripts/run-local.sh with the shipped config.toml
# (sync 127.0.0.1:8080, ops 127.0.0.1:9090, MongoDB 127.0.0.1:27017); they are rewritten to
# the private ports used here, so the check never collides with a local daemon.
# It also checks run-local.sh's "ready" banner. Everything it starts is stopped on exit.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
. scripts/testenv/lib.sh   # VENV, ensure_venv, free_ports, ping_uri
FILE="${1:-README.md}"

log() { printf 'check_readme: %s\n' "$*" >&2; }
die() { printf 'check_readme: FAIL: %s\n' "$*" >&2; exit 1; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/eventsync-readme.XXXXXX")"
PIDS=()
cleanup() {
    local rc=$? i pid
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid="${PIDS[i]}"
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "$rc" -ne 0 ]; then
        for f in "$TMP"/*.log; do
            [ -f "$f" ] || continue
            printf -- '--- %s (last 40 lines) ---\n' "$(basename "$f")" >&2
            tail -n 40 "$f" >&2
        done
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ensure_venv
read -r MPORT SYNC_PORT OPS_PORT <<<"$(free_ports 3)"
URI="mongodb://127.0.0.1:$MPORT/?directConnection=true"
bash scripts/testenv/launch_server.sh "$MPORT" </dev/null >"$TMP/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 150); do ping_uri "$URI" && break; sleep 0.2; done
ping_uri "$URI" || die "the test server did not answer on $URI"
log "fresh test server on $URI"

# The daemon as a newcomer starts it: scripts/run-local.sh, the shipped config.toml.
EVENTSYNC__MONGODB__URI="$URI" \
EVENTSYNC__SYNC__LISTEN="127.0.0.1:$SYNC_PORT" \
EVENTSYNC__OPS__LISTEN="127.0.0.1:$OPS_PORT" \
RUN_LOCAL_PROFILE=dev \
    scripts/run-local.sh </dev/null >"$TMP/run-local.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 1500); do
    banner="$(cat "$TMP/run-local.log")"
    [[ "$banner" == *"eventsync is ready"* ]] && break
    kill -0 "${PIDS[-1]}" 2>/dev/null || die "scripts/run-local.sh exited before it was ready"
    sleep 0.2
done
[[ "$banner" == *"eventsync is ready"* ]] || die "scripts/run-local.sh printed no ready banner within 300 s"
for want in "http://127.0.0.1:$SYNC_PORT/v1" "http://127.0.0.1:$SYNC_PORT/v1/openapi.json" \
    "http://127.0.0.1:$OPS_PORT/metrics" "curl -s -X POST http://127.0.0.1:$SYNC_PORT/v1/sync/missing"; do
    [[ "$banner" == *"$want"* ]] || die "the ready banner lacks $want"
done
[[ "$banner" == *"eventsyncd ready"* ]] || die "the daemon logged no ready line"
# The banner's curl works as printed.
fetch="$(grep -E '^  curl -s -X POST ' "$TMP/run-local.log" | head -n 1 || true)"
[ -n "$fetch" ] || die "no curl line in the banner"
out="$(bash -c "$fetch")" || die "the banner's curl failed: $fetch"
[[ "$out" == *'"items"'* ]] || die "the banner's curl answered $out"
log "run-local.sh is ready and says where everything is"

"$VENV/bin/python" - "$FILE" "$TMP" "$SYNC_PORT" "$OPS_PORT" "$URI" "$VENV/bin/python" <<'PY'
import json, re, subprocess, sys

path, tmp, sync_port, ops_port, uri, python = sys.argv[1:]
text = open(path, encoding="utf-8").read()
subst = [
    ("mongodb://127.0.0.1:27017/?directConnection=true", uri),
    ("127.0.0.1:8080", f"127.0.0.1:{sync_port}"),
    ("127.0.0.1:9090", f"127.0.0.1:{ops_port}"),
]

def rewrite(code):
    for a, b in subst:
        code = code.replace(a, b)
    return code

# Blocks that follow a marker: (marker, language, body, line).
blocks = []
marker = None
lines = text.split("\n")
i = 0
while i < len(lines):
    m = re.match(r"^<!-- ci: (run|output) -->\s*$", lines[i])
    if m:
        marker = m.group(1)
        i += 1
        continue
    f = re.match(r"^```(\w*)\s*$", lines[i])
    if f:
        start = i
        body = []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        if marker:
            blocks.append((marker, f.group(1), "\n".join(body) + "\n", start + 1))
        marker = None
    elif lines[i].strip():
        marker = None
    i += 1

if not any(b[0] == "run" for b in blocks):
    sys.exit(f"{path}: no block marked <!-- ci: run -->")

VOLATILE = {"wall_time", "appended_at", "registered_at", "updated_at", "at", "lease_holder"}

def norm(v):
    if isinstance(v, dict):
        if set(v) == {"$numberLong"}:
            try:
                return int(v["$numberLong"])
            except ValueError:
                return v
        return {k: ("<masked>" if k in VOLATILE else norm(x)) for k, x in v.items()}
    if isinstance(v, list):
        return [norm(x) for x in v]
    return v

def values(s):
    dec = json.JSONDecoder()
    out, pos = [], 0
    s = s.strip()
    while pos < len(s):
        v, end = dec.raw_decode(s, pos)
        out.append(norm(v))
        pos = end
        while pos < len(s) and s[pos].isspace():
            pos += 1
    return out

failures = 0
last = None
for n, (kind, lang, body, line) in enumerate(blocks):
    if kind == "run":
        code = rewrite(body)
        if lang in ("sh", "bash", "shell"):
            cmd = ["bash", "-euo", "pipefail", "-c", code]
        elif lang == "python":
            cmd = [python, "-c", code]
        else:
            sys.exit(f"{path}:{line}: cannot run a ```{lang} block")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        print(f"check_readme: {path}:{line}: ```{lang} block exited {r.returncode}", file=sys.stderr)
        if r.returncode != 0:
            print(r.stdout + r.stderr, file=sys.stderr)
            sys.exit(f"{path}:{line}: the block failed")
        last = (r.stdout, line)
    else:
        if last is None:
            sys.exit(f"{path}:{line}: an output block without a run block before it")
        actual, run_line = last
        expected = rewrite(body)
        try:
            same = values(actual) == values(expected)
        except ValueError:
            same = [l.rstrip() for l in actual.strip().splitlines()] == [l.rstrip() for l in expected.strip().splitlines()]
        if not same:
            failures += 1
            print(f"check_readme: {path}:{line}: the output of the block at line {run_line} differs.\n"
                  f"--- README ---\n{expected}--- actual ---\n{actual}", file=sys.stderr)
        last = None
if failures:
    sys.exit(f"{failures} output block(s) differ")
print(f"check_readme: {sum(1 for b in blocks if b[0] == 'run')} blocks ran, "
      f"{sum(1 for b in blocks if b[0] == 'output')} outputs match", file=sys.stderr)
PY
log "ok ($SECONDS s)"
