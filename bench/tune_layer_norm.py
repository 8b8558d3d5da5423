"""Launch settings of the bundled LayerNorm kernels, swept on one GPU.

Times the forward kernel (warps per row) and the backward (warps, and row programs per SM)
at the kernels-benchmarks shapes, bf16, against a plain copy of the same bytes; prints the
best setting per shape and the current default's place beside it. For choosing defaults
only: a setting is judged on whole models (bench/whole_model.py), not here.
    python3 bench/tune_layer_norm.py
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton.testing

from hubcompile.lowering.device import detect
from hubcompile.lowering.kernels import load

SHAPES = [(16384, 4096), (16 * 2048, 4096), (16 * 2048, 8192)]


def module():
    load("bundled:layer-norm", detect(torch.device("cuda")), trusted_orgs=None)
    return next(m for name, m in sys.modules.items() if name.endswith("_layer_norm_triton"))


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    ln = module()
    default_warps, default_programs = ln._num_warps, ln._num_row_programs
    for m, n in SHAPES:
        x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        w = 1 + 0.5 * torch.randn(n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        copy_ms = bench(lambda: x.clone())  # reads and writes m*n: the forward's traffic
        y, mean, rstd, h = ln.layer_norm_forward(x, w, b, 1e-5)
        print(f"M={m} N={n}: copy {copy_ms:.4f} ms (default warps {default_warps(n)})")
        for warps in (2, 4, 8, 16, 32):
            ln._num_warps = lambda block, w_=warps: w_
            ms = bench(lambda: ln.layer_norm_forward(x, w, b, 1e-5))
            print(f"  fwd warps {warps:2d}: {ms:.4f} ms, {copy_ms / ms:.0%} of copy")
            for per_sm in (1, 2, 4, 8):
                ln._num_row_programs = lambda device, rows, k=per_sm: min(rows, k * torch.cuda.get_device_properties(0).multi_processor_count)
                ms = bench(lambda: ln.layer_norm_backward(dy, h, w, b, mean, rstd))
                print(f"    bwd warps {warps:2d}, {per_sm} programs/SM: {ms:.4f} ms")
            ln._num_row_programs = default_programs
        ln._num_warps = default_warps
        sys.stdout.flush()


if __name__ == "__main__":
    main()
