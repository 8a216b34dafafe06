#!/usr/bin/env bash
# The whole test suite: provisions PostgreSQL and the broker (scripts/services.sh), runs every
# test against them, and stops them at the end, also on failure or Ctrl-C.
# Extra arguments go to the test runner (e.g. a test name filter).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

started=0
cleanup() { [ "$started" = 1 ] && bash scripts/services.sh stop || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "${DATABASE_URL:-}" ] || [ -z "${KAFKA_BROKERS:-}" ]; then started=1; fi
bash scripts/bootstrap.sh
eval "$(bash scripts/services.sh start)"

export RUST_BACKTRACE=1
# A test runs the example consumer as a process (and kills it): build the examples first.
cargo build --all-features --examples
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --all-features --no-fail-fast --profile "${NEXTEST_PROFILE:-default}" "$@"
else
  cargo test --all-features --no-fail-fast "$@"
fi
