"""Where the time of one forward+backward of a gated activation goes, under Inductor and
under backend="hubkernels": GPU kernels and host-side calls (torch.profiler), and the
wall time per step, to explain a per-op timing."""

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hubcompile  # noqa: E402


def silu_gate(g, u):
    return F.silu(g) * u


def dispatch_overhead():
    """Host time per call on tiny tensors (the GPU work is negligible): the hubcompile op,
    the same kernel called directly, and a trivial custom op, to split the cost."""
    from hubcompile.lowering import kernels
    from hubcompile.lowering.device import detect

    g = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    u = torch.randn_like(g)

    @torch.library.custom_op("hubbench::noop", mutates_args=())
    def noop(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    adapter = kernels.load("bundled:activation", detect(g.device))
    cases = {
        "hubcompile op (bundled Triton)": lambda: torch.ops.hubcompile.gated_activation(
            g, u, "silu", "bundled:activation", "bundled:activation"),
        "bundled Triton called directly": lambda: adapter.gated_act_forward(g, u, "silu"),
        "trivial custom op (clone)": lambda: noop(g),
        "plain aten (F.silu(g) * u)": lambda: F.silu(g) * u,
    }
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(2000):
            fn()
        torch.cuda.synchronize()
        print(f"{name:34} {(time.perf_counter() - start) / 2000 * 1e6:8.1f} us/call")


def main():
    dispatch_overhead()
    g = torch.randn(16384, 8192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    cot = torch.randn_like(g)
    for name, backend in (("inductor", "inductor"), ("hubkernels", hubcompile.hubkernels)):
        fn = torch.compile(silu_gate, backend=backend)

        def step():
            g.grad = u.grad = None
            torch.autograd.backward(fn(g, u), cot)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(50):
            step()
        torch.cuda.synchronize()
        print(f"== {name}: {(time.perf_counter() - start) / 50 * 1e3:.3f} ms/step wall (50 steps, one sync)")
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20):
            step()
        torch.cuda.synchronize()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(14)
        print(out.getvalue()[-4000:])


if __name__ == "__main__":
    main()
