#!/usr/bin/env python3
"""Checks that the dashboard and the alert rules use only metrics the relay exports.

The metric names are the `describe_counter!/describe_gauge!/describe_histogram!` names of
src/telemetry.rs, plus `up`. Histograms are exported with `_bucket`/`_sum`/`_count` series when
src/health.rs gives the exporter buckets (`set_buckets`), as summaries (the bare name with a
`quantile` label, `_sum`, `_count`) otherwise: a histogram name is accepted only in the shapes that
are really exported.

Also checked: the dashboard JSON parses, every panel has a title, every panel but a row has at
least one target with an expression, each on the provisioned data source; every alert has `for`,
a severity and a summary and description, the description naming a command in backquotes; the
series of the rule tests are exported metrics too.

With `--promql-rules FILE`, writes the dashboard's expressions (Grafana's variables replaced) as
recording rules to FILE, for `promtool check rules` to parse.

Exits 1 naming each panel or alert at fault.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TELEMETRY = ROOT / "src/telemetry.rs"
EXPORTER = ROOT / "src/health.rs"
DASHBOARD = ROOT / "docker/grafana/dashboards/outbox-relay.json"
DATASOURCES = ROOT / "docker/grafana/provisioning/datasources/prometheus.yml"
ALERTS = ROOT / "docker/prometheus/alerts.yml"
ALERT_TESTS = ROOT / "docker/prometheus/alerts_test.yml"
SEVERITIES = {"critical", "warning", "info"}

# PromQL words that are not metric names: operators, modifiers, aggregations (they may be followed
# by `by (...)` rather than by their parenthesis).
KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "offset", "atan2", "inf", "nan", "sum", "min", "max", "avg", "group", "stddev", "stdvar",
    "count", "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}


def exported_metrics():
    """{name: kind} from src/telemetry.rs."""
    text = TELEMETRY.read_text()
    found = re.findall(r'describe_(counter|gauge|histogram)!\(\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"', text)
    if not found:
        sys.exit(f"check_metrics_names: no describe_*! names found in {TELEMETRY.relative_to(ROOT)}")
    return {name: kind for kind, name in found}


def histogram_shape():
    """'histogram' when the exporter is given buckets, else 'summary'."""
    return "histogram" if re.search(r"\.set_buckets\(", EXPORTER.read_text()) else "summary"


def allowed_names(metrics, shape):
    names = {"up"}
    for name, kind in metrics.items():
        if kind != "histogram":
            names.add(name)
        elif shape == "histogram":
            names.update({name + "_bucket", name + "_sum", name + "_count"})
        else:
            names.update({name, name + "_sum", name + "_count"})
    return names


def referenced_names(expr):
    """Metric names an expression selects (not functions, labels, keywords, durations or strings)."""
    s = re.sub(r"\$\{?__\w+\}?", "5m", expr)                  # Grafana's $__rate_interval etc.
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', s)
    s = re.sub(r"\{[^}]*\}", " ", s)                          # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                         # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", s)
    names = []
    for m in re.finditer(r"(?<![A-Za-z0-9_:.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = m.group(0)
        if word.lower() in KEYWORDS or re.match(r"\s*\(", s[m.end():]):
            continue
        names.append(word)
    return names


def check_names(where, expr, allowed, metrics, shape, errors):
    for name in referenced_names(expr):
        if name in allowed:
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if metrics.get(base) == "histogram" or metrics.get(name) == "histogram":
            errors.append(f"{where}: {name}: {base} is a histogram exported as a {shape}: "
                          + ("use _bucket, _sum or _count" if shape == "histogram" else "no _bucket series"))
        else:
            errors.append(f"{where}: {name} is not a metric src/telemetry.rs defines (nor up)")


def walk_panels(panels):
    for p in panels or []:
        yield p
        yield from walk_panels(p.get("panels"))


def check_dashboard(allowed, metrics, shape, errors, rules_out):
    rel = DASHBOARD.relative_to(ROOT)
    try:
        dash = json.loads(DASHBOARD.read_text())
    except (OSError, ValueError) as e:
        errors.append(f"{rel}: does not parse: {e}")
        return 0
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    records, count, ids = [], 0, set()
    for p in walk_panels(dash.get("panels")):
        title = (p.get("title") or "").strip()
        where = f'{rel}: panel {p.get("id")} "{title}"'
        if not title:
            errors.append(f"{where}: no title")
        if p.get("id") in ids:
            errors.append(f"{where}: duplicate panel id")
        ids.add(p.get("id"))
        if p.get("type") == "row":
            continue
        count += 1
        targets = [t for t in p.get("targets") or [] if (t.get("expr") or "").strip()]
        if not targets:
            errors.append(f"{where}: no target with an expression")
        for t in [p] + targets:
            ds = t.get("datasource")
            if isinstance(ds, dict) and ds.get("uid") not in (uid, None):
                errors.append(f'{where}: data source uid {ds.get("uid")!r}, not the provisioned {uid!r}')
        for t in targets:
            check_names(f'{where} target {t.get("refId")}', t["expr"], allowed, metrics, shape, errors)
            records.append({"record": f'dashboard:panel_{p.get("id")}_{t.get("refId")}',
                            "expr": re.sub(r"\$\{?__\w+\}?", "5m", t["expr"])})
    for v in (dash.get("templating") or {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.match(r"\s*label_values\((.*),\s*\w+\s*\)\s*$", q or "")
        if m:
            check_names(f'{rel}: variable {v.get("name")}', m.group(1), allowed, metrics, shape, errors)
    if rules_out:
        Path(rules_out).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    return count


def check_alerts(allowed, metrics, shape, errors):
    rel = ALERTS.relative_to(ROOT)
    try:
        doc = yaml.safe_load(ALERTS.read_text())
    except (OSError, yaml.YAMLError) as e:
        errors.append(f"{rel}: does not parse: {e}")
        return 0
    count = 0
    for g in doc.get("groups") or []:
        for r in g.get("rules") or []:
            name = r.get("alert") or r.get("record")
            where = f'{rel}: {"alert" if "alert" in r else "rule"} {name}'
            check_names(where, str(r.get("expr", "")), allowed, metrics, shape, errors)
            if "alert" not in r:
                continue
            count += 1
            ann = r.get("annotations") or {}
            if "for" not in r:
                errors.append(f"{where}: no for:")
            if (r.get("labels") or {}).get("severity") not in SEVERITIES:
                errors.append(f"{where}: severity label not one of {sorted(SEVERITIES)}")
            for key in ("summary", "description"):
                if not str(ann.get(key, "")).strip():
                    errors.append(f"{where}: no annotations.{key}")
            if not re.search(r"`[^`]+`", str(ann.get("description", ""))):
                errors.append(f"{where}: the description names no command to run (in backquotes)")
    if count == 0:
        errors.append(f"{rel}: no alert rules")
    try:
        tests = yaml.safe_load(ALERT_TESTS.read_text())
    except (OSError, yaml.YAMLError) as e:
        errors.append(f"{ALERT_TESTS.relative_to(ROOT)}: does not parse: {e}")
        return count
    for i, t in enumerate(tests.get("tests") or []):
        for s in t.get("input_series") or []:
            name = re.match(r"\s*([A-Za-z_:][A-Za-z0-9_:]*)", s.get("series", ""))
            if not name or name.group(1) not in allowed:
                errors.append(f"{ALERT_TESTS.relative_to(ROOT)}: test {i + 1}: series {s.get('series')!r} "
                              "is not an exported metric")
    return count


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--promql-rules", help="write the dashboard's expressions as recording rules here")
    args = ap.parse_args()
    metrics = exported_metrics()
    shape = histogram_shape()
    allowed = allowed_names(metrics, shape)
    errors = []
    panels = check_dashboard(allowed, metrics, shape, errors, args.promql_rules)
    alerts = check_alerts(allowed, metrics, shape, errors)
    if errors:
        for e in errors:
            print(f"check_metrics_names: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{panels} panels and {alerts} alerts use only the {len(metrics)} metrics of src/telemetry.rs "
          f"(histograms as {shape}s) and up")


if __name__ == "__main__":
    main()
