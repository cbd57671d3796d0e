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

# The README's first command, headless: the demo must keep working (hub, node, both VMs, full and
# incremental backups); it broke silently once when node credentials arrived.
if [ "$#" -eq 0 ]; then
  bash scripts/demo.sh --headless >target/demo-headless.log 2>&1 || {
    echo "scripts/demo.sh --headless failed:" >&2
    tail -40 target/demo-headless.log >&2
    exit 1
  }
  echo "demo --headless: ok (log: target/demo-headless.log)"
  # The Debian packages as an operator installs them: release build, lintian, dpkg -i, the hub
  # started from its unit's ExecStart on a free port, man pages, then purged (the machine is
  # left as it was, and 127.0.0.1:8082 stays free).
  bash scripts/test-debs.sh >target/test-debs.log 2>&1 || {
    echo "scripts/test-debs.sh failed:" >&2
    grep -E 'FAILED|^test-debs:' target/test-debs.log >&2
    tail -20 target/test-debs.log >&2
    exit 1
  }
  echo "packages: ok ($(grep -E '^test-debs: (built|lintian:)' target/test-debs.log | tr '\n' ' ')log: target/test-debs.log)"
  # Both APIs as documented (docs/openapi/*.json), fuzzed against the live binaries.
  bash scripts/schemathesis.sh
fi
