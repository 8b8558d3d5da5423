"""Medians over fresh processes: the rows of repeated runs of ``whole_model.py``,
``decode.py``, ``host_cost.py`` and ``compile_time.py`` (the JSONL files under DIR, every process appending),
as one table per file with the median of the per-process values, their spread (min-max),
and the ratio to Inductor's median from the same run.

    python bench/medians.py DIR [--md DIR/medians.md]

A number reported from a GPU run is the median of at least 3 fresh processes beside its
baseline from the same device call (bench/README.md); this is the table that says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def whole_model_table(rows: list[dict]) -> list[str]:
    """Per workload and impl: median p50 ms over processes, spread, ratio, IQR, compile s, peak."""
    groups = defaultdict(list)
    for r in rows:
        if r.get("ok") and r.get("lat_ms"):
            groups[(r["wl"]["name"], r["impl"])].append(r)
    if not groups:
        return []
    medians = {key: statistics.median(r["lat_ms"]["p50"] for r in rs) for key, rs in groups.items()}
    out = ["| workload | impl | processes | p50 ms (median) | spread | x Inductor | step IQR ms | "
           "compile s (first process) | warm compile s | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (name, impl), rs in sorted(groups.items()):
        ms = medians[(name, impl)]
        base = medians.get((name, "inductor"))
        ratio = f"{base / ms:.2f}" if base else "-"
        iqr = statistics.median(r["lat_ms"]["iqr"] for r in rs)
        peak = max((r.get("peak_bytes") or 0) for r in rs) / 2**30
        warm = rs[0].get("compile_warm_ms")  # hubcompile's caches on disk, Inductor's fresh
        out.append(f"| {name} | {impl} | {len(rs)} | {ms:.2f} | {_spread([r['lat_ms']['p50'] for r in rs])} | "
                   f"{ratio} | {iqr:.2f} | {rs[0].get('compile_ms', 0) / 1e3:.1f} | "
                   f"{f'{warm / 1e3:.1f}' if warm else '-'} | {peak:.2f} |")
    return out


def decode_table(rows: list[dict]) -> list[str]:
    """Per workload, mode, batch and impl: median decode tok/s over processes, spread, ratio."""
    groups = defaultdict(list)
    for r in rows:
        if r.get("ok") and r.get("tok_s"):
            wl = r["wl"]
            groups[(wl["name"], str(wl.get("mode")), wl["batch"], r["impl"])].append(r)
    if not groups:
        return []
    medians = {key: statistics.median(r["tok_s"]["decode"] for r in rs) for key, rs in groups.items()}
    out = ["| workload | mode | batch | impl | processes | decode tok/s (median) | spread | x Inductor | "
           "x Inductor per round (interleaved: median, spread) | compile s (first) | tokens as Inductor's |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, mode, batch, impl), rs in sorted(groups.items()):
        tok = medians[(name, mode, batch, impl)]
        base = medians.get((name, mode, batch, "inductor"))
        ratio = f"{tok / base:.2f}" if base else "-"
        same = {str(r.get("first_diff_vs_inductor", "-")) for r in rs}
        # interleaved rows: each process's median over rounds of Inductor's time over this impl's
        rounds = [r["ratio_rounds"]["median"] for r in rs if r.get("ratio_rounds")]
        per_round = f"{statistics.median(rounds):.3f} ({min(rounds):.3f}-{max(rounds):.3f})" if rounds else "-"
        out.append(f"| {name} | {mode} | {batch} | {impl} | {len(rs)} | {tok:.1f} | "
                   f"{_spread([r['tok_s']['decode'] for r in rs])} | {ratio} | {per_round} | "
                   f"{rs[0].get('compile_s', 0):.1f} | "
                   f"{'same' if same == {'None'} else 'first diff at ' + ', '.join(sorted(same))} |")
    return out


def host_cost_table(rows: list[dict]) -> list[str]:
    """Per family, direction and impl: median us per call over processes, and the ratio to
    Inductor's us per kernel launch."""
    groups = defaultdict(list)
    for r in rows:
        if r.get("us_per_call") is not None:
            groups[(r["wl"]["family"], r["wl"]["direction"], r["impl"])].append(r)
    if not groups:
        return []
    medians = {key: statistics.median(r["us_per_call"] for r in rs) for key, rs in groups.items()}
    out = ["| family | direction | impl | processes | us per call (median) | spread | x Inductor's launch |",
           "|---|---|---|---|---|---|---|"]
    for (family, direction, impl), rs in sorted(groups.items()):
        us = medians[(family, direction, impl)]
        base = medians.get((family, direction, "inductor"))
        ratio = f"{us / base:.2f}" if base else "-"
        out.append(f"| {family} | {direction} | {impl} | {len(rs)} | {us:.1f} | "
                   f"{_spread([r['us_per_call'] for r in rs])} | {ratio} |")
    return out


def compile_time_table(rows: list[dict]) -> list[str]:
    """Per workload, impl and cold/warm: median seconds of the first call over processes."""
    groups = defaultdict(list)
    for r in rows:
        if r.get("seconds") is not None:
            groups[(r["wl"]["name"], r["impl"], r["kind"])].append(r)
    if not groups:
        return []
    medians = {key: statistics.median(r["seconds"] for r in rs) for key, rs in groups.items()}
    out = ["| workload | impl | caches | processes | first call s (median) | spread | x Inductor | "
           "where (median s) |", "|---|---|---|---|---|---|---|---|"]
    for (name, impl, kind), rs in sorted(groups.items()):
        sec = medians[(name, impl, kind)]
        base = medians.get((name, "inductor", kind))
        phases = sorted({p for r in rs for p in r.get("phases", {})})
        where = ", ".join(f"{p} {statistics.median(r['phases'].get(p, 0) for r in rs):.1f}" for p in phases
                          if p.startswith("hub"))
        out.append(f"| {name} | {impl} | {kind} | {len(rs)} | {sec:.1f} | {_spread([r['seconds'] for r in rs])} | "
                   f"{f'{sec / base:.2f}' if base else '-'} | {where or '-'} |")
    return out


def report(directory: Path) -> str:
    parts = []
    # Every record names the script that wrote it ("run"), whatever its file is called.
    rows = [r for path in sorted(directory.rglob("*.jsonl")) for r in _rows(path)]
    for title, run, table in (("End to end (whole_model.py)", "whole_model", whole_model_table),
                              ("Decode (decode.py)", "decode", decode_table),
                              ("Host cost per call (host_cost.py)", "host_cost", host_cost_table),
                              ("Compile time (compile_time.py)", "compile_time", compile_time_table)):
        lines = table([r for r in rows if r.get("run") == run])
        if lines:
            parts.append(f"## {title}\n\n" + "\n".join(lines))
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--md", type=Path, help="also write the tables to this file")
    args = parser.parse_args()
    text = report(args.dir)
    print(text)
    if args.md:
        args.md.write_text(text)


if __name__ == "__main__":
    main()
