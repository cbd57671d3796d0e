#!/usr/bin/env bash
# Builds both agents and runs the end-to-end suite, printing how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p agent-hub -p agent-node --bins
start=$(date +%s.%N)
cargo test -p sendense-tests --test e2e "$@"
end=$(date +%s.%N)
printf 'e2e suite: %.1f s wall\n' "$(echo "$end - $start" | bc)"
