"""Where a whole model's step spends its time, under Inductor and under
backend="hubkernels" (performance guard off, so the replacements are always in): the GPU
kernels that take the most time (torch.profiler), and the step's wall time against the
time the GPU was busy, which says whether the step is bound by the host.

    python bench/profile_model.py --out DIR [--arch llama] [--attn eager,sdpa] [--modes train,prefill]

One text file per model and mode in DIR. Tells what to fix when a model is slower than
its per-op numbers promise: a kernel that got slower, or host time between kernels.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hubcompile  # noqa: E402,F401 - registers the backend
from whole_model import BUILDERS, DEVICE, make_step  # noqa: E402

STEPS = 5


def _step_fn(model, impl: str, mode: str, ids):
    fn = torch.compile(model) if impl == "inductor" else torch.compile(
        model, backend="hubkernels", options={"perf_guard": "off"})
    return make_step(model, fn, mode, ids)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def profile_one(model, impl: str, mode: str, ids, rows: int, walls: int = 30) -> str:
    torch._dynamo.reset()
    step = _step_fn(model, impl, mode, ids)
    for _ in range(3):  # compile and warm up
        step()
    _sync()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    _sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / STEPS
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(STEPS):
            step()
        _sync()
    events = prof.key_averages()
    # Kernels only: the device events with no CPU side of their own.
    busy_ms = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3 / STEPS
    table = events.table(sort_by="self_device_time_total" if DEVICE == "cuda" else "self_cpu_time_total",
                         row_limit=rows, max_name_column_width=90)
    head = (f"== {impl} {mode}: wall {wall_ms:.2f} ms/step, GPU busy {busy_ms:.2f} ms/step "
            f"({100 * busy_ms / wall_ms:.0f}%), {STEPS} steps profiled")
    print(head, flush=True)
    return f"{head}\n{table}\n{host_report(step, walls)}\n"


def _step_walls(step, n: int) -> str:
    walls = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        _sync()
        walls.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(walls, n=10)
    return (f"min {min(walls):.2f} p10 {q[0]:.2f} p50 {statistics.median(walls):.2f} p90 {q[-1]:.2f} "
            f"max {max(walls):.2f}")


def host_report(step, n: int = 30, rows: int = 30) -> str:
    """The host's side of a step: the spread of step walls with Python's garbage collector
    on and off (a collection pause shows as a slow step when the host bounds the step), and
    the Python functions that take the host's time (cProfile, by own time)."""
    lines = [f"step wall ms, gc on : {_step_walls(step, n)}"]
    gc.disable()
    try:
        lines.append(f"step wall ms, gc off: {_step_walls(step, n)}")
    finally:
        gc.enable()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(STEPS):
        step()
    _sync()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(rows)
    lines.append(f"host functions over {STEPS} steps, by own time (cProfile):")
    lines.append("\n".join(text.getvalue().splitlines()[4:]))
    report = "\n".join(lines)
    print(report[:3000], flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--arch", default="llama", choices=sorted(BUILDERS))
    parser.add_argument("--attn", default="eager,sdpa")
    parser.add_argument("--modes", default="train,prefill")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--small", action="store_true", help="tiny sizes on CPU: a smoke test of this script")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for attn in args.attn.split(","):
        for mode in args.modes.split(","):
            model = BUILDERS[args.arch](args.layers, attn, args.vocab, args.small).train(mode == "train")
            batch, seq = (2, 17) if args.small else ((4, 2048) if mode == "prefill" else (4, 1024))
            ids = torch.randint(3, args.vocab, (batch, seq), device=DEVICE,
                                generator=torch.Generator(DEVICE).manual_seed(0))
            walls = 4 if args.small else 30
            text = "".join(profile_one(model, impl, mode, ids, args.rows, walls) for impl in ("inductor", "hubkernels"))
            (out / f"profile_{args.arch}_{attn}_{mode}.txt").write_text(text)


if __name__ == "__main__":
    main()
