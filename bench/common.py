"""Shared pieces of the GPU benchmarks: timing, ceilings, accuracy, records."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

import torch

# The bundled RMSNorm given as a local repo: a kernel that did not come with hubcompile, so
# runtime-checked by default (issue 25's cost rows in whole_model.py and decode.py).
LOCAL_RMSNORM = {"rmsnorm": "local:" + os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     "hubcompile", "lowering", "bundled", "rmsnorm")}


def env() -> dict:
    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": props.name if props else "cpu",
        "sm": f"{props.major}{props.minor}" if props else None,
        "py": sys.version.split()[0],
        "plat": platform.platform(),
    }


def bench_ms(fn, reps_ms: int = 300, min_reps: int = 0, grad_to_none=None) -> dict:
    """CUDA-event timing with L2 flushed between reps (triton.testing.do_bench): p10/p50/p90,
    mean, iqr and the number of timed reps. ``min_reps``: time at least that many reps (a
    slow function gets a longer window). ``grad_to_none``: tensors whose ``.grad`` is set to
    None before each rep, outside the timed region."""
    if not torch.cuda.is_available():  # a CPU smoke test of the script itself
        import time

        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        return {"p10": ms, "p50": ms, "p90": ms, "mean": ms, "iqr": 0.0, "reps": 1, "warmup_ms": 0}
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    rep = reps_ms
    while True:
        times = do_bench(fn, warmup=50, rep=rep, grad_to_none=grad_to_none, return_mode="all")
        if len(times) >= min_reps:
            break
        rep = rep * 1.25 * min_reps / len(times)  # do_bench sizes reps from a 5-call estimate
    t = torch.tensor(times, dtype=torch.float64)
    p10, p25, p50, p75, p90 = t.quantile(torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)).tolist()
    return {"p10": p10, "p50": p50, "p90": p90, "mean": t.mean().item(), "iqr": p75 - p25, "reps": len(times),
            "warmup_ms": 50}


def gpu_ms(fn, reps: int = 30, grad_to_none=None) -> dict | None:
    """The step's time on the GPU alone: p50, p10, p90 of ``reps`` steps (None on CPU).

    do_bench's events also hold the time the GPU waits for the host to launch the step's
    kernels: a compiled forward+backward of one op is host-bound below about half a
    millisecond, for Inductor's code as for any other. Here each rep first enqueues a GPU
    sleep longer than the step's host time (measured), then the events and the step, so
    that the whole step is queued before the GPU reaches it. L2 is flushed as in do_bench."""
    if not torch.cuda.is_available():
        return None
    import time

    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    host = time.perf_counter()
    fn()
    host = time.perf_counter() - host
    torch.cuda.synchronize()
    cycles = int(max(2 * host, 1e-3) * 2e9)  # ~2 GHz SM clock: twice the host time, at least 1 ms
    times = []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        cache.zero_()
        torch.cuda._sleep(cycles)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    t = torch.tensor(times, dtype=torch.float64)
    p10, p50, p90 = t.quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"p10": p10, "p50": p50, "p90": p90, "reps": reps, "sleep_cycles": cycles}


def copy_ceiling_gbps() -> float:
    """Device-to-device copy rate, bytes read plus written, measured now."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.empty((512 if device == "cuda" else 8) * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))["p50"]
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def matmul_peak_tflops() -> float:
    """bf16 matmul rate, measured now (on CPU, a small fp32 one: only for smoke tests)."""
    cuda = torch.cuda.is_available()
    n, dtype = (8192, torch.bfloat16) if cuda else (256, torch.float32)
    a = torch.randn(n, n, device="cuda" if cuda else "cpu", dtype=dtype)
    b = torch.randn_like(a)
    ms = bench_ms(lambda: a @ b)["p50"]
    return 2 * n**3 / (ms * 1e-3) / 1e12


def rmse(a, b) -> float:
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def accuracy(new, eager, ref64, dtype) -> dict:
    """The float64 rule of the tests: err(new) <= k * err(eager) + floor * scale."""
    k = 2.0 if dtype == torch.float32 else 3.0
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    scale = ref64.double().pow(2).mean().sqrt().item() or 1.0
    err_new, err_eager = rmse(new, ref64), rmse(eager, ref64)
    finite = bool(torch.isfinite(new).all())
    return {"ok": finite and err_new <= k * err_eager + floor * scale, "rmse": err_new, "rmse_eager": err_eager,
            "absmax": (new.double() - ref64.double()).abs().max().item()}


class Records:
    """JSONL records in the kernels-benchmarks schema plus our fields."""

    def __init__(self, path: str, run: str):
        self.path, self.run = path, run
        self.env = env()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def add(self, impl: str, wl: dict, lat: dict | None, **fields) -> dict:
        record = {"ts": datetime.datetime.now(datetime.UTC).isoformat(), "run": self.run, "impl": impl,
                  "wl": wl, "env": self.env, "lat_ms": lat, **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return record


def peak_of_one_step(step) -> int | None:
    """Peak allocated bytes of one plain ``step()`` (None off CUDA). Not inside the
    timing loop: ``do_bench`` keeps a 256 MB L2-flush buffer that would count."""
    if not torch.cuda.is_available():
        step()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()
