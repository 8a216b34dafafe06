#!/usr/bin/env bash
# Validates the container files without a Docker engine (none runs on the CI machines):
#   - docker/Dockerfile passes hadolint (installed from a hash-pinned wheel under target/);
#   - docker/compose.yml parses (`docker-compose config`, Debian's docker-compose) with defaults
#     and with overridden ports and credentials;
#   - every image is pinned to a version, the runtime image runs as a non-root user and has a
#     health check, and every long-running service has a health check;
#   - then scripts/check-observability.sh: the Prometheus configuration, alert rules and their
#     tests, and the Grafana dashboard.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dir="$root/target/tools"
mkdir -p "$dir"
fail() { echo "check-docker: $*" >&2; exit 1; }

if [ ! -x "$dir/venv/bin/hadolint" ]; then
  python3 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --require-hashes \
    -r scripts/hadolint-requirements.txt || fail "could not install hadolint"
fi
"$dir/venv/bin/hadolint" docker/Dockerfile || fail "hadolint found problems in docker/Dockerfile"
echo "check-docker: hadolint: docker/Dockerfile is clean"

if ! command -v docker-compose >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || fail "docker-compose is missing: apt-get install docker-compose"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null \
    || fail "apt-get install docker-compose failed"
fi
rendered=$(cd docker && docker-compose -f compose.yml config) || fail "docker/compose.yml is not valid"
overridden=$(cd docker && POSTGRES_PORT=16432 KAFKA_PORT=19999 POSTGRES_PASSWORD=other docker-compose -f compose.yml config) \
  || fail "docker/compose.yml is not valid with overrides"
grep -q "published: 16432" <<<"$overridden" || fail "POSTGRES_PORT does not override the published port"
grep -q "outbox:other@postgres" <<<"$overridden" || fail "POSTGRES_PASSWORD does not reach the relay's DATABASE_URL"
echo "check-docker: docker-compose config: docker/compose.yml is valid (defaults and overrides)"

while read -r image; do
  [ "$image" = outbox-relay:local ] && continue   # built from docker/Dockerfile
  case "$image" in
    *:latest) fail "image $image is not pinned to a version" ;;
    *:*) ;;
    *) fail "image $image has no tag" ;;
  esac
done < <(grep -E '^\s+image:' <<<"$rendered" | awk '{print $2}' | sort -u)
grep -E '^FROM ' docker/Dockerfile | grep -qv ':' && fail "a FROM line has no tag"
grep -qE '^USER [0-9]+' docker/Dockerfile || fail "the runtime image does not switch to a numeric non-root USER"
grep -q '^HEALTHCHECK ' docker/Dockerfile || fail "the Dockerfile has no HEALTHCHECK"
for svc in postgres kafka relay demo-consumer demo-writer prometheus grafana; do
  awk -v s="  $svc:" '$0==s{f=1;next} /^  [a-z-]+:$/{f=0} f' docker/compose.yml | grep -q 'healthcheck:' \
    || fail "service $svc has no health check"
done
echo "check-docker: images pinned, non-root user, health checks present"
bash scripts/check-observability.sh   # the alert rules, their tests and the dashboard
