#!/usr/bin/env bash
# For machines with a Docker engine: brings the compose stack up, lets the demo writer and the
# demo consumer run, checks the end-to-end figures (written = delivered = applied, duplicates
# skipped, no dead letters), and takes the stack down with its volumes, also on failure.
#   DEMO_ORDERS (20000) sizes the run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
compose=(docker compose -p outbox-relay -f "$root/docker/compose.yml")
export DEMO_ORDERS=${DEMO_ORDERS:-20000}
trap '"${compose[@]}" down -v >/dev/null 2>&1 || true' EXIT

"${compose[@]}" build
# The long-running services first (migrate runs once before the relay), then the writer.
"${compose[@]}" up -d --wait --wait-timeout 300 postgres kafka relay demo-consumer
"${compose[@]}" up -d demo-writer
psql() { "${compose[@]}" exec -T postgres psql -U "${POSTGRES_USER:-outbox}" -d "${POSTGRES_DB:-outbox}" -qAtX -c "$1"; }
deadline=$((SECONDS + ${COMPOSE_TEST_TIMEOUT:-600}))
while true; do
  IFS='|' read -r written delivered applied backlog dead < <(psql "SELECT
      (SELECT count(*) FROM demo.orders), (SELECT count(DISTINCT id) FROM outbox.delivered),
      (SELECT coalesce(sum(orders), 0) FROM demo.customer_totals), (SELECT count(*) FROM outbox.messages),
      (SELECT count(*) FROM outbox.dead_letters)")
  echo "written $written / $DEMO_ORDERS  delivered $delivered  applied $applied  backlog $backlog  dead letters $dead"
  if [ "$written" -ge "$DEMO_ORDERS" ] && [ "$applied" -ge "$written" ] && [ "$backlog" = 0 ]; then break; fi
  [ "$SECONDS" -lt "$deadline" ] || { echo "compose-test: not done in time" >&2; "${compose[@]}" logs --tail 50 >&2; exit 1; }
  sleep 2
done
"${compose[@]}" stop demo-consumer >/dev/null
duplicates=$("${compose[@]}" logs demo-consumer | sed -n 's/.*duplicates \([0-9]*\).*/\1/p' | tail -n 1)
echo "summary: written $written, delivered $delivered, applied $applied, duplicates skipped ${duplicates:-0}, dead letters $dead"
[ "$written" = "$delivered" ] && [ "$delivered" = "$applied" ] && [ "$dead" = 0 ] || { echo "compose-test: MISMATCH" >&2; exit 1; }
echo "compose-test: OK"
