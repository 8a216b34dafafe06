#!/usr/bin/env bash
# All benchmarks, with baselines measured in the same run, printed as tables (and written to
# target/bench/results.md). A PostgreSQL of their own with fsync on (target/bench-services), and
# the broker; both stopped at the end.
#   bash scripts/bench.sh            the full suite
#   bash scripts/bench.sh --short    a few minutes
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mode=${1:-}
export SERVICES_DIR="$root/target/bench-services" PG_DURABLE=1
cleanup() { bash scripts/services.sh stop >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM
bash scripts/bootstrap.sh
unset DATABASE_URL KAFKA_BROKERS
eval "$(bash scripts/services.sh start)"
if [ "$mode" = "--short" ]; then
  cargo bench --all-features --bench e2e -- --short
  cargo bench --all-features --bench micro -- --warm-up-time 1 --measurement-time 2
else
  cargo bench --all-features --bench e2e
  cargo bench --all-features --bench micro
fi
echo "tables written to target/bench/results.md"
