#!/usr/bin/env bash
# Provisions what the writer examples in other languages need (examples/python, examples/node):
#   - a Python virtual environment in target/writers/venv with examples/python/requirements.txt;
#   - examples/node/node_modules from examples/node/package-lock.json (npm ci).
# Installs python3-venv, nodejs and npm with apt-get when they are missing and this is root, like
# scripts/bootstrap.sh. Idempotent: does nothing when both are in place and their dependency files
# have not changed since. Prints one short status line per runtime; errors say what is missing and
# how to install it.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dir="$root/target/writers"
venv="$dir/venv"
node_dir="$root/examples/node"
mkdir -p "$dir"

log() { printf 'writers-setup: %s\n' "$*"; }
die() { printf 'writers-setup: error: %s\n' "$*" >&2; exit 1; }

# Tests run in parallel processes: one provisioning at a time, the others wait and then find it done.
exec 9>"$dir/setup.lock"
flock -w 900 9 || die "another writers-setup has held $dir/setup.lock for 15 minutes"

stamp_of() { # the files' contents and the runtime's version, as one hash
  { cat "$@"; "$runtime" --version 2>&1; } | sha256sum | cut -d' ' -f1
}

missing=()
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    die "missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root"
  fi
  log "installing ${missing[*]}"
  apt_net=(-o Acquire::Retries=2 -o Acquire::http::Timeout=60 -o Acquire::https::Timeout=60)
  timeout 600 apt-get "${apt_net[@]}" update -qq \
    || die "apt-get update failed; install ${missing[*]} by hand (apt-get install ${missing[*]})"
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get "${apt_net[@]}" install -y -qq "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed; install them by hand"
  for tool in python3 node npm; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is still missing after installing ${missing[*]}; install it by hand"
  done
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || die "python3 has no venv module; apt-get install python3-venv"
fi

# Python: the venv, rebuilt when requirements.txt or the interpreter changed.
requirements="$root/examples/python/requirements.txt"
runtime=python3
want=$(stamp_of "$requirements")
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.provisioned" 2>/dev/null)" = "$want" ] \
  && "$venv/bin/python" -c 'import psycopg' >/dev/null 2>&1; then
  log "python: ready ($venv)"
else
  log "python: creating $venv"
  rm -rf "$venv"
  python3 -m venv "$venv" || die "python3 -m venv failed; install python3-venv (apt-get install python3-venv)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --timeout 60 --retries 2 \
    -r "$requirements" || die "pip install -r examples/python/requirements.txt failed (see above)"
  "$venv/bin/python" -c 'import psycopg' || die "psycopg does not import in $venv (see above)"
  printf '%s\n' "$want" >"$venv/.provisioned"
  log "python: ready (psycopg $("$venv/bin/python" -c 'import psycopg; print(psycopg.__version__)'))"
fi

# Node: node_modules, reinstalled when the lockfile or node changed.
runtime=node
if [ -f "$node_dir/package-lock.json" ]; then
  want=$(stamp_of "$node_dir/package.json" "$node_dir/package-lock.json")
  install=(ci)
else
  want=$(stamp_of "$node_dir/package.json")
  install=(install)
fi
if [ -d "$node_dir/node_modules/pg" ] && [ "$(cat "$node_dir/node_modules/.provisioned" 2>/dev/null)" = "$want" ]; then
  log "node: ready ($node_dir/node_modules)"
else
  log "node: npm ${install[*]} in examples/node"
  (cd "$node_dir" && npm "${install[@]}" --fetch-timeout=60000 --fetch-retries=2 --no-audit --no-fund \
    --loglevel=error >/dev/null) || die "npm ${install[*]} in examples/node failed (see above)"
  node -e 'require.resolve("pg", { paths: [process.argv[1]] })' "$node_dir" >/dev/null 2>&1 \
    || die "pg does not resolve in examples/node after npm ${install[*]}"
  printf '%s\n' "$want" >"$node_dir/node_modules/.provisioned"
  log "node: ready (pg $(node -p 'require(process.argv[1] + "/node_modules/pg/package.json").version' "$node_dir"))"
fi
