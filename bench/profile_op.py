"""Which GPU kernels one forward+backward of a gated activation launches under Inductor
and under backend="hubkernels" (torch.profiler), to explain a per-op timing."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hubcompile  # noqa: E402


def silu_gate(g, u):
    return F.silu(g) * u


def main():
    g = torch.randn(16384, 8192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    cot = torch.randn_like(g)
    for name, backend in (("inductor", "inductor"), ("hubkernels", hubcompile.hubkernels)):
        fn = torch.compile(silu_gate, backend=backend)
        for _ in range(3):
            torch.autograd.backward(fn(g, u), cot)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                g.grad = u.grad = None
                torch.autograd.backward(fn(g, u), cot)
            torch.cuda.synchronize()
        print(f"== {name}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70))


if __name__ == "__main__":
    main()
