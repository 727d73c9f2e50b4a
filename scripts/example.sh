#!/usr/bin/env bash
# Runs the seed scenario example (examples/seed_scenario.rs) with one command:
#     scripts/example.sh
# Starts the test server (unless EVENTSYNC_TEST_MONGODB_URI is set), builds eventsyncd,
# and runs the example, which starts the daemon itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
eval "$(scripts/testenv/start.sh 2>/dev/null)"
cargo build --quiet --bin eventsyncd
exec cargo run --quiet --example seed_scenario
