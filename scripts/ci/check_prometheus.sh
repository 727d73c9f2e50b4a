#!/usr/bin/env bash
# Checks the daemon's metrics with the real Prometheus tools (Debian's `prometheus`
# package: the server and promtool).
#
#   bash scripts/ci/check_prometheus.sh
#
# It:
#   1. installs Debian's `prometheus` package if `prometheus` or `promtool` is missing
#      (apt-get update once, then apt-get install; the package's service is not started);
#   2. starts a MongoDB-compatible test server (a private nx-27017 on a free port, through
#      scripts/testenv/launch_server.sh; or uses EVENTSYNC_TEST_MONGODB_URI when set) and
#      `eventsyncd` (cargo build --bin eventsyncd, or the binary named by $EVENTSYNCD)
#      with a temporary config on free ports;
#   3. writes a few documents (pymongo from the test venv) and waits until they are counted;
#   4. runs `promtool check metrics` (exposition format and naming lint) on a scrape of
#      /metrics;
#   5. extracts the alerting rules and the PromQL examples from docs/operations.md,
#      checks the rules with `promtool check rules`;
#   6. starts a Prometheus server on a free loopback port scraping the daemon every second,
#      with those rules loaded, and asks its HTTP API for `eventsync_build_info`, the
#      `eventsync_events_appended_total` of the stream (at least the number of writes),
#      `up`, the rules' health, and every documented PromQL example (must evaluate);
#   7. checks the Grafana dashboard deploy/grafana/eventsync-dashboard.json: valid JSON,
#      every panel has a PromQL target, every eventsync_* metric its queries name is in
#      the scrape (after a client refusal and an operator pause/resume, so those series
#      exist; only metrics that appear with their first event may be missing), and every
#      query evaluates in the Prometheus server with a non-empty answer unless it names
#      such a metric.
# Everything it starts is stopped on exit. Takes well under two minutes once installed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
. scripts/testenv/lib.sh   # VENV, STATE, ensure_venv, free_ports

log() { printf 'check_prometheus: %s\n' "$*" >&2; }
die() { printf 'check_prometheus: FAIL: %s\n' "$*" >&2; exit 1; }

DEADLINE=$((SECONDS + 180))
TMP="$(mktemp -d "${TMPDIR:-/tmp}/eventsync-prom.XXXXXX")"
PIDS=()

cleanup() {
    local rc=$? i pid
    # Stop in reverse start order (Prometheus, the daemon, the server), each before the
    # next, so the daemon can still release its lease: SIGTERM, SIGKILL after 5 s.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid="${PIDS[i]}"
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
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

# Polls "$@" until it succeeds; fails after $1 seconds (or the overall deadline).
wait_until() {
    local secs="$1" what="$2"
    shift 2
    local until=$((SECONDS + secs))
    [ "$until" -le "$DEADLINE" ] || until=$DEADLINE
    while ! "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$until" ] || die "timed out waiting for $what"
        sleep 0.3
    done
}

# --- 1. tools ---------------------------------------------------------------------

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    command -v apt-get >/dev/null || die "no prometheus/promtool and no apt-get to install them"
    # No `cmd | grep -q` under pipefail: grep -q closes the pipe early and the writer's
    # SIGPIPE (exit 141) would fail the pipeline. Capture the output, then match it.
    prometheus_candidate() {
        local policy
        policy="$(apt-cache policy prometheus 2>/dev/null || true)"
        [[ "$policy" =~ Candidate:\ [0-9] ]]
    }
    if ! prometheus_candidate; then
        log "apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
    fi
    prometheus_candidate || die "Debian package prometheus is not available"
    log "installing Debian's prometheus package"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >&2 \
        || die "apt-get install prometheus failed"
fi
prometheus_version="$(prometheus --version 2>&1 || true)"
log "${prometheus_version%%$'\n'*}"
ensure_venv

if [ -n "${EVENTSYNCD:-}" ]; then
    BIN="$EVENTSYNCD"   # a binary built already (e.g. by CI's release build)
else
    log "building eventsyncd"
    cargo build --quiet --bin eventsyncd >&2 || die "cargo build --bin eventsyncd failed"
    BIN="${CARGO_TARGET_DIR:-$REPO/target}/debug/eventsyncd"
fi
[ -x "$BIN" ] || die "no binary at $BIN"

# --- 2. test server and daemon ------------------------------------------------------

# Every port at once (separate free_port calls can return the same port twice).
read -r MPORT SYNC_PORT OPS_PORT PROM_PORT <<<"$(free_ports 4)"

if [ -n "${EVENTSYNC_TEST_MONGODB_URI:-}" ]; then
    URI="$EVENTSYNC_TEST_MONGODB_URI"
    log "using the test server $URI"
else
    URI="mongodb://127.0.0.1:$MPORT/?directConnection=true"
    bash scripts/testenv/launch_server.sh "$MPORT" </dev/null >"$TMP/server.log" 2>&1 &
    PIDS+=($!)
    wait_until 60 "the test server on port $MPORT" ping_uri "$URI"
    log "test server on $URI"
fi

RUN="prom$$_$RANDOM"
APP_DB="${RUN}_app"
EVENT_DB="${RUN}_log"
STREAM="$APP_DB.items"
cat >"$TMP/eventsync.toml" <<EOF
[mongodb]
uri = "$URI"
event_database = "$EVENT_DB"

[[streams]]
database = "$APP_DB"
collection = "items"

[pipeline]
max_await_ms = 100
idle_checkpoint_ms = 500

[lease]
holder_id = "check-prometheus"

[sync]
listen = "127.0.0.1:$SYNC_PORT"

[ops]
listen = "127.0.0.1:$OPS_PORT"
ping_interval_ms = 500

[log]
level = "info"
EOF
"$BIN" --config "$TMP/eventsync.toml" --check >&2 || die "the generated config is invalid"
"$BIN" --config "$TMP/eventsync.toml" </dev/null >"$TMP/eventsyncd.log" 2>&1 &
PIDS+=($!)
OPS="http://127.0.0.1:$OPS_PORT"
wait_until 60 "eventsyncd /readyz" curl -fsS "$OPS/readyz"
log "eventsyncd ready (ops port $OPS_PORT)"

# --- 3. writes ----------------------------------------------------------------------

WRITES=12
"$VENV/bin/python" - "$URI" "$APP_DB" "$WRITES" >&2 <<'PY' || die "cannot write the test documents"
import sys
from pymongo import MongoClient
uri, db, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
coll = MongoClient(uri, serverSelectionTimeoutMS=10000)[db]["items"]
for i in range(n - 2):
    coll.insert_one({"_id": i, "n": i, "version": 1})
coll.update_one({"_id": 0}, {"$set": {"n": 100}})
coll.delete_one({"_id": 1})
PY

appended() {
    curl -fsS "$OPS/metrics" | awk -v s="stream=\"$STREAM\"" '
        $1 ~ /^eventsync_events_appended_total[{]/ && index($1, s) { total += $2 }
        END { print total + 0 }'
}
counted() { [ "$(appended)" -ge "$WRITES" ]; }
wait_until 60 "eventsync_events_appended_total to reach $WRITES" counted
log "daemon counted $(appended) appended events"

# A client refusal (404) and an operator pause/resume, so that their series exist
# (the generated config has no credentials: the API, admin routes included, is open).
SYNC="http://127.0.0.1:$SYNC_PORT"
curl -sS -o /dev/null "$SYNC/v1/no-such-route" || die "the sync port does not answer"
for action in pause resume; do
    curl -fsS -o /dev/null -X POST "$SYNC/v1/admin/streams/$STREAM/$action" \
        || die "POST /v1/admin/streams/$STREAM/$action failed"
done
admin_done() {
    curl -fsS "$OPS/metrics" | awk -v s="stream=\"$STREAM\"" '
        $1 ~ /^eventsync_admin_actions_total[{]/ && index($1, s) && index($1, "action=\"resume\"") \
            && index($1, "outcome=\"done\"") { total += $2 }
        END { exit !(total >= 1) }'
}
wait_until 30 "the operator resume to be carried out" admin_done
# The oplog sampler (every 5 s) has reported once the headroom series exists.
headroom_sampled() { curl -fsS "$OPS/metrics" >"$TMP/m.txt" && grep -q '^eventsync_oplog_headroom_seconds{' "$TMP/m.txt"; }
wait_until 30 "eventsync_oplog_headroom_seconds" headroom_sampled

# --- 4. promtool check metrics --------------------------------------------------------

curl -fsS "$OPS/metrics" >"$TMP/metrics.txt"
if ! promtool check metrics <"$TMP/metrics.txt" >"$TMP/promtool.out" 2>&1; then
    cat "$TMP/promtool.out" >&2
    die "promtool check metrics rejects /metrics"
fi
log "promtool check metrics: ok ($(grep -c '^eventsync_' "$TMP/metrics.txt") samples)"

# --- 5. documented rules and queries ----------------------------------------------------

# The ```yaml block after the `<!-- prometheus-rules -->` marker, and every line of the
# ```promql blocks (comments and blank lines dropped) of docs/operations.md.
awk '/<!-- prometheus-rules -->/ { armed = 1; next }
     armed && /^```yaml/ { inside = 1; next }
     inside && /^```/ { exit }
     inside { print }' docs/operations.md >"$TMP/rules.yml"
[ -s "$TMP/rules.yml" ] || die "docs/operations.md has no rules block after <!-- prometheus-rules -->"
awk '/^```promql/ { inside = 1; next }
     inside && /^```/ { inside = 0; next }
     inside && NF && $1 !~ /^#/ { print }' docs/operations.md >"$TMP/queries.txt"
[ -s "$TMP/queries.txt" ] || die "docs/operations.md has no \`\`\`promql examples"
if ! promtool check rules "$TMP/rules.yml" >"$TMP/promtool-rules.out" 2>&1; then
    cat "$TMP/promtool-rules.out" >&2
    die "promtool check rules rejects the rules in docs/operations.md"
fi
log "promtool check rules: $(grep -o 'SUCCESS: [0-9]* rules found' "$TMP/promtool-rules.out")"

# --- 6. a real Prometheus server ------------------------------------------------------

PROM="http://127.0.0.1:$PROM_PORT"
cat >"$TMP/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $TMP/rules.yml
scrape_configs:
  - job_name: eventsyncd
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:$OPS_PORT"]
EOF
promtool check config "$TMP/prometheus.yml" >"$TMP/promtool-config.out" 2>&1 \
    || { cat "$TMP/promtool-config.out" >&2; die "promtool check config"; }
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn \
    </dev/null >"$TMP/prometheus.log" 2>&1 &
PIDS+=($!)
wait_until 30 "Prometheus /-/ready" curl -fsS "$PROM/-/ready"
log "Prometheus $PROM scraping 127.0.0.1:$OPS_PORT every second"

# query EXPR: prints the API's JSON answer (fails on an HTTP or API error).
query() { curl -fsS --get "$PROM/api/v1/query" --data-urlencode "query=$1"; }
# value EXPR: the first result's value, or nothing.
value() {
    query "$1" | "$VENV/bin/python" -c '
import json, sys
r = json.load(sys.stdin)
if r.get("status") != "success":
    sys.exit(r.get("error", "query failed"))
res = r["data"]["result"]
if r["data"]["resultType"] == "vector" and res:
    print(res[0]["value"][1])'
}
has_series() { [ -n "$(value "$1")" ]; }
at_least() { local v; v="$(value "$1")"; [ -n "$v" ] && awk -v v="$v" -v m="$2" 'BEGIN { exit !(v + 0 >= m + 0) }'; }

wait_until 30 "eventsync_build_info in Prometheus" has_series 'eventsync_build_info{job="eventsyncd"} == 1'
log "Prometheus has eventsync_build_info: version $(query 'eventsync_build_info' | grep -o '"version":"[^"]*"')"
wait_until 20 "up == 1" at_least 'up{job="eventsyncd"}' 1
wait_until 30 "eventsync_events_appended_total >= $WRITES in Prometheus" \
    at_least "sum(eventsync_events_appended_total{stream=\"$STREAM\"})" "$WRITES"
log "Prometheus: sum(eventsync_events_appended_total{stream=\"$STREAM\"}) = $(value "sum(eventsync_events_appended_total{stream=\"$STREAM\"})")"
wait_until 10 "eventsync_lease_held == 1 in Prometheus" \
    at_least "eventsync_lease_held{stream=\"$STREAM\"}" 1

rules_ok() {
    curl -fsS "$PROM/api/v1/rules" | "$VENV/bin/python" -c '
import json, sys
groups = json.load(sys.stdin)["data"]["groups"]
rules = [r for g in groups for r in g["rules"]]
bad = [(r["name"], r.get("lastError")) for r in rules if r.get("health") != "ok"]
if not rules:
    sys.exit("no rules loaded")
if bad:
    sys.exit("rules not healthy: %r" % bad)
print(len(rules))'
}
wait_until 20 "the documented rules to evaluate" rules_ok
log "Prometheus evaluates $(rules_ok) documented rules without error"

n=0
while IFS= read -r q; do
    out="$(query "$q" 2>&1)" || die "documented query fails: $q: $out"
    case "$out" in
        *'"status":"success"'*) n=$((n + 1)) ;;
        *) die "documented query fails: $q: $out" ;;
    esac
done <"$TMP/queries.txt"
log "Prometheus evaluates all $n documented PromQL examples"

# --- 7. the Grafana dashboard -----------------------------------------------------------

DASHBOARD=deploy/grafana/eventsync-dashboard.json
# Metrics that appear only with their first event (a healthy run has none).
MAY_BE_ABSENT="eventsync_dead_letters_total eventsync_errors_total"
"$VENV/bin/python" - "$DASHBOARD" "$TMP/metrics.txt" "$MAY_BE_ABSENT" >"$TMP/dashboard.txt" <<'PY' \
    || die "$DASHBOARD is not a valid dashboard over the exported metrics"
import json, re, sys
path, scrape, optional = sys.argv[1], sys.argv[2], set(sys.argv[3].split())
try:
    dash = json.load(open(path))
except ValueError as e:
    sys.exit(f"{path}: invalid JSON: {e}")
exported = set(re.findall(r"^# TYPE (\S+) ", open(scrape).read(), re.M))
panels = dash.get("panels") or []
if not dash.get("title") or not dash.get("uid") or not panels:
    sys.exit(f"{path}: needs a title, a uid and panels")
problems = []
for p in panels:
    exprs = [t.get("expr", "") for t in p.get("targets", []) if t.get("expr")]
    if not exprs:
        problems.append(f"panel {p.get('title')!r} has no PromQL target")
    for e in exprs:
        names = {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"\beventsync_[a-z_]+", e)}
        if not names:
            problems.append(f"panel {p.get('title')!r}: query names no eventsync_ metric: {e}")
        missing = names - exported - optional
        if missing:
            problems.append(f"panel {p.get('title')!r}: {sorted(missing)} not exported by the daemon: {e}")
        # "may" marks queries allowed to answer nothing (their metric appears later).
        print(("may" if names & optional else "must") + "\t" + e)
if problems:
    sys.exit("\n".join(problems))
PY
non_empty() { [ -n "$(value "$1")" ]; }
n=0
while IFS=$'\t' read -r need q; do
    out="$(query "$q" 2>&1)" || die "dashboard query fails: $q: $out"
    case "$out" in
        *'"status":"success"'*) ;;
        *) die "dashboard query fails: $q: $out" ;;
    esac
    if [ "$need" = must ]; then
        wait_until 30 "an answer to the dashboard query $q" non_empty "$q"
    fi
    n=$((n + 1))
done <"$TMP/dashboard.txt"
log "Prometheus answers all $n queries of $DASHBOARD"
log "ok ($SECONDS s)"
