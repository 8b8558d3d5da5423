"""Where the peak memory of a training step goes (issue: fused linear cross-entropy).

Records the CUDA allocator's history over one step of the 128k-vocabulary Llama-1B-shaped
model (see linear_cross_entropy.py) and replays it: the peak, the phase it falls in, and
the blocks live at that moment, largest first, each with the Python frames that allocated
it. Also times the compiled step with several chunk sizes of the fused loss op, since the
chunk is memory the op adds at its peak.

    python bench/lce_memory.py --out $OUT [--impls inductor,hubkernels-lce-only,liger]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hubcompile  # noqa: E402
from hubcompile.guards import performance as perf_guard  # noqa: E402
from common import bench_ms, peak_of_one_step  # noqa: E402
from linear_cross_entropy import training_step  # noqa: E402

MiB = 2**20


def _frames(frames, keep=4):
    """The frames worth reading: ours, transformers', Inductor's generated code."""
    out = []
    for f in frames:
        name = f.get("filename", "")
        if any(s in name for s in ("hubcompile", "transformers/models", "torchinductor", "liger_kernel", "bench/")):
            out.append(f"{Path(name).name}:{f.get('line')}:{f.get('name')}")
        if len(out) == keep:
            break
    return out


def peak_report(snapshot, top=25):
    """Replays the allocation trace: the peak of live bytes and what was live then."""
    trace = snapshot["device_traces"][0]
    live, total, best, best_live, best_i = {}, 0, -1, {}, -1
    # Blocks already allocated when recording began (weights, caches) are in "segments".
    base = sum(b["size"] for s in snapshot["segments"] for b in s["blocks"] if b["state"] == "active_allocated")
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
        elif e["action"] == "free_requested" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
        if total > best:
            best, best_live, best_i = total, dict(live), i
    blocks = sorted(best_live.values(), key=lambda e: -e["size"])
    by_site = {}
    for e in blocks:
        key = " <- ".join(_frames(e.get("frames", []), 2)) or "?"
        n, s = by_site.get(key, (0, 0))
        by_site[key] = (n + 1, s + e["size"])
    return {
        "trace_peak_mib": best / MiB,
        "base_mib_at_record_start": base / MiB,
        "peak_event": best_i, "events": len(trace),
        "peak_alloc_frames": _frames(trace[best_i].get("frames", []), 6) if best_i >= 0 else [],
        "top_blocks": [{"mib": round(e["size"] / MiB, 2), "frames": _frames(e.get("frames", []))} for e in blocks[:top]],
        "by_site": sorted(([round(s / MiB, 1), n, k] for k, (n, s) in by_site.items()), reverse=True)[:80],
    }


def _lce_modules():
    """Every loaded build of the bundled loss kernel (the chunk budget is a module constant)."""
    # isinstance, not hasattr: torch.ops and torch.classes answer every attribute
    return [m for m in list(sys.modules.values()) if isinstance(getattr(m, "MAX_CHUNK_BYTES", None), int)]


def run(impl, how, args, ids, out):
    torch._dynamo.reset()
    hubcompile.RECORDS.clear()
    gc.collect()
    torch.cuda.empty_cache()
    model, step = training_step(impl, how, args, ids)

    step()
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=200000)
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated() / 2**30
    rep = peak_report(snap)
    decisions = [d.describe() for d in perf_guard.DECISIONS]
    guard_dicts = [d.to_dict() for d in perf_guard.DECISIONS]
    perf_guard.DECISIONS.clear()
    rep.update(impl=impl, how=how, max_memory_allocated_gib=peak, gpu=torch.cuda.get_device_name(),
               perf_guard=decisions, perf_guard_decisions=guard_dicts)
    for d in decisions:
        print(f"   perf guard: {d}", flush=True)
    print(f"== {impl} {how}: peak {peak:.3f} GiB; trace peak {rep['trace_peak_mib']:.0f} MiB over "
          f"{rep['base_mib_at_record_start']:.0f} MiB already live; peak at "
          f"{rep['peak_alloc_frames']}", flush=True)
    for mib, n, site in rep["by_site"][:24]:
        print(f"   {mib:8.1f} MiB {n:4d}x {site}", flush=True)
    timings = {}
    mods = _lce_modules()
    if impl.startswith("hubkernels") and mods and args.chunks:
        print(f"   chunk budget patched in {[m.__name__ for m in mods]}", flush=True)
        originals = [m.MAX_CHUNK_BYTES for m in mods]
        for chunk_mib in [int(c) for c in args.chunks.split(",")]:
            for m in mods:
                m.MAX_CHUNK_BYTES = chunk_mib * MiB
            peak_gib = peak_of_one_step(step) / 2**30
            lat = bench_ms(step, reps_ms=1500)
            timings[chunk_mib] = (lat["p50"], peak_gib)
            print(f"   chunk {chunk_mib} MiB: p50 {lat['p50']:.2f} ms, peak {peak_gib:.3f} GiB", flush=True)
        for m, v in zip(mods, originals):
            m.MAX_CHUNK_BYTES = v
    else:
        peak_gib = peak_of_one_step(step) / 2**30
        lat = bench_ms(step, reps_ms=1500)
        timings["default"] = (lat["p50"], peak_gib)
        print(f"   p50 {lat['p50']:.2f} ms, peak {peak_gib:.3f} GiB", flush=True)
    rep["timings"] = timings
    with open(os.path.join(out, "lce_memory.jsonl"), "a") as f:
        f.write(json.dumps(rep) + "\n")
    del model
    torch._dynamo.reset()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--impls", default="inductor,hubkernels-lce-only,hubkernels-noguard,liger")
    parser.add_argument("--hows", default="step,whole")
    parser.add_argument("--chunks", default="32,64,128,256,512")
    args = parser.parse_args()
    ids = torch.randint(3, args.vocab, (4, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    # Liger patches transformers' classes for the whole process: its rows go last.
    for impl in sorted(args.impls.split(","), key=lambda i: i.startswith("liger")):
        for how in (("step",) if impl == "liger" else args.hows.split(",")):
            try:
                run(impl, how, args, ids, args.out)
            except Exception as e:  # noqa: BLE001
                print(f"== {impl} {how}: FAILED {e!r}"[:800], flush=True)


if __name__ == "__main__":
    main()
