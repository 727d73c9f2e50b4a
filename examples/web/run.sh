#!/usr/bin/env bash
# One command for the boss-raid demo: starts the test server (unless
# EVENTSYNC_TEST_MONGODB_URI is set), builds eventsyncd and the JS client, then runs the
# daemon (CORS open to the page), the page server and the attackers, and prints the URL.
#     examples/web/run.sh            (DEMO_PORT=8090 by default)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
eval "$(scripts/testenv/start.sh)"
cargo build --quiet --bin eventsyncd
(cd clients/js && { [ -d node_modules ] || npm ci --no-audit --no-fund; } && npm run --silent build)
exec node examples/web/demo.mjs
