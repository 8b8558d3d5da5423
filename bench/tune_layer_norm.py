"""Launch settings of the bundled LayerNorm kernels, swept on one GPU.

Times the forward kernel (warps per row) and the backward (warps, and row programs per SM)
at the kernels-benchmarks shapes, bf16, against a plain copy of the same bytes; prints
every setting, then the best one per shape beside the current default. For choosing
defaults only: a setting is judged on whole models (bench/whole_model.py), not here.
    python3 bench/tune_layer_norm.py
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton.testing

from hubcompile.lowering.kernels import bundled_module

SHAPES = [(16384, 4096), (16 * 2048, 4096), (16 * 2048, 8192)]
WARPS = (2, 4, 8, 16, 32)
PROGRAMS_PER_SM = (1, 2, 4, 8)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    package = bundled_module("bundled:layer-norm", torch.device("cuda"))
    if package is None:
        sys.exit("the bundled layer-norm kernels do not load on this machine (a CUDA GPU and Triton are needed)")
    ln = package._layer_norm_triton
    default_warps, default_programs = ln._num_warps, ln._num_row_programs
    sms = ln._sm_count(torch.cuda.current_device())
    for m, n in SHAPES:
        x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        w = 1 + 0.5 * torch.randn(n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        copy_ms = bench(lambda: x.clone())  # reads and writes m*n: the forward's traffic
        y, mean, rstd, h = ln.layer_norm_forward(x, w, b, 1e-5)
        print(f"M={m} N={n}: copy {copy_ms:.4f} ms")
        fwd, bwd = {}, {}
        try:
            for warps in WARPS:
                ln._num_warps = lambda block, k=warps: k
                fwd[warps] = bench(lambda: ln.layer_norm_forward(x, w, b, 1e-5))
                print(f"  fwd warps {warps:2d}: {fwd[warps]:.4f} ms, {copy_ms / fwd[warps]:.0%} of copy")
                for per_sm in PROGRAMS_PER_SM:
                    ln._num_row_programs = lambda device, rows, k=per_sm: min(rows, k * sms)
                    bwd[warps, per_sm] = bench(lambda: ln.layer_norm_backward(dy, h, w, b, mean, rstd))
                    print(f"    bwd warps {warps:2d}, {per_sm} programs/SM: {bwd[warps, per_sm]:.4f} ms")
        finally:
            ln._num_warps, ln._num_row_programs = default_warps, default_programs
        ours = (default_warps(ln._blocks(n)[0]), default_programs(x.device, m) // sms)
        best_fwd, best_bwd = min(fwd, key=fwd.get), min(bwd, key=bwd.get)
        print(f"  best fwd: warps {best_fwd}, {copy_ms / fwd[best_fwd]:.0%} of copy "
              f"(default warps {ours[0]}: {copy_ms / fwd[ours[0]]:.0%})")
        print(f"  best bwd: warps {best_bwd[0]}, {best_bwd[1]} programs/SM, {bwd[best_bwd]:.4f} ms "
              f"(default {ours[0]}, {ours[1]}: {bwd.get(ours, float('nan')):.4f} ms)")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
