#!/usr/bin/env bash
# Renders the Grafana dashboard's panels with real data, where no Grafana runs: a demo run
# (scripts/demo.sh: relay killed and restarted halfway) scraped every second by a local
# Prometheus, then every panel's queries asked of it over the demo's span and drawn
# (scripts/render_dashboard.py, matplotlib in a venv under target/) into docs/dashboard.png.
#
#   DEMO_ORDERS (40000) DEMO_RATE (400): the demo's workload; OUT (docs/dashboard.png).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
work="$root/target/render"
out=${OUT:-docs/dashboard.png}
command -v prometheus >/dev/null || { echo "render: prometheus is missing: apt-get install prometheus" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
relay_port=$(free_port); consumer_port=$(free_port); prom_port=$(free_port)
rm -rf "$work" && mkdir -p "$work"
cat >"$work/prometheus.yml" <<YML
global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: outbox-relay
    static_configs: [{targets: ["127.0.0.1:$relay_port"]}]
  - job_name: outbox-inbox
    static_configs: [{targets: ["127.0.0.1:$consumer_port"]}]
YML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
prom_pid=$!
trap 'kill $prom_pid 2>/dev/null || true' EXIT
start=$(date +%s)
DEMO_ORDERS=${DEMO_ORDERS:-40000} DEMO_RATE=${DEMO_RATE:-400} \
  DEMO_RELAY_METRICS_ADDR="127.0.0.1:$relay_port" DEMO_METRICS_ADDR="127.0.0.1:$consumer_port" \
  bash scripts/demo.sh
end=$(( $(date +%s) + 2 ))
sleep 3
[ -x "$work/venv/bin/python" ] || python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q matplotlib==3.9.2
"$work/venv/bin/python" scripts/render_dashboard.py --prometheus "http://127.0.0.1:$prom_port" \
  --start "$start" --end "$end" --dashboard docker/grafana/dashboards/outbox-relay.json --out "$out"
