#!/usr/bin/env bash
# Chaos soak: the relay under faults for a long time, then a count of everything.
#
# Not part of the default test command. On its own services (target/soak/services: a PostgreSQL
# cluster and a tansu broker behind scripts/fault_proxy.py, which the broker advertises, so no
# client can bypass it), it runs, for SOAK_DURATION:
#   - writers at a steady total rate (examples/demo_writer.rs: each order and its outbox message in
#     one transaction; each writer has keys of its own, so each key's writes are serialised);
#   - 4 relay instances (run --archive), restarted after each kill;
#   - the inbox consumer (examples/demo_consumer.rs: per-customer totals, effects exactly once);
# and injects, on a schedule (scripts/soak_schedule.py, printed at the start):
#   - SIGKILLs of relay instances (SOAK_KILLS, 100 in a 20-minute run), outages included;
#   - two broker outages at the proxy: a short one (60 s in a 20-minute run; `blackhole`: open
#     connections go silent, as on a partitioned network) and a long one (10 min; `refuse`:
#     connections are cut and new ones refused, as from a stopped broker);
#   - PostgreSQL restarts (pg_ctl restart -m fast) and backend terminations (the relays' sessions,
#     or every client session);
#   - consumer SIGKILLs, and consumer crashes between the commit of its effects and the store of
#     its offset (DEMO_CRASH_ON_SIGUSR1).
# Every fault is printed as it happens, and a progress line every 5 s. Then the writers stop, the
# relays drain and stop, the consumer catches up and stops, and only then is the topic read,
# partition by partition from offset 0 until it stays quiet (examples/soak_check.rs; not up to
# the high watermark, which the test broker can report below its log end after producers restart).
# The summary: committed, distinct at Kafka, lost, order violations per key, duplicates at Kafka,
# effects applied exactly once, dead letters, maximum backlog, and the time to recover after each
# fault. Exits non-zero unless lost = 0, order violations = 0, distinct = committed = written,
# every effect applied exactly once, dead letters = 0, and every planned fault was injected.
#
#   bash scripts/soak.sh                             # the full run: 20 min, 100 kills, 60 s + 10 min outages
#   SOAK_DURATION=2m SOAK_KILLS=20 bash scripts/soak.sh   # the short run (CI): outages 10 s + 20 s
#
# Settings (environment):
#   SOAK_DURATION (20m)       writing time; faults scale with it. Durations: 90, 90s, 2m, 1h
#   SOAK_KILLS (D/12 s)       relay SIGKILLs (100 for 20m)
#   SOAK_OUTAGE_SHORT / SOAK_OUTAGE_LONG   60s / 10m when D >= 20m, else max(10s, D/12) / max(20s, D/6)
#   SOAK_OUTAGE_SHORT_MODE / SOAK_OUTAGE_LONG_MODE   blackhole / refuse
#   SOAK_PG_RESTARTS (2; 1 below 20m)  SOAK_PG_TERMINATES (6; 2)
#   SOAK_CONSUMER_KILLS (4; 2)         SOAK_CONSUMER_CRASHES (4; 2)
#   SOAK_RATE (400 orders/s in all)    SOAK_WRITERS (2)   SOAK_RELAYS (4)   SOAK_PARTITIONS (8)
#   SOAK_SEED (random)        the schedule's seed (printed; the same seed gives the same schedule)
#   SOAK_DRAIN_TIMEOUT (900)  seconds the relays and then the consumer get to catch up at the end
#   SOAK_CONSUMER_PROPERTIES  extra librdkafka properties for the consumer (DEMO_KAFKA_PROPERTIES)
#   SOAK_BUILD (1)            0: use the binaries already in target/debug
# Logs: target/soak/run/ (one file per process, the schedule, the samples, the verifier's output).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out="$root/target/soak"
run="$out/run"
mkdir -p "$out"

die() { printf 'soak: error: %s\n' "$*" >&2; exit 2; }

# Seconds from 90, 90s, 2m, 1h.
secs() {
  case "$1" in
    *h) echo $(( ${1%h} * 3600 )) ;;
    *m) echo $(( ${1%m} * 60 )) ;;
    *s) echo "${1%s}" ;;
    *) echo "$1" ;;
  esac
}

D=$(secs "${SOAK_DURATION:-20m}")
[ "$D" -ge 60 ] 2>/dev/null || die "SOAK_DURATION must be at least 60s (got ${SOAK_DURATION:-})"
full=0; [ "$D" -ge 1200 ] && full=1
KILLS=${SOAK_KILLS:-$(( D / 12 < 10 ? 10 : D / 12 ))}
if [ "$full" = 1 ]; then short_default=60; long_default=600; else
  short_default=$(( D / 12 < 10 ? 10 : D / 12 )); long_default=$(( D / 6 < 20 ? 20 : D / 6 )); fi
OUT_SHORT=$(secs "${SOAK_OUTAGE_SHORT:-$short_default}")
OUT_LONG=$(secs "${SOAK_OUTAGE_LONG:-$long_default}")
SHORT_MODE=${SOAK_OUTAGE_SHORT_MODE:-blackhole}
LONG_MODE=${SOAK_OUTAGE_LONG_MODE:-refuse}
PG_RESTARTS=${SOAK_PG_RESTARTS:-$(( full ? 2 : 1 ))}
PG_TERMINATES=${SOAK_PG_TERMINATES:-$(( full ? 6 : 2 ))}
CONSUMER_KILLS=${SOAK_CONSUMER_KILLS:-$(( full ? 4 : 2 ))}
CONSUMER_CRASHES=${SOAK_CONSUMER_CRASHES:-$(( full ? 4 : 2 ))}
RATE=${SOAK_RATE:-400}
WRITERS=${SOAK_WRITERS:-2}
RELAYS=${SOAK_RELAYS:-4}
PARTITIONS=${SOAK_PARTITIONS:-8}
LANES=16
DRAIN=${SOAK_DRAIN_TIMEOUT:-900}
SEED=${SOAK_SEED:-$(( (RANDOM << 15) | RANDOM ))}
schema=soak
for m in "$SHORT_MODE" "$LONG_MODE"; do
  case "$m" in refuse|blackhole) ;; *) die "outage modes are refuse or blackhole (got $m)" ;; esac
done

# One soak at a time: they share target/soak/services.
if [ -f "$out/soak.pid" ] && kill -0 "$(cat "$out/soak.pid")" 2>/dev/null \
   && grep -q soak.sh "/proc/$(cat "$out/soak.pid")/cmdline" 2>/dev/null; then
  die "another soak is running (pid $(cat "$out/soak.pid"))"
fi
echo $$ >"$out/soak.pid"

# ---------------------------------------------------------------- processes and cleanup
declare -a relay_pid relay_restart_at relay_killed writer_pid writer_restart_at
consumer_pid=""; consumer_restart_at=0; consumer_wanted=0; writing=0; relays_wanted=0
export SERVICES_DIR="$out/services"
services_started=0

stop_pid() { # pid: TERM, up to 10 s, then KILL
  local p=$1 i
  [ -n "$p" ] || return 0
  kill -TERM "$p" 2>/dev/null || return 0
  for i in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}

cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  writing=0; relays_wanted=0; consumer_wanted=0
  for p in "${writer_pid[@]:-}" "${relay_pid[@]:-}" "$consumer_pid"; do
    [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [ "$services_started" = 1 ]; then bash scripts/services.sh stop >/dev/null 2>&1 || true; fi
  rm -f "$out/soak.pid"
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "soak: interrupted" >&2; exit 130' INT TERM

now_ms() { date +%s%3N; }
fmt_s() { printf '%d.%d' $(( $1 / 1000 )) $(( ($1 % 1000) / 100 )); } # ms -> s.d
rec() { if [ -z "$1" ]; then echo "never"; elif [ "$1" = - ]; then echo "-"; else echo "$(fmt_s "$1")s"; fi; }
t0=$(now_ms)
say() { printf '%s [%6ss] %s\n' "$(date +%H:%M:%S)" "$(fmt_s $(( $(now_ms) - t0 )))" "$*"; }
section() { printf '\n== %s\n' "$*"; }

# ---------------------------------------------------------------- services and build
section "soak: ${D}s of writing at ${RATE}/s, $RELAYS relays, $KILLS relay SIGKILLs, outages ${OUT_SHORT}s ($SHORT_MODE) and ${OUT_LONG}s ($LONG_MODE), seed $SEED"
rm -rf "$run"; mkdir -p "$run"
bash scripts/bootstrap.sh
# The soak restarts PostgreSQL and cuts the broker: it always runs services of its own.
unset DATABASE_URL KAFKA_BROKERS OUTBOX_TEST_PG_CTL OUTBOX_TEST_PGDATA KAFKA_PROXY_CONTROL
bash scripts/services.sh stop >/dev/null 2>&1 || true
services_started=1
eval "$(KAFKA_FAULT_PROXY=1 bash scripts/services.sh start)"
[ -n "${KAFKA_PROXY_CONTROL:-}" ] || die "services.sh did not start the fault proxy"
psql=$(command -v psql || ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | head -n 1)
[ -x "$psql" ] || die "psql not found: install the PostgreSQL client"
export PGCONNECT_TIMEOUT=5 PGAPPNAME=soak-monitor
q() { timeout 30 "$psql" "$DATABASE_URL" -qAtX -v ON_ERROR_STOP=1 -c "$1" 2>>"$run/monitor.err"; }
as_pg_user() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
url_with_app() { case "$DATABASE_URL" in *\?*) echo "$DATABASE_URL&application_name=$1" ;; *) echo "$DATABASE_URL?application_name=$1" ;; esac; }

if [ "${SOAK_BUILD:-1}" = 1 ]; then
  section "building the relay and the examples"
  cargo build --quiet --all-features --bin outbox-relay --examples
fi
for b in target/debug/outbox-relay target/debug/examples/{demo_writer,demo_consumer,soak_check}; do
  [ -x "$b" ] || die "$b is missing: cargo build --all-features --bin outbox-relay --examples"
done
# A copy of its own: a rebuild of the tree during the soak must not change what it restarts.
mkdir -p "$run/bin"
cp target/debug/outbox-relay target/debug/examples/{demo_writer,demo_consumer,soak_check} "$run/bin/"
bin="$run/bin/outbox-relay"
ex="$run/bin"

proxy_cmd() {
  local reply=""
  exec 9<>"/dev/tcp/127.0.0.1/$KAFKA_PROXY_CONTROL" || { echo "no answer"; return 1; }
  printf '%s\n' "$*" >&9
  read -r -t 10 reply <&9 || true
  exec 9>&-
  echo "$reply"
}

section "schema $schema ($LANES lanes), demo tables, topic"
q "DROP SCHEMA IF EXISTS demo CASCADE; DROP SCHEMA IF EXISTS $schema CASCADE;" >/dev/null
"$bin" migrate --schema "$schema" --lanes "$LANES" >"$run/migrate.log" 2>&1 || { cat "$run/migrate.log"; die "migrate failed"; }
q "CREATE SCHEMA demo;
   CREATE TABLE demo.orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, customer text NOT NULL,
                             amount_cents bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
   CREATE TABLE demo.customer_totals (customer text PRIMARY KEY, orders bigint NOT NULL, amount_cents bigint NOT NULL);" >/dev/null
stamp=$(date +%s)
topic="soak.orders.$stamp"
"$ex/soak_check" create-topic --topic "$topic" --partitions "$PARTITIONS" >"$run/create-topic.log" 2>&1 \
  || { cat "$run/create-topic.log"; die "could not create the topic"; }
export OUTBOX_SCHEMA=$schema DEMO_TOPIC=$topic DEMO_GROUP="soak-totals-$stamp" OUTBOX_LOG=${OUTBOX_LOG:-warn}

python3 scripts/soak_schedule.py "$D" "$KILLS" "$OUT_SHORT" "$SHORT_MODE" "$OUT_LONG" "$LONG_MODE" \
  "$PG_RESTARTS" "$PG_TERMINATES" "$CONSUMER_KILLS" "$CONSUMER_CRASHES" "$SEED" >"$run/schedule.txt"
declare -a ev_ms ev_kind ev_a1 ev_a2 ev_a3
while read -r t k a1 a2 a3; do
  ev_ms+=("$t"); ev_kind+=("$k"); ev_a1+=("${a1:-}"); ev_a2+=("${a2:-}"); ev_a3+=("${a3:-}")
done <"$run/schedule.txt"
n_ev=${#ev_ms[@]}
echo "schedule ($run/schedule.txt): $KILLS relay SIGKILLs spread over the run, and:"
awk '$2 != "relay_kill" { printf "  %7.1fs  %s %s %s %s\n", $1/1000, $2, $3, $4, $5 }' "$run/schedule.txt"

# ---------------------------------------------------------------- the processes
start_relay() { # slot
  local i=$1
  "$bin" run --schema "$schema" --archive --heartbeat-interval 500ms --instance-timeout 3s \
    --metrics-addr 127.0.0.1:0 --log-json >>"$run/relay-$i.log" 2>&1 </dev/null &
  relay_pid[$i]=$!; relay_restart_at[$i]=0; relay_killed[$i]=0
  relay_starts=$(( relay_starts + 1 ))
}
start_writer() { # slot
  local i=$1
  DATABASE_URL=$(url_with_app "soak-writer-$i") DEMO_CUSTOMER_PREFIX="w$i-customer" \
    "$ex/demo_writer" --orders 1000000000 --rate $(( RATE / WRITERS )) --per-tx 5 >>"$run/writer-$i.log" 2>&1 </dev/null &
  writer_pid[$i]=$!; writer_restart_at[$i]=0
}
start_consumer() {
  # Rebalances (partitions revoked and assigned) are logged at info: keep them in consumer.log.
  DATABASE_URL=$(url_with_app soak-consumer) DEMO_CRASH_ON_SIGUSR1=1 OUTBOX_LOG="$OUTBOX_LOG,outbox_relay::consumer=info" \
    DEMO_KAFKA_PROPERTIES="${SOAK_CONSUMER_PROPERTIES:-}" "$ex/demo_consumer" >>"$run/consumer.log" 2>&1 </dev/null &
  consumer_pid=$!; consumer_restart_at=0; consumer_started_ms=$(now_ms)
}

relay_starts=0; relay_unexpected=0; writer_exits=0; consumer_unexpected=0
kills_done=0; consumer_kills_done=0; consumer_crashes_done=0; crash_armed=0
pg_restarts_done=0; pg_terminates_done=0; outages_done=0; outage_active=""

# Reaps what died and restarts it (after a delay) while it is wanted.
supervise() {
  local i rc now
  now=$(now_ms)
  for ((i = 1; i <= RELAYS; i++)); do
    if [ -n "${relay_pid[$i]:-}" ] && ! kill -0 "${relay_pid[$i]}" 2>/dev/null; then
      rc=0; wait "${relay_pid[$i]}" 2>/dev/null || rc=$?
      if [ "${relay_killed[$i]}" != 1 ]; then
        relay_unexpected=$(( relay_unexpected + 1 ))
        say "!!! relay-$i (pid ${relay_pid[$i]}) exited by itself with status $rc: see $run/relay-$i.log; restarting it"
      fi
      relay_pid[$i]=""; relay_restart_at[$i]=$(( now + 1000 ))
    fi
    if [ -z "${relay_pid[$i]:-}" ] && [ "$relays_wanted" = 1 ] && [ "${relay_restart_at[$i]}" -le "$now" ]; then
      start_relay "$i"
    fi
  done
  for ((i = 1; i <= WRITERS; i++)); do
    if [ -n "${writer_pid[$i]:-}" ] && ! kill -0 "${writer_pid[$i]}" 2>/dev/null; then
      rc=0; wait "${writer_pid[$i]}" 2>/dev/null || rc=$?
      writer_exits=$(( writer_exits + 1 ))
      say "    writer-$i exited with status $rc ($(grep -v '^writer: written' "$run/writer-$i.log" | tail -n 1 | cut -c1-150)); restarting it"
      writer_pid[$i]=""; writer_restart_at[$i]=$(( now + 1000 ))
    fi
    if [ -z "${writer_pid[$i]:-}" ] && [ "$writing" = 1 ] && [ "${writer_restart_at[$i]}" -le "$now" ]; then
      start_writer "$i"
    fi
  done
  if [ -n "$consumer_pid" ] && ! kill -0 "$consumer_pid" 2>/dev/null; then
    rc=0; wait "$consumer_pid" 2>/dev/null || rc=$?
    if [ "$rc" = 3 ] && [ "$crash_armed" = 1 ]; then
      crash_armed=0
      consumer_crashes_done=$(( consumer_crashes_done + 1 ))
      say "FAULT consumer crash #$consumer_crashes_done: $(grep 'crashing after the commit' "$run/consumer.log" | tail -n 1 | sed 's/^consumer: //')"
      add_fault "consumer crash after commit #$consumer_crashes_done" consumer "$now"
    elif [ "$rc" != 137 ]; then
      consumer_unexpected=$(( consumer_unexpected + 1 ))
      say "!!! the consumer exited with status $rc: see $run/consumer.log; restarting it"
    fi
    consumer_pid=""; consumer_restart_at=$(( now + 1000 ))
  fi
  if [ -z "$consumer_pid" ] && [ "$consumer_wanted" = 1 ] && [ "$consumer_restart_at" -le "$now" ]; then
    start_consumer
  fi
}

# ---------------------------------------------------------------- samples and recovery
# A fault's recovery, measured from when it took effect (for an outage: when it ended), F:
#   outbox   until no row written before F is pending any more (the relays delivered all of it);
#   applied  until the consumer has applied as many effects as orders were written before F.
declare -a f_name f_kind f_at f_written f_out f_app f_in_outage
n_f=0
last_written=0; backlog_max=0; backlog_max_at=0; age_max=0; samples_ok=0; samples_failed=0
written=0; delivered=0; backlog=0; oldest=-1; dead=0; applied=0
last_applied=-1; applied_changed=0; last_diag=0; consumer_stalls=0; stalls_high_below=0; nudges=0; nudged_partitions=0
add_fault() { # name kind at_ms
  local w
  w=$(q "SELECT count(*) FROM demo.orders" 2>/dev/null) || w=$last_written
  f_name[$n_f]=$1; f_kind[$n_f]=$2; f_at[$n_f]=$3; f_written[$n_f]=${w:-$last_written}
  f_out[$n_f]=""; f_app[$n_f]=""; f_in_outage[$n_f]=${outage_active:+1}
  if [ "$2" = consumer ]; then f_out[$n_f]="-"; fi
  n_f=$(( n_f + 1 ))
}
sample() {
  local t line i
  t=$(now_ms)
  if ! line=$(q "SELECT (SELECT count(*) FROM demo.orders), (SELECT count(*) FROM $schema.delivered),
       (SELECT count(*) FROM $schema.messages),
       (SELECT coalesce((extract(epoch FROM min(created_at)) * 1000)::bigint, -1) FROM $schema.messages),
       (SELECT count(*) FROM $schema.dead_letters),
       (SELECT coalesce(sum(orders), 0) FROM demo.customer_totals)"); then
    samples_failed=$(( samples_failed + 1 ))
    return 1
  fi
  IFS='|' read -r written delivered backlog oldest dead applied <<<"$line"
  samples_ok=$(( samples_ok + 1 ))
  last_written=$written
  echo "$(( t - t0 )) $written $delivered $backlog $oldest $dead $applied" >>"$run/samples.txt"
  if [ "$backlog" -gt "$backlog_max" ]; then backlog_max=$backlog; backlog_max_at=$(( t - t0 )); fi
  if [ "$oldest" -gt 0 ] && [ $(( t - oldest )) -gt "$age_max" ]; then age_max=$(( t - oldest )); fi
  # A consumer that makes no progress while there is work, outside outages: ask the broker why
  # (watermarks against the archive's end, the group's committed offsets).
  if [ "$applied" != "$last_applied" ]; then last_applied=$applied; applied_changed=$t; fi
  if [ -z "$outage_active" ] && [ "$consumer_wanted" = 1 ] && [ $(( delivered - applied )) -gt 200 ] \
     && [ $(( t - applied_changed )) -gt 15000 ] && [ $(( t - last_diag )) -gt 30000 ]; then
    last_diag=$t
    consumer_stalls=$(( consumer_stalls + 1 ))
    local diag
    diag=$(timeout 30 "$ex/soak_check" watermarks --schema "$schema" --topic "$topic" --group "$DEMO_GROUP" 2>>"$run/stalls.err" | tail -n 1) || true
    printf '%s [%ss] applied %s, delivered %s, no progress for %ss: %s\n' "$(date +%H:%M:%S)" "$(fmt_s $(( t - t0 )))" \
      "$applied" "$delivered" "$(fmt_s $(( t - applied_changed )))" "$diag" >>"$run/stalls.txt"
    case "$diag" in *"watermarks: 0 of"*|"") ;; *) stalls_high_below=$(( stalls_high_below + 1 )) ;; esac
    say "    consumer stalled ${delivered} delivered / ${applied} applied, no progress for $(fmt_s $(( t - applied_changed )))s: $(sed 's/^soak_check: watermarks: //; s/;  *0:.*//' <<<"${diag:-no answer}")"
  fi
  for ((i = 0; i < n_f; i++)); do
    [ -z "${f_out[$i]}" ] || [ -z "${f_app[$i]}" ] || continue
    if [ -z "${f_out[$i]}" ] && [ "$t" -gt "${f_at[$i]}" ] && { [ "$oldest" -lt 0 ] || [ "$oldest" -gt "${f_at[$i]}" ]; }; then
      f_out[$i]=$(( t - f_at[i] ))
    fi
    if [ -z "${f_app[$i]}" ] && [ "$t" -gt "${f_at[$i]}" ] && [ "$applied" -ge "${f_written[$i]}" ]; then
      f_app[$i]=$(( t - f_at[i] ))
    fi
    if [ -n "${f_out[$i]}" ] && [ -n "${f_app[$i]}" ]; then
      say "    recovered from ${f_name[$i]}: outbox $(rec "${f_out[$i]}"), applied $(rec "${f_app[$i]}")"
    fi
  done
}
progress() {
  local alive=0 i
  for ((i = 1; i <= RELAYS; i++)); do [ -n "${relay_pid[$i]:-}" ] && alive=$(( alive + 1 )); done
  say "written $written  delivered $delivered  backlog $backlog  applied $applied  dead $dead | relays $alive/$RELAYS, kills $kills_done, proxy ${outage_active:-up}"
}

# ---------------------------------------------------------------- faults
fire() { # event index; returns 1 to retry the event a second later
  local i=$1 kind=${ev_kind[$1]} k cand n t
  case "$kind" in
    relay_kill)
      cand=()
      for ((k = 1; k <= RELAYS; k++)); do [ -n "${relay_pid[$k]:-}" ] && cand+=("$k"); done
      [ ${#cand[@]} -gt 0 ] || return 1
      k=${cand[$(( RANDOM % ${#cand[@]} ))]}
      relay_killed[$k]=1
      kill -KILL "${relay_pid[$k]}" 2>/dev/null || true
      wait "${relay_pid[$k]}" 2>/dev/null || true
      kills_done=$(( kills_done + 1 ))
      t=$(now_ms)
      say "FAULT relay SIGKILL #$kills_done: relay-$k (pid ${relay_pid[$k]})${outage_active:+, during the $outage_active outage}"
      relay_pid[$k]=""; relay_restart_at[$k]=$(( t + RANDOM % 2000 ))
      add_fault "relay SIGKILL #$kills_done" relay_kill "$t"
      ;;
    outage_start)
      outage_active="${ev_a1[$i]}"
      # Faults whose outbox has not recovered yet: their recovery now includes the outage.
      for ((k = 0; k < n_f; k++)); do [ -n "${f_out[$k]}" ] || f_in_outage[$k]=1; done
      say "FAULT broker outage ($outage_active, ${ev_a3[$i]}s, mode ${ev_a2[$i]}) begins: proxy $(proxy_cmd down "${ev_a2[$i]}")"
      ;;
    outage_end)
      outages_done=$(( outages_done + 1 ))
      say "      broker outage ($outage_active) ends: proxy $(proxy_cmd up)"
      outage_active=""
      add_fault "broker outage (${ev_a1[$i]}, ${ev_a2[$i]})" outage "$(now_ms)"
      ;;
    pg_restart)
      say "FAULT PostgreSQL restart (pg_ctl restart -m fast)"
      if as_pg_user "$OUTBOX_TEST_PG_CTL" -D "$OUTBOX_TEST_PGDATA" -l "$SERVICES_DIR/pg/server.log" -m fast -w -t 60 restart >>"$run/pg_ctl.log" 2>&1; then
        pg_restarts_done=$(( pg_restarts_done + 1 ))
        say "      PostgreSQL is back"
        add_fault "PostgreSQL restart #$pg_restarts_done" pg "$(now_ms)"
      else
        say "!!! pg_ctl restart failed: see $run/pg_ctl.log"
      fi
      ;;
    pg_terminate)
      if [ "${ev_a1[$i]}" = relays ]; then
        n=$(q "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'outbox-relay%'") || n="?"
      else
        n=$(q "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND datname = current_database()") || n="?"
      fi
      pg_terminates_done=$(( pg_terminates_done + 1 ))
      say "FAULT PostgreSQL backends terminated (${ev_a1[$i]}): $n sessions"
      add_fault "backends terminated #$pg_terminates_done (${ev_a1[$i]})" pg "$(now_ms)"
      ;;
    consumer_kill)
      [ -n "$consumer_pid" ] && [ "$crash_armed" = 0 ] && [ $(( $(now_ms) - consumer_started_ms )) -gt 5000 ] || return 1
      kill -KILL "$consumer_pid" 2>/dev/null || true
      wait "$consumer_pid" 2>/dev/null || true
      consumer_kills_done=$(( consumer_kills_done + 1 ))
      say "FAULT consumer SIGKILL #$consumer_kills_done (pid $consumer_pid)"
      consumer_pid=""; consumer_restart_at=$(( $(now_ms) + 1000 ))
      add_fault "consumer SIGKILL #$consumer_kills_done" consumer "$(now_ms)"
      ;;
    consumer_crash)
      [ -n "$consumer_pid" ] && [ "$crash_armed" = 0 ] && [ $(( $(now_ms) - consumer_started_ms )) -gt 5000 ] || return 1
      kill -USR1 "$consumer_pid" 2>/dev/null || return 1
      crash_armed=1
      say "      consumer crash armed (SIGUSR1): it stops after its next commit, before storing the offset"
      ;;
  esac
  return 0
}

# ---------------------------------------------------------------- run
section "running (logs in $run)"
relays_wanted=1; consumer_wanted=1
for ((i = 1; i <= RELAYS; i++)); do start_relay "$i"; done
start_consumer
t0=$(now_ms)
writing=1
for ((i = 1; i <= WRITERS; i++)); do start_writer "$i"; done
say "started $RELAYS relays, the consumer and $WRITERS writers on topic $topic"
next_ev=0; last_progress=0; tick=0
while true; do
  el=$(( $(now_ms) - t0 ))
  [ "$el" -lt $(( D * 1000 )) ] || break
  while [ "$next_ev" -lt "$n_ev" ] && [ "${ev_ms[$next_ev]}" -le "$el" ]; do
    if fire "$next_ev"; then next_ev=$(( next_ev + 1 )); else ev_ms[$next_ev]=$(( el + 1000 )); break; fi
  done
  supervise
  sample || true
  if [ $(( el - last_progress )) -ge 5000 ]; then progress; last_progress=$el; fi
  ms=$(( 1000 - ($(now_ms) - t0) % 1000 ))
  sleep "$(( ms / 1000 )).$(printf '%03d' $(( ms % 1000 )))"
done
if [ -n "$outage_active" ]; then say "!!! the writing time ended during an outage: proxy $(proxy_cmd up)"; outage_active=""; fi
events_missed=$(( n_ev - next_ev ))

section "writing stops; the relays drain"
writing=0
for ((i = 1; i <= WRITERS; i++)); do stop_pid "${writer_pid[$i]:-}"; writer_pid[$i]=""; done
sample || true
written_final=$written
drain_start=$(now_ms)
drained=0
while [ $(( $(now_ms) - drain_start )) -lt $(( DRAIN * 1000 )) ]; do
  supervise
  if sample && [ "$backlog" = 0 ]; then drained=1; break; fi
  if [ $(( $(now_ms) - last_progress - t0 )) -ge 5000 ]; then progress; last_progress=$(( $(now_ms) - t0 )); fi
  sleep 1
done
progress
if [ "$drained" = 1 ]; then say "the outbox is empty after $(fmt_s $(( $(now_ms) - drain_start )))s of draining"
else say "!!! the outbox still holds $backlog rows after ${DRAIN}s"; fi
relays_wanted=0
for ((i = 1; i <= RELAYS; i++)); do
  if [ -n "${relay_pid[$i]:-}" ]; then kill -TERM "${relay_pid[$i]}" 2>/dev/null || true; fi
done
for ((i = 1; i <= RELAYS; i++)); do
  p=${relay_pid[$i]:-}; [ -n "$p" ] || continue
  for _ in $(seq 1 400); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$p" 2>/dev/null; then say "!!! relay-$i did not stop within 40 s of SIGTERM: killing it"; kill -KILL "$p" 2>/dev/null || true; fi
  rc=0; wait "$p" 2>/dev/null || rc=$?
  [ "$rc" = 0 ] || say "!!! relay-$i exited with status $rc after SIGTERM"
  relay_pid[$i]=""
done
say "relays stopped"

section "the consumer catches up"
caught_up=0
catch_start=$(now_ms)
while [ $(( $(now_ms) - catch_start )) -lt $(( DRAIN * 1000 )) ]; do
  supervise
  if sample && [ "$applied" -ge "$written" ]; then caught_up=1; break; fi
  # The test broker can keep a partition's high watermark below its log end once the producers
  # that wrote there are gone, and a consumer never reads past it: after 20 s without progress,
  # soak_check nudge sends an applied record of such a partition again (the inbox must skip it),
  # which moves the watermark. At most 3 times; SOAK_FORCE_NUDGE=1 nudges every partition once
  # at the start, to try the path on a broker without the fault.
  now=$(now_ms)
  if [ "$nudges" -lt 3 ] && { { [ -n "${SOAK_FORCE_NUDGE:-}" ] && [ "$nudges" = 0 ]; } || [ $(( now - applied_changed )) -gt 20000 ]; }; then
    nudges=$(( nudges + 1 ))
    nudge_out=$(timeout 90 "$ex/soak_check" nudge --schema "$schema" --topic "$topic" ${SOAK_FORCE_NUDGE:+--force} 2>>"$run/stalls.err") || true
    while IFS= read -r l; do [ -n "$l" ] && say "    $l"; done <<<"$nudge_out"
    n=$(sed -n 's/^soak_check: nudge: \([0-9]*\) partitions nudged$/\1/p' <<<"$nudge_out" | tail -n 1)
    nudged_partitions=$(( nudged_partitions + ${n:-0} ))
    applied_changed=$now
  fi
  if [ $(( $(now_ms) - last_progress - t0 )) -ge 5000 ]; then progress; last_progress=$(( $(now_ms) - t0 )); fi
  sleep 1
done
progress
# A moment for redeliveries in flight to reach the inbox (they must be skipped), then stop it.
sleep 3
consumer_wanted=0
supervise
stop_pid "$consumer_pid"; consumer_pid=""
sample || true
[ "$caught_up" = 1 ] || say "!!! the consumer applied $applied of $written orders within ${DRAIN}s"

section "counting what reached Kafka (relays stopped; every partition from offset 0 until quiet)"
check_rc=0
"$ex/soak_check" verify --schema "$schema" --topic "$topic" --quiet-secs 5 --max-read-secs 900 \
  >"$run/check.txt" 2>"$run/check.err" || check_rc=$?
cat "$run/check.txt"
[ "$check_rc" -le 1 ] || { tail -n 5 "$run/check.err"; say "!!! soak_check failed (status $check_rc)"; }
figures=$(grep '^soak_check: committed=' "$run/check.txt" | tail -n 1 || true)
fig() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" ${figures#soak_check: }"; }

IFS='|' read -r e_written e_amount e_applied e_applied_amount e_inbox e_inbox_dead e_customers_bad < <(q "SELECT
   (SELECT count(*) FROM demo.orders), (SELECT coalesce(sum(amount_cents), 0) FROM demo.orders),
   (SELECT coalesce(sum(orders), 0) FROM demo.customer_totals), (SELECT coalesce(sum(amount_cents), 0) FROM demo.customer_totals),
   (SELECT count(*) FROM $schema.inbox WHERE consumer = 'demo-totals'), (SELECT count(*) FROM $schema.inbox_dead_letters),
   (SELECT count(*) FROM (SELECT customer, count(*) AS n, sum(amount_cents) AS a FROM demo.orders GROUP BY customer) o
      FULL JOIN demo.customer_totals t USING (customer)
      WHERE o.n IS DISTINCT FROM t.orders OR o.a IS DISTINCT FROM t.amount_cents)") || true
redeliveries=$(sed -n 's/^consumer: processed [0-9]* duplicates \([0-9]*\).*/\1/p' "$run/consumer.log" | awk '{s += $1} END {print s + 0}')
hazards=$(cat "$run"/relay-*.log | grep -ci 'hazard' || true)
relay_errors=$(cat "$run"/relay-*.log | grep '"level":"ERROR"' | grep -vc '"message":"librdkafka: ' || true)
librdkafka_errors=$(cat "$run"/relay-*.log | grep '"level":"ERROR"' | grep -c '"message":"librdkafka: ' || true)

# ---------------------------------------------------------------- summary
failures=()
check() { # description condition-result(0/1)
  if [ "$2" = 0 ]; then printf '  ok    %s\n' "$1"; else printf '  FAIL  %s\n' "$1"; failures+=("$1"); fi
}
is() { if [ "$1" = "$2" ] && [ -n "$1" ]; then echo 0; else echo 1; fi; }

section "summary (seed $SEED; logs in $run)"
committed=$(fig committed)
printf '  written (demo.orders)        %s (%s cents)\n' "${e_written:-?}" "${e_amount:-?}"
printf '  committed (outbox rows)      %s\n' "${committed:-?}"
printf '  records at Kafka             %s\n' "$(fig records)"
printf '  distinct at Kafka            %s\n' "$(fig distinct)"
printf '  duplicates at Kafka          %s\n' "$(fig duplicates)"
printf '  lost                         %s\n' "$(fig lost)"
printf '  order violations (per key)   %s\n' "$(fig order_violations)"
printf '  dead letters                 %s (inbox dead letters %s)\n' "$(fig dead_letters)" "${e_inbox_dead:-?}"
printf '  archive (informational)      delivered rows archived without an offset (-1): %s; at an offset holding another record: %s;\n' \
  "$(fig archive_no_offset)" "$(fig archive_mismatch)"
printf '                               at an offset that was not read: %s (when lost = 0 the record is elsewhere: ARCHIVE lines above)\n' "$(fig archive_unread)"
printf '  effects applied              %s (%s cents), inbox rows %s, customers whose totals differ %s\n' \
  "${e_applied:-?}" "${e_applied_amount:-?}" "${e_inbox:-?}" "${e_customers_bad:-?}"
printf '  duplicate effects            %s (redeliveries skipped by the inbox: %s, counted by consumers that exited cleanly)\n' \
  "$(( ${e_applied:-0} - ${e_inbox:-0} ))" "$redeliveries"
printf '  maximum backlog              %s rows (at %ss); oldest pending row at most %ss old\n' \
  "$backlog_max" "$(fmt_s "$backlog_max_at")" "$(fmt_s "$age_max")"
printf '  faults                       %s relay SIGKILLs, %s outages, %s PostgreSQL restarts, %s backend terminations, %s consumer SIGKILLs, %s consumer crashes after commit\n' \
  "$kills_done" "$outages_done" "$pg_restarts_done" "$pg_terminates_done" "$consumer_kills_done" "$consumer_crashes_done"
printf '  unplanned exits              relays %s, consumer %s; writer restarts %s; relay starts %s\n' \
  "$relay_unexpected" "$consumer_unexpected" "$writer_exits" "$relay_starts"
printf '  relay logs                   %s ERROR lines from the relay, %s from librdkafka (broker down during outages); %s order-hazard lines\n' \
  "$relay_errors" "$librdkafka_errors" "$hazards"
printf '  consumer stalls              %s (no progress for 15 s with work waiting, outside outages; %s with a high watermark\n' "$consumer_stalls" "$stalls_high_below"
printf '                               below the log end the archive knows; details in %s)\n' "$run/stalls.txt"
printf '  high-watermark nudges        %s partition(s) in %s try(ies): an applied record sent again where the broker kept the\n' "$nudged_partitions" "$nudges"
printf '                               high watermark below the archive'"'"'s end (the inbox must skip it; it counts as a duplicate at Kafka)\n'

echo
echo "  time to recover (outbox: every row written before the fault delivered; applied: the consumer applied"
echo "  as many effects as orders were written before it; from the fault, or from the end of an outage):"
kill_out=(); kill_app=(); unrecovered=0
for ((i = 0; i < n_f; i++)); do
  [ -n "${f_out[$i]}" ] && [ -n "${f_app[$i]}" ] || unrecovered=$(( unrecovered + 1 ))
  if [ "${f_kind[$i]}" = relay_kill ]; then
    if [ -z "${f_in_outage[$i]}" ]; then kill_out+=("${f_out[$i]:-999999999}"); kill_app+=("${f_app[$i]:-999999999}"); fi
    continue
  fi
  printf '    %-44s at %7ss   outbox %8s   applied %8s%s\n' "${f_name[$i]}" "$(fmt_s $(( f_at[i] - t0 )))" \
    "$(rec "${f_out[$i]}")" "$(rec "${f_app[$i]}")" "${f_in_outage[$i]:+   (an outage began before it recovered)}"
done
for ((i = 0; i < n_f; i++)); do
  printf '%-44s at %7ss   outbox %8s   applied %8s%s\n' "${f_name[$i]}" "$(fmt_s $(( f_at[i] - t0 )))" \
    "$(rec "${f_out[$i]}")" "$(rec "${f_app[$i]}")" "${f_in_outage[$i]:+   (in or just before an outage)}"
done >"$run/recovery.txt"
stats() { # values... -> "median X s, max Y s"
  local sorted n
  sorted=($(printf '%s\n' "$@" | sort -n)); n=${#sorted[@]}
  [ "$n" -gt 0 ] || { echo "-"; return; }
  echo "median $(rec "${sorted[$(( n / 2 ))]}"), max $(rec "${sorted[$(( n - 1 ))]}")"
}
printf '    %-44s outbox %s; applied %s\n' "relay SIGKILLs outside outages (${#kill_out[@]})" "$(stats "${kill_out[@]}")" "$(stats "${kill_app[@]}")"
printf '    %-44s (their recovery includes the outage'"'"'s)\n' "relay SIGKILLs in or just before outages ($(( kills_done - ${#kill_out[@]} )))"
echo "    (every fault with its recovery: $run/recovery.txt)"

echo
committed_ok=$(is "$committed" "${e_written:-}")
check "lost = 0" "$(is "$(fig lost)" 0)"
check "order violations = 0" "$(is "$(fig order_violations)" 0)"
check "distinct at Kafka = committed = written" "$( [ "$(is "$(fig distinct)" "$committed")" = 0 ] && echo "$committed_ok" || echo 1)"
check "nothing pending after the drain" "$(is "$(fig pending)" 0)"
check "dead letters = 0" "$(is "$(fig dead_letters)" 0)"
check "effects applied exactly once (applied = inbox rows = written, amounts equal, every customer's totals right)" "$(
  [ "$(is "${e_applied:-}" "${e_written:-}")" = 0 ] && [ "$(is "${e_inbox:-}" "${e_written:-}")" = 0 ] \
  && [ "$(is "${e_applied_amount:-}" "${e_amount:-}")" = 0 ] && [ "$(is "${e_customers_bad:-}" 0)" = 0 ] && echo 0 || echo 1)"
check "inbox dead letters = 0" "$(is "${e_inbox_dead:-}" 0)"
check "$KILLS relay SIGKILLs injected (done: $kills_done)" "$( [ "$kills_done" -ge "$KILLS" ] && echo 0 || echo 1)"
check "both outages injected (done: $outages_done)" "$(is "$outages_done" 2)"
check "PostgreSQL restarted $PG_RESTARTS time(s) (done: $pg_restarts_done), backends terminated $PG_TERMINATES time(s) (done: $pg_terminates_done)" \
  "$( [ "$pg_restarts_done" -ge "$PG_RESTARTS" ] && [ "$pg_terminates_done" -ge "$PG_TERMINATES" ] && echo 0 || echo 1)"
check "consumer SIGKILLed $CONSUMER_KILLS time(s) (done: $consumer_kills_done) and crashed after commit $CONSUMER_CRASHES time(s) (done: $consumer_crashes_done)" \
  "$( [ "$consumer_kills_done" -ge "$CONSUMER_KILLS" ] && [ "$consumer_crashes_done" -ge "$CONSUMER_CRASHES" ] && echo 0 || echo 1)"
check "every fault recovered ($unrecovered did not)" "$(is "$unrecovered" 0)"
check "the verifier ran (status $check_rc)" "$( [ "$check_rc" -le 1 ] && echo 0 || echo 1)"
echo
if [ ${#failures[@]} -eq 0 ]; then
  echo "soak: PASS"
else
  echo "soak: FAIL (${#failures[@]} checks failed; details in $run)"
  exit 1
fi
