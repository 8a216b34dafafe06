"""Draws every panel of the Grafana dashboard from a Prometheus's data: each panel's queries over
[start, end] (query_range), timeseries as lines, stats as their last value, into one PNG."""
import argparse
import json
import math
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def query_range(base, expr, start, end, step):
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{q}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise SystemExit(f"render: query failed: {expr}: {body}")
    return body["data"]["result"]


def concrete(expr):
    # The dashboard's variables: every instance, and a rate window that fits a 1 s scrape.
    return expr.replace('instance=~"$instance"', 'instance=~".*"').replace("$__rate_interval", "15s")


def label(metric, target, expr_index):
    fmt = target.get("legendFormat")
    if fmt and fmt != "__auto":
        for k, v in metric.items():
            fmt = fmt.replace("{{" + k + "}}", v)
        return fmt
    names = {k: v for k, v in metric.items() if k not in ("__name__", "job", "instance")}
    text = ", ".join(f"{k}={v}" for k, v in sorted(names.items()))
    return text or f"query {expr_index + 1}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--start", type=float, required=True)
    ap.add_argument("--end", type=float, required=True)
    ap.add_argument("--dashboard", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dash = json.load(open(a.dashboard))
    panels = [p for p in dash["panels"] if p.get("type") in ("timeseries", "stat")]
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 5.2, rows * 3.2))
    empty = []
    for ax, p in zip(axes.flat, panels):
        ax.set_title(p["title"], fontsize=9)
        ax.tick_params(labelsize=7)
        drawn = 0
        for i, t in enumerate(p.get("targets", [])):
            for series in query_range(a.prometheus, concrete(t["expr"]), a.start, a.end, 2):
                xs = [float(v[0]) - a.start for v in series["values"]]
                ys = [float(v[1]) for v in series["values"]]
                ys = [0.0 if math.isnan(y) else y for y in ys]
                if p["type"] == "stat":
                    # At 90% of the run: the demo stops every process at its end.
                    at = [y for x, y in zip(xs, ys) if x <= 0.9 * (a.end - a.start)] or ys
                    ax.text(0.5, 0.5 - 0.2 * drawn, f"{at[-1]:.3g}" if at else "-", ha="center", va="center",
                            fontsize=22, transform=ax.transAxes)
                    ax.text(0.5, 0.08, f"at {0.9 * (a.end - a.start):.0f} s", ha="center", fontsize=7,
                            color="grey", transform=ax.transAxes)
                    ax.set_xticks([])
                    ax.set_yticks([])
                else:
                    ax.plot(xs, ys, linewidth=1, label=label(series["metric"], t, i))
                drawn += 1
        if drawn == 0:
            empty.append(p["title"])
            ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", fontsize=9, color="grey",
                    transform=ax.transAxes)
        elif p["type"] != "stat":
            ax.set_xlabel("seconds into the demo", fontsize=7)
            ax.legend(fontsize=6, loc="upper right")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{dash.get('title', 'dashboard')}: a demo run (relay killed and restarted halfway)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(a.out, dpi=80)
    print(f"render: {len(panels)} panels drawn into {a.out}; without data in this run: {', '.join(empty) or 'none'}")


if __name__ == "__main__":
    main()
