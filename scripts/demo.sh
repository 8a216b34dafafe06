#!/usr/bin/env bash
# The main job: the relay with a demo workload, end to end, on this machine.
#
# Provisions PostgreSQL and the broker (scripts/services.sh, the same as the tests), installs the
# schema, starts the relay, the demo consumer (per-customer order totals through the inbox) and the
# demo writer (orders, each with its outbox message in the same transaction), shows live progress,
# kills the relay with SIGKILL halfway and restarts it, and ends with a summary. Exits non-zero
# unless written = delivered = applied.
#
#   DEMO_ORDERS (20000)  orders to write        DEMO_RATE (4000)  orders per second
#   DEMO_RELAY_METRICS_ADDR  where the relay serves /metrics (any free port by default);
#   DEMO_METRICS_ADDR        where the demo consumer serves its own (not served by default)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
orders=${DEMO_ORDERS:-20000}
rate=${DEMO_RATE:-4000}
schema=outbox_demo
out="$root/target/demo"
mkdir -p "$out"

started_services=0
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  [ "$started_services" = 1 ] && bash scripts/services.sh stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n== %s\n' "$*"; }

say "provisioning PostgreSQL and the broker"
if [ -z "${DATABASE_URL:-}" ] || [ -z "${KAFKA_BROKERS:-}" ]; then started_services=1; fi
bash scripts/bootstrap.sh
eval "$(bash scripts/services.sh start)"
psql=$(command -v psql || ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | head -n 1)
[ -x "$psql" ] || { echo "demo: psql not found: install the PostgreSQL client" >&2; exit 1; }
q() { "$psql" "$DATABASE_URL" -qAtX -c "$1"; }

say "building the relay and the demo programs"
cargo build --quiet --all-features --bin outbox-relay --examples
bin=target/debug/outbox-relay

say "installing the schema ($schema, 8 lanes) and starting from a clean slate"
q "DROP SCHEMA IF EXISTS demo CASCADE; DROP SCHEMA IF EXISTS $schema CASCADE;" >/dev/null 2>&1 || true
"$bin" migrate --schema "$schema" --lanes 8
q "CREATE SCHEMA demo;
   CREATE TABLE demo.orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, customer text NOT NULL,
                             amount_cents bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
   CREATE TABLE demo.customer_totals (customer text PRIMARY KEY, orders bigint NOT NULL, amount_cents bigint NOT NULL);"
topic="demo.orders.$(date +%s)"
group="demo-totals-$(date +%s)"
export OUTBOX_SCHEMA=$schema DEMO_TOPIC=$topic DEMO_GROUP=$group OUTBOX_LOG=${OUTBOX_LOG:-warn}

start_relay() {
  "$bin" run --schema "$schema" --archive --heartbeat-interval 500ms --instance-timeout 3s \
    --metrics-addr "${DEMO_RELAY_METRICS_ADDR:-127.0.0.1:0}" >>"$out/relay.log" 2>&1 &
  relay_pid=$!
  pids+=("$relay_pid")
}
: >"$out/relay.log"
start_relay
target/debug/examples/demo_writer --orders "$orders" --rate "$rate" --per-tx 5 >"$out/writer.log" 2>&1 &
writer_pid=$!
pids+=("$writer_pid")
# The relay's first records create the topic; then the consumer subscribes to it.
for _ in $(seq 1 100); do
  [ "$(q "SELECT count(*) > 0 FROM $schema.delivered")" = t ] && break
  sleep 0.2
done
target/debug/examples/demo_consumer >"$out/consumer.log" 2>&1 &
consumer_pid=$!
pids+=("$consumer_pid")

say "running: $orders orders at $rate/s to topic $topic (logs in target/demo/)"
start=$(date +%s)
killed=0
while true; do
  sleep 1
  # One statement, one snapshot: the figures agree with each other.
  IFS='|' read -r written delivered backlog dead applied < <(q "SELECT
      (SELECT count(*) FROM demo.orders), (SELECT count(DISTINCT id) FROM $schema.delivered),
      (SELECT count(*) FROM $schema.messages), (SELECT count(*) FROM $schema.dead_letters),
      (SELECT coalesce(sum(orders), 0) FROM demo.customer_totals)")
  elapsed=$(( $(date +%s) - start ))
  printf '  %4ss  written %7s / %s   delivered %7s   applied %7s   backlog %6s   dead letters %s\n' \
    "$elapsed" "$written" "$orders" "$delivered" "$applied" "$backlog" "$dead"
  if [ "$killed" = 0 ] && [ "$written" -ge $((orders / 2)) ]; then
    kill -9 "$relay_pid" 2>/dev/null || true
    wait "$relay_pid" 2>/dev/null || true
    echo "  >>> relay killed with SIGKILL mid-run; restarting it (nothing committed may be lost)"
    start_relay
    killed=1
  fi
  if ! kill -0 "$writer_pid" 2>/dev/null && [ "$applied" -ge "$orders" ] && [ "$backlog" = 0 ]; then
    break
  fi
  if ! kill -0 "$consumer_pid" 2>/dev/null; then
    echo "demo: the consumer stopped unexpectedly; see target/demo/consumer.log" >&2; exit 1
  fi
  if ! kill -0 "$relay_pid" 2>/dev/null; then
    echo "demo: the relay stopped unexpectedly; see target/demo/relay.log" >&2; exit 1
  fi
  if [ "$elapsed" -gt "${DEMO_TIMEOUT:-600}" ]; then
    echo "demo: not finished after ${DEMO_TIMEOUT:-600}s; see target/demo/*.log" >&2; exit 1
  fi
done

kill -TERM "$consumer_pid" "$relay_pid" 2>/dev/null || true
wait "$consumer_pid" 2>/dev/null || true
wait "$relay_pid" 2>/dev/null || true
stats=$(grep '^consumer:' "$out/consumer.log" | tail -n 1)
duplicates=$(echo "$stats" | sed -n 's/.*duplicates \([0-9]*\).*/\1/p')
written=$(q "SELECT count(*) FROM demo.orders")
delivered=$(q "SELECT count(DISTINCT id) FROM $schema.delivered")
applied=$(q "SELECT coalesce(sum(orders), 0) FROM demo.customer_totals")
amount_written=$(q "SELECT coalesce(sum(amount_cents), 0) FROM demo.orders")
amount_applied=$(q "SELECT coalesce(sum(amount_cents), 0) FROM demo.customer_totals")
dead=$(q "SELECT count(*) FROM $schema.dead_letters")
elapsed=$(( $(date +%s) - start ))

say "summary"
printf '  written     %s orders (%s cents)\n' "$written" "$amount_written"
printf '  delivered   %s distinct messages to Kafka (relay killed and restarted once)\n' "$delivered"
printf '  applied     %s effects (%s cents) by the inbox consumer\n' "$applied" "$amount_applied"
printf '  duplicates  %s redeliveries skipped by the inbox\n' "${duplicates:-0}"
printf '  dead letters %s\n' "$dead"
printf '  elapsed     %ss\n' "$elapsed"
if [ "$written" = "$delivered" ] && [ "$delivered" = "$applied" ] && [ "$amount_written" = "$amount_applied" ] && [ "$dead" = 0 ]; then
  echo "  OK: written = delivered = applied"
else
  echo "  MISMATCH: written $written, delivered $delivered, applied $applied" >&2
  exit 1
fi
