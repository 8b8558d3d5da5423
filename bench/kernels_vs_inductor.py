"""Per-op benchmark on a GPU: each bundled kernel against eager PyTorch and Inductor,
forward and forward+backward, at real model sizes, after checking each one against a
float64 reference on fresh random inputs.

    python bench/kernels_vs_inductor.py --out bench/results [--small]

Writes <out>/kernels.jsonl (kernels-benchmarks schema plus direction, bytes, GB/s and the
fraction of the copy ceiling measured in the same run) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hubcompile  # noqa: E402
from common import Records, accuracy, bench_ms, copy_ceiling_gbps  # noqa: E402
from hubcompile.lowering.kernels import BUNDLED_ROOT  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a --small smoke test under TRITON_INTERPRET=1


def load_triton(repo: str):
    from kernels import get_local_kernel

    return get_local_kernel(BUNDLED_ROOT / repo / "build" / "torch-cuda")


# --------------------------------------------------------------- eager spellings


def rmsnorm(x, w, eps=1e-6):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def add_rmsnorm(x, r, w):
    h = x + r
    return rmsnorm(h, w), h


def silu_gate(g, u):
    return F.silu(g) * u


def silu_gate_fused(x):
    g, u = x.chunk(2, dim=-1)
    return F.silu(g) * u


def gelu_tanh_gate(g, u):
    return F.gelu(g, approximate="tanh") * u


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def causal_conv1d_silu(x, w, b):
    return F.silu(F.conv1d(x, w.unsqueeze(1), b, padding=w.shape[-1] - 1, groups=x.shape[1])[..., : x.shape[-1]])


# ------------------------------------------------- bundled Triton kernels, called directly


def triton_impls():
    norm, act, rot, conv = (load_triton(r) for r in ("rmsnorm", "activation", "rotary", "causal-conv1d"))

    def rope_fwd(q, k, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return rot.rotary_forward(q, c, s, False), rot.rotary_forward(k, c, s, False)

    def rope_bwd(outs, dys, q, k, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return rot.rotary_backward(dys[0], c, s, False), rot.rotary_backward(dys[1], c, s, False)

    return {
        # forward returns (y, rstd); the backward reuses rstd, as the op does
        "rmsnorm": (lambda x, w: norm.rms_norm_forward(x, w, 1e-6, 0.0, True)[:2],
                    lambda out, dy, x, w: norm.rms_norm_backward(dy[0], x, w, out[1], 0.0, True)),
        "add_rmsnorm": (lambda x, r, w: norm.rms_norm_forward(x, w, 1e-6, 0.0, True, residual=r)[::2],
                        None),
        "silu_gate": (lambda g, u: act.gated_act_forward(g, u, "silu"),
                      lambda out, dy, g, u: act.gated_act_backward(dy[0], g, u, "silu")),
        "silu_gate_fused": (lambda x: act.gated_act_fused_forward(x, "silu"),
                            lambda out, dy, x: act.gated_act_fused_backward(dy[0], x, "silu")),
        "gelu_tanh_gate": (lambda g, u: act.gated_act_forward(g, u, "gelu_tanh"),
                           lambda out, dy, g, u: act.gated_act_backward(dy[0], g, u, "gelu_tanh")),
        "rotary": (rope_fwd, rope_bwd),
        "causal_conv1d_silu": (lambda x, w, b: conv.causal_conv1d_forward(x, w, b, "silu"),
                               lambda out, dy, x, w, b: conv.causal_conv1d_backward(dy[0], x, w, b, "silu")),
    }


def workloads(small: bool):
    s = (lambda big, little: little) if small else (lambda big, little: big)
    T, D, I = s(16384, 37), s(4096, 64), s(8192, 96)
    bf = torch.bfloat16

    def r(*shape, dtype=bf):
        return torch.randn(*shape, device=DEVICE, dtype=dtype)

    B, H, KV, S, HD = s(4, 2), s(32, 4), s(8, 2), s(2048, 13), s(128, 16)
    CB, CD, CL = s(8, 2), s(4096, 24), s(2048, 29)
    return [
        ("rmsnorm", rmsnorm, lambda: [r(T, D), r(D)], {"T": T, "D": D}, True),
        ("add_rmsnorm", add_rmsnorm, lambda: [r(T, D), r(T, D), r(D)], {"T": T, "D": D}, True),
        ("silu_gate", silu_gate, lambda: [r(T, I), r(T, I)], {"T": T, "D": I}, True),
        ("silu_gate_fused", silu_gate_fused, lambda: [r(T, 2 * I)], {"T": T, "D": I}, True),
        ("gelu_tanh_gate", gelu_tanh_gate, lambda: [r(T, I), r(T, I)], {"T": T, "D": I}, True),
        ("rotary", rotary, lambda: [r(B, H, S, HD), r(B, KV, S, HD), r(B, S, HD), r(B, S, HD)],
         {"B": B, "H": H, "KV": KV, "S": S, "hd": HD}, False),
        ("causal_conv1d_silu", causal_conv1d_silu, lambda: [r(CB, CD, CL), r(CD, 4), r(CD)],
         {"B": CB, "dim": CD, "S": CL, "W": 4}, True),
    ]


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--small", action="store_true", help="tiny sizes, a smoke test")
    parser.add_argument("--impls", default="eager,inductor,hubkernels,bundled-triton")
    parser.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    records = Records(os.path.join(args.out, "kernels.jsonl"), run="kernels_vs_inductor")
    ceiling = copy_ceiling_gbps()
    print(f"copy ceiling {ceiling:.0f} GB/s on {records.env['gpu']}", flush=True)
    triton = triton_impls()
    rows = []
    for name, eager, make, wl, has_op in workloads(args.small):
        if args.ops and name not in args.ops.split(","):
            continue
        inputs = make()
        inputs64 = [t.double() for t in inputs]
        ref_out = [o for o in as_list(eager(*inputs64))]
        eager_out = as_list(eager(*inputs))
        cot = [torch.randn_like(o) for o in eager_out]
        hubcompile.RECORDS.clear()
        impls = {"eager": eager, "inductor": torch.compile(eager)}
        if has_op:
            impls["hubkernels"] = torch.compile(eager, backend=hubcompile.hubkernels)
        fwd, bwd = triton[name]
        impls["bundled-triton"] = fwd
        impls = {k: v for k, v in impls.items() if k in args.impls.split(",")}
        for direction in ("fwd", "fwd+bwd"):
            for impl, fn in impls.items():
                if direction == "fwd+bwd" and impl == "bundled-triton" and bwd is None:
                    continue
                try:
                    rows.append(run_one(records, name, wl, direction, impl, fn, bwd, inputs, inputs64, eager,
                                        eager_out, ref_out, cot, ceiling))
                except Exception as e:  # noqa: BLE001 - record and go on
                    records.add(impl, {"name": name, **wl}, None, direction=direction, ok=False, err=repr(e)[:500])
                    rows.append((name, direction, impl, None, None, False))
                    print(f"{name} {direction} {impl}: FAILED {e!r}"[:300], flush=True)
    print(f"\n{'op':20} {'dir':8} {'impl':15} {'p50 ms':>9} {'GB/s':>7} {'%copy':>6} ok")
    for name, direction, impl, ms, gbps, ok in rows:
        if ms is None:
            print(f"{name:20} {direction:8} {impl:15} {'-':>9} {'-':>7} {'-':>6} {ok}")
        else:
            print(f"{name:20} {direction:8} {impl:15} {ms:9.3f} {gbps:7.0f} {100 * gbps / ceiling:5.0f}% {ok}")


def run_one(records, name, wl, direction, impl, fn, bwd, inputs, inputs64, eager, eager_out, ref_out, cot, ceiling):
    training = direction == "fwd+bwd"
    leaves = [t.detach().requires_grad_(training and t.is_floating_point()) for t in inputs]
    if not training:
        with torch.no_grad():
            out = as_list(fn(*leaves))
        acc = [accuracy(o, e, r, o.dtype) for o, e, r in zip(out, eager_out, ref_out)]
        moved = nbytes(*inputs) + nbytes(*out)

        def step():
            with torch.no_grad():
                fn(*leaves)
    else:
        ref_leaves = [t.detach().requires_grad_() for t in inputs64]
        ref_grads = torch.autograd.grad(as_list(eager(*ref_leaves)), ref_leaves, [c.double() for c in cot])
        e_leaves = [t.detach().requires_grad_() for t in inputs]
        e_grads = torch.autograd.grad(as_list(eager(*e_leaves)), e_leaves, cot)
        if impl == "bundled-triton":
            out = as_list(fn(*leaves))
            grads = as_list(bwd(out, cot, *leaves))

            def step():
                o = as_list(fn(*leaves))
                bwd(o, cot, *leaves)
        else:
            out = as_list(fn(*leaves))
            grads = torch.autograd.grad(out, leaves, cot)

            def step():
                for t in leaves:
                    t.grad = None
                torch.autograd.backward(as_list(fn(*leaves)), cot)
        acc = [accuracy(g, e, r, g.dtype) for g, e, r in zip(grads, e_grads, ref_grads) if g is not None]
        acc += [accuracy(o, e, r, o.dtype) for o, e, r in zip(out, eager_out, ref_out)]
        # forward bytes, then backward: read cotangents and inputs, write input grads
        moved = 2 * nbytes(*inputs) + nbytes(*out) + nbytes(*cot) + nbytes(*inputs)
    ok = all(a["ok"] for a in acc)
    lat = bench_ms(step)
    gbps = moved / (lat["p50"] * 1e-3) / 1e9
    # For hubkernels, what the pass replaced (0 would mean this row timed Inductor).
    replaced = {f: n for r in hubcompile.RECORDS for f, n in r.replaced.items() if n} if impl == "hubkernels" else None
    records.add(impl, {"name": name, **wl}, lat, direction=direction, ok=ok, corr=acc, bytes=moved,
                gbps=gbps, frac_copy_ceiling=gbps / ceiling, copy_ceiling_gbps=ceiling, replaced=replaced)
    print(f"{name} {direction} {impl}: {lat['p50']:.3f} ms, {gbps:.0f} GB/s, ok={ok}"
          + (f", replaced {replaced}" if replaced is not None else ""), flush=True)
    return name, direction, impl, lat["p50"], gbps, ok


if __name__ == "__main__":
    main()
