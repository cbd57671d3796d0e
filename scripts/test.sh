#!/usr/bin/env bash
# The whole test suite: installs what is missing, starts MariaDB, then format, lints and every
# test (unit, database on SQLite and MariaDB, integration with real qemu-nbd and QEMU).
set -euo pipefail
cd "$(dirname "$0")/.."

mysql_base=$(bash scripts/setup.sh)
export SENDENSE_TEST_MYSQL_URL="$mysql_base"

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo nextest run --workspace --no-fail-fast "$@"
