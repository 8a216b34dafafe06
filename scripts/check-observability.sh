#!/usr/bin/env bash
# Validates the product's alert rules and dashboard without a Docker engine or a running
# Prometheus (scripts/check-docker.sh runs it last):
#   - promtool (Debian's prometheus package, installed when missing) checks
#     docker/prometheus/prometheus.yml, the rules in docker/prometheus/alerts.yml, and runs their
#     unit tests (docker/prometheus/alerts_test.yml);
#   - scripts/check_metrics_names.py: the dashboard (docker/grafana/dashboards/outbox-relay.json)
#     parses, every panel has a title and a query, and the dashboard, the alerts and their tests
#     use only the metrics src/telemetry.rs defines (plus up); promtool parses every dashboard query.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
started=$SECONDS
fail() { echo "check-observability: $*" >&2; exit 1; }
ok() { echo "check-observability: $*"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

apt_install() {
  [ "$(id -u)" = 0 ] || fail "$1 is missing: run sudo apt-get update && sudo apt-get install -y --no-install-recommends $2"
  local apt=(apt-get -o Acquire::http::Timeout=30 -o Acquire::Retries=2)
  "${apt[@]}" update -qq && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq --no-install-recommends "$2" >/dev/null \
    || fail "apt-get install $2 failed"
}

# (a) promtool
command -v promtool >/dev/null 2>&1 || apt_install promtool prometheus
command -v promtool >/dev/null 2>&1 || fail "promtool is still missing after installing prometheus"
version=$(promtool --version 2>&1) || fail "promtool does not run: $version"
ok "promtool: ${version%%$'\n'*}"

# (b) the configuration, the rules and their tests. The configuration names the rules by their path
# in the container (the compose file mounts docker/prometheus at /etc/prometheus): it is checked
# as a copy that names the file in this checkout.
in_container=/etc/prometheus/alerts.yml
grep -qE "^\s+- $in_container\s*$" docker/prometheus/prometheus.yml \
  || fail "docker/prometheus/prometheus.yml does not load $in_container"
grep -qE '^\s+- \./prometheus:/etc/prometheus(:ro)?\s*$' docker/compose.yml \
  || fail "docker/compose.yml does not mount ./prometheus at /etc/prometheus"
sed "s#$in_container#$root/docker/prometheus/alerts.yml#" docker/prometheus/prometheus.yml >"$tmp/prometheus.yml"
promtool check config "$tmp/prometheus.yml" >"$tmp/out" 2>&1 || { cat "$tmp/out" >&2; fail "docker/prometheus/prometheus.yml or the rules it loads are not valid"; }
ok "promtool check config: docker/prometheus/prometheus.yml is valid (rules included)"
promtool check rules docker/prometheus/alerts.yml >"$tmp/out" 2>&1 || { cat "$tmp/out" >&2; fail "docker/prometheus/alerts.yml is not valid"; }
ok "promtool check rules: docker/prometheus/alerts.yml: $(grep -o '[0-9]* rules found' "$tmp/out")"
promtool test rules docker/prometheus/alerts_test.yml >"$tmp/out" 2>&1 || { cat "$tmp/out" >&2; fail "the alert rules' unit tests failed"; }
ok "promtool test rules: docker/prometheus/alerts_test.yml passes"

# (c) metric names, panels, alert annotations; then promtool parses the dashboard's queries.
py=""
for candidate in python3 /usr/bin/python3; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import yaml' 2>/dev/null; then py=$candidate; break; fi
done
if [ -z "$py" ]; then
  apt_install "PyYAML" python3-yaml
  py=/usr/bin/python3
fi
summary=$("$py" scripts/check_metrics_names.py --promql-rules "$tmp/dashboard-rules.yml") \
  || fail "the dashboard or the alert rules are not as required (above)"
ok "metric names: $summary"
promtool check rules "$tmp/dashboard-rules.yml" >"$tmp/out" 2>&1 \
  || { sed "s#$tmp/dashboard-rules.yml#dashboard#" "$tmp/out" >&2; fail "a dashboard query is not valid PromQL (the rule names the panel id and query)"; }
ok "dashboard queries: $(grep -o '[0-9]* rules found' "$tmp/out" | sed 's/rules found/parse as PromQL/')"
ok "all checks passed in $((SECONDS - started)) s"
