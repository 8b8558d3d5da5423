"""CSV tables and SVG latency plots from benchmark records (the JSONL that bench/ writes).

One CSV and one SVG per op, direction and suite (where records have one): a row per
record; in the plot, one line per implementation, x = workload (in the order met), y = p50
latency in ms on a log scale, as the kernels-benchmarks suite draws them. Plain SVG, no
plotting library, so it runs on a bare GPU machine.

    python bench/plots.py bench/results/kernels_h100.jsonl --out bench/results/plots
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections import OrderedDict
from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")


def load(paths) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def workload_label(r: dict) -> str:
    """x-axis label: the workload's name where the record names its op (bench/ops.py), else
    its dimensions."""
    wl = r["wl"]
    if r.get("op"):
        return wl.get("name", "?")
    return " ".join(f"{k}={v}" for k, v in wl.items() if k != "name") or wl.get("name", "?")


def group(rows) -> "OrderedDict[tuple[str, str, str], list[dict]]":
    """(op, direction, suite) -> its records, in file order."""
    groups: OrderedDict = OrderedDict()
    for r in rows:
        op = r.get("op") or r["wl"].get("name", "?")
        key = (op, r.get("direction") or r.get("how") or r.get("mode") or "", r.get("suite") or "")
        groups.setdefault(key, []).append(r)
    return groups


def write_csv(path: str, records: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["impl", "workload", "p50_ms", "p10_ms", "p90_ms", "gbps", "frac_copy_ceiling", "tflops",
                    "frac_matmul_peak", "peak_bytes", "compile_ms", "ok", "chose", "err", "gpu"])
        for r in records:
            lat = r.get("lat_ms") or {}
            w.writerow([r["impl"], workload_label(r), lat.get("p50"), lat.get("p10"), lat.get("p90"),
                        r.get("gbps"), r.get("frac_copy_ceiling"), r.get("tflops"), r.get("frac_matmul_peak"),
                        r.get("peak_bytes"), r.get("compile_ms"), r.get("ok"), r.get("chose"), r.get("err"),
                        (r.get("env") or {}).get("gpu")])


def svg(title: str, records: list[dict], width: int = 720, height: int = 400) -> str:
    """A line per impl over the workloads, p50 ms on a log axis; failed runs are left out."""
    workloads = list(OrderedDict.fromkeys(workload_label(r) for r in records))
    lines: OrderedDict = OrderedDict()
    for r in records:
        p50 = (r.get("lat_ms") or {}).get("p50")
        if r.get("ok", True) and p50:
            lines.setdefault(r["impl"], {})[workload_label(r)] = p50
    values = [v for pts in lines.values() for v in pts.values()]
    left, right, top, bottom = 70, 170, 40, 90
    plot_w, plot_h = width - left - right, height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11">', f'<text x="{left}" y="20" font-size="14">{escape(title)}</text>']
    if not values:
        out.append(f'<text x="{left}" y="{top + 20}">no successful runs</text></svg>')
        return "\n".join(out)
    lo, hi = math.log10(min(values)), math.log10(max(values))
    lo, hi = (lo - 0.1, hi + 0.1) if hi - lo < 1e-9 else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))

    def x_of(i):
        return left + (plot_w * (i + 0.5) / len(workloads))

    def y_of(v):
        return top + plot_h * (hi - math.log10(v)) / (hi - lo)

    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 2, 5):
            v = m * 10.0 ** e
            if lo <= math.log10(v) <= hi:
                y = y_of(v)
                out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
                out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append(f'<text x="16" y="{top + plot_h / 2}" transform="rotate(-90 16 {top + plot_h / 2})" '
               f'text-anchor="middle">p50 latency (ms, log)</text>')
    for i, label in enumerate(workloads):
        x = x_of(i)
        out.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" text-anchor="end" '
                   f'transform="rotate(-30 {x:.1f} {top + plot_h + 14})">{escape(label)}</text>')
    for k, (impl, pts) in enumerate(lines.items()):
        color = COLORS[k % len(COLORS)]
        xy = [(x_of(i), y_of(pts[w])) for i, w in enumerate(workloads) if w in pts]
        if len(xy) > 1:
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                       + " ".join(f"{x:.1f},{y:.1f}" for x, y in xy) + '"/>')
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in xy]
        ly = top + 14 * k + 8
        out.append(f'<line x1="{left + plot_w + 10}" x2="{left + plot_w + 28}" y1="{ly}" y2="{ly}" stroke="{color}" '
                   f'stroke-width="2"/><text x="{left + plot_w + 32}" y="{ly + 4}">{escape(impl)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for (op, direction, suite), records in group(load(args.jsonl)).items():
        stem = "_".join(filter(None, (op, direction.replace("+", "_"), suite))).replace("/", "-")
        gpu = next(((r.get("env") or {}).get("gpu") for r in records if r.get("env")), "")
        write_csv(os.path.join(args.out, f"{stem}.csv"), records)
        with open(os.path.join(args.out, f"{stem}.svg"), "w") as f:
            f.write(svg(" ".join(filter(None, (op, direction, suite, "—", gpu))), records))
        print(f"{stem}: {len(records)} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
