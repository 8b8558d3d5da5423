"""The per-op benchmark suite (issue #12): every op hubcompile replaces, forward and
forward+backward, in every implementation at hand, on two sets of workloads.

    python bench/ops.py --suite kb|models|all --out DIR [--ops a,b] [--impls a,b]
                        [--small] [--kb-grid] [--budget-s N]
    python bench/ops.py --report DIR      # summary and plots again from DIR/ops.jsonl

Ops: rmsnorm, add_rmsnorm, layer_norm, add_layer_norm (F.layer_norm with weight and bias),
silu_gate, silu_gate_fused (x.chunk(2, -1)), gelu_tanh_gate,
gelu_tanh_gate_fused, rotary, causal_conv1d, causal_conv1d_silu, attention_eager
(transformers' eager_attention_forward: repeat_kv, softmax(QK^T*scale + mask)V),
attention_sdpa (transformers' sdpa_attention_forward: repeat_kv, F.scaled_dot_product_attention
with the mask), both causal with grouped-query heads at model sizes, the mask built in the
graph from aranges as transformers builds it under torch.compile; and linear_cross_entropy
(F.cross_entropy(F.linear(h, W).float(), y), forward+backward only).

Implementations: eager; inductor (torch.compile); hubkernels (its performance guard on,
as by default on CUDA; the record says which code the guard kept); hubkernels-noguard
(options={"perf_guard": "off"}: the replacement itself); bundled-triton (hubcompile's
Triton kernel called directly); and peers where they import: liger (liger-kernel), fla
(fla-core), sdpa-flash / sdpa-efficient / sdpa-cudnn (SDPA held to one backend). A peer
that cannot run is recorded with ok=False and its error; the run goes on.

Workloads: "kb" = the Hugging Face kernels-benchmarks workloads of the ops it covers (a
handful of each grid; --kb-grid for the whole grid); "models" = Llama-3.2-1B and
Llama-3.1-8B, Mamba and Mamba2 widths, sequences 128 to 16384, and the issue's targets.
On one H200 (compiles included): --suite models 51 workloads in ~7.5 min, --suite kb 21
in ~3.5 min, --kb-grid ~13 min. --budget-s stops starting workloads after that many
seconds (the ops take turns, so each has rows), then writes the report.

Each implementation is checked against a float64 reference on the same fresh random
inputs, then timed (do_bench: CUDA events, L2 flushed, p50 of >= 100 reps, .grad set to
None between reps). Each record is appended to DIR/ops.jsonl as soon as it is made (the
kernels-benchmarks schema plus op, suite, direction, bytes, GB/s and the fraction of the
copy ceiling, or FLOPs, TFLOP/s and the fraction of the matmul peak, both ceilings
measured in this run). At the end: a CSV and an SVG per op, direction and suite, and
DIR/summary.md with the table and the headline ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

# Fresh performance-guard decisions (and numerical-guard checks) in every run: their disk
# cache goes to a new directory. Inductor's caches are off: a cached graph skips
# hubcompile's pass (which then reports nothing replaced) and the compile time. Set before
# torch and hubcompile are imported.
os.environ["HUBCOMPILE_CACHE_DIR"] = tempfile.mkdtemp(prefix="hubcompile-ops-")
os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hubcompile  # noqa: E402
import plots  # noqa: E402
from common import (Records, accuracy, bench_ms, copy_ceiling_gbps, gpu_ms, matmul_peak_tflops,  # noqa: E402
                    peak_of_one_step)
from hubcompile.guards import performance as perf_guard  # noqa: E402
from hubcompile.lowering import kernels as hub_kernels  # noqa: E402
from hubcompile.lowering.kernels import BUNDLED_ROOT  # noqa: E402

CUDA = torch.cuda.is_available()
BF16 = torch.bfloat16
DEVICE = "cuda" if CUDA else "cpu"  # cpu: a --small smoke test under TRITON_INTERPRET=1
IMPLS = ("eager", "inductor", "hubkernels", "hubkernels-noguard", "bundled-triton", "liger", "fla",
         "sdpa-flash", "sdpa-efficient", "sdpa-cudnn")
MIN_REPS = 100


class Unavailable(Exception):
    """An implementation that cannot run here (not installed, CUDA only, no such kernel)."""


# ------------------------------------------------------------------ eager spellings


def _f32(x):
    # The models' fp32 upcast; the float64 reference stays float64.
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def rmsnorm(x, w):
    h = _f32(x)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return w * h.to(x.dtype)


def add_rmsnorm(x, r, w):
    h = x + r
    return rmsnorm(h, w), h


def layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def add_layer_norm(x, r, w, b):
    h = x + r
    return layer_norm(h, w, b), h


def silu_gate(g, u):
    return F.silu(g) * u


def silu_gate_fused(x):
    g, u = x.chunk(2, dim=-1)
    return F.silu(g) * u


def gelu_tanh_gate(g, u):
    return F.gelu(g, approximate="tanh") * u


def gelu_tanh_gate_fused(x):
    g, u = x.chunk(2, dim=-1)
    return F.gelu(g, approximate="tanh") * u


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def causal_conv1d(x, w, b):
    return F.conv1d(x, w.unsqueeze(1), b, padding=w.shape[-1] - 1, groups=x.shape[1])[..., : x.shape[-1]]


def causal_conv1d_silu(x, w, b):
    return F.silu(causal_conv1d(x, w, b))


def repeat_kv(x, n_rep):
    b, kv, s, d = x.shape
    return x if n_rep == 1 else x[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


def causal_mask(q, additive: bool):
    """The causal mask as transformers' masking utils build it under torch.compile: in the
    graph, from aranges (key j visible to query i where j <= i); bool for SDPA, additive (0
    or the dtype's minimum) for eager attention."""
    idx = torch.arange(q.shape[2], device=q.device)
    allowed = (idx[None, :] <= idx[:, None])[None, None]
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, torch.finfo(q.dtype).min)


def attention_eager(q, k, v, causal):
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    if causal:
        w = w + causal_mask(q, additive=True)
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def attention_sdpa(q, k, v, causal):
    # As transformers' sdpa_attention_forward on CUDA: grouped heads go to SDPA only without
    # a mask; with one, k/v are repeated (its fused kernels take no grouped heads then).
    if not causal:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
    n_rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep),
                                          attn_mask=causal_mask(q, additive=False))


def linear_cross_entropy(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100)


def linear_cross_entropy_f64(h, w, y):
    return F.cross_entropy(F.linear(h, w), y, ignore_index=-100)  # no fp32 cast: the float64 reference


def attention_f64(inputs, cots):
    """Float64 reference of both attention spellings, one kv head at a time, so that the
    [S, S] scores of only one head group exist at once."""
    q, k, v, causal = inputs
    n_rep, s = q.shape[1] // k.shape[1], q.shape[2]
    blocked = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1) if causal else None
    outs, grads = [], [torch.zeros_like(t) for t in (q, k, v)]
    for j in range(k.shape[1]):
        heads = slice(j * n_rep, (j + 1) * n_rep)
        with torch.enable_grad():
            qj, kj, vj = (t.detach().requires_grad_(cots is not None) for t in (q[:, heads], k[:, j:j + 1],
                                                                               v[:, j:j + 1]))
            w = qj @ kj.transpose(2, 3) * q.shape[-1] ** -0.5
            if blocked is not None:
                w = w.masked_fill(blocked, float("-inf"))
            out = torch.softmax(w, dim=-1) @ vj
            if cots is not None:
                gq, gk, gv = torch.autograd.grad(out, (qj, kj, vj), cots[0][:, heads])
                grads[0][:, heads], grads[1][:, j:j + 1], grads[2][:, j:j + 1] = gq, gk, gv
        outs.append(out.detach())
    return [torch.cat(outs, dim=1)], grads if cots is not None else None


# ------------------------------------------------- bundled Triton kernels, called directly


def _load(repo: str):
    from kernels import get_local_kernel

    return get_local_kernel(BUNDLED_ROOT / repo / "build" / "torch-cuda")


def bundled(op: str):
    """(forward, backward) of hubcompile's bundled kernel for ``op``, called directly:
    forward(*inputs) -> (outputs, saved); backward(saved, cots, *inputs) -> input grads."""
    if op in ("rmsnorm", "add_rmsnorm"):
        norm = _load("rmsnorm")
        if op == "rmsnorm":
            def fwd(x, w):
                y, rstd, _ = norm.rms_norm_forward(x, w, 1e-6, 0.0, True)
                return [y], rstd

            def bwd(rstd, cots, x, w):
                return list(norm.rms_norm_backward(cots[0], x, w, rstd, 0.0, True))
        else:
            def fwd(x, r, w):
                y, rstd, h = norm.rms_norm_forward(x, w, 1e-6, 0.0, True, residual=r)
                return [y, h], (rstd, h)

            def bwd(saved, cots, x, r, w):
                # the gradient reaching h (the residual stream) joins the norm's
                dh, dw = norm.rms_norm_backward(cots[0], saved[1], w, saved[0], 0.0, True, dh_extra=cots[1])
                return [dh, dh, dw]
        return fwd, bwd
    if op in ("layer_norm", "add_layer_norm"):
        ln = _load("layer-norm")
        if op == "layer_norm":
            def fwd(x, w, b):
                y, mean, rstd, _ = ln.layer_norm_forward(x, w, b, 1e-5)
                return [y], (mean, rstd)

            def bwd(saved, cots, x, w, b):
                return list(ln.layer_norm_backward(cots[0], x, w, b, *saved))
        else:
            def fwd(x, r, w, b):
                y, mean, rstd, h = ln.layer_norm_forward(x, w, b, 1e-5, residual=r)
                return [y, h], (mean, rstd, h)

            def bwd(saved, cots, x, r, w, b):
                dh, dw, db = ln.layer_norm_backward(cots[0], saved[2], w, b, saved[0], saved[1], dh_extra=cots[1])
                return [dh, dh, dw, db]
        return fwd, bwd
    if op.startswith(("silu_gate", "gelu_tanh_gate")):
        act, kind = _load("activation"), "silu" if op.startswith("silu") else "gelu_tanh"
        if op.endswith("_fused"):
            return (lambda x: ([act.gated_act_fused_forward(x, kind)], None),
                    lambda _, cots, x: [act.gated_act_fused_backward(cots[0], x, kind)])
        return (lambda g, u: ([act.gated_act_forward(g, u, kind)], None),
                lambda _, cots, g, u: list(act.gated_act_backward(cots[0], g, u, kind)))
    if op == "rotary":
        rot = _load("rotary")

        def fwd(q, k, cos, sin):
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            return [rot.rotary_forward(q, c, s, False), rot.rotary_forward(k, c, s, False)], None

        def bwd(_, cots, q, k, cos, sin):
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            return [rot.rotary_backward(cots[0], c, s, False), rot.rotary_backward(cots[1], c, s, False)]
        return fwd, bwd
    if op.startswith("causal_conv1d"):
        conv, kind = _load("causal-conv1d"), "silu" if op.endswith("silu") else None
        return (lambda x, w, b: ([conv.causal_conv1d_forward(x, w, b, kind)], None),
                lambda _, cots, x, w, b: list(conv.causal_conv1d_backward(cots[0], x, w, b, kind)))
    if op == "linear_cross_entropy":
        lce = _load("linear-cross-entropy")

        def fwd(h, w, y):
            # the gradients for a loss gradient of 1 come out of the forward, chunk by chunk
            loss, gh, gw, _ = lce.linear_cross_entropy_forward(h, w, None, y, -100, "mean", 1.0, 0.0, True)
            return [loss], (gh, gw)

        return fwd, lambda saved, cots, h, w, y: [g * cots[0].to(g.dtype) for g in saved]
    raise Unavailable(f"no bundled Triton kernel for {op}")


# ------------------------------------------------------------------------------ peers


def liger(op: str):
    if not CUDA:
        raise Unavailable("liger-kernel runs on CUDA only")
    from liger_kernel.transformers import functional as lf
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    def fused_silu(x):
        from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction

        return LigerFusedGateUpSiLUMulFunction.apply(x)

    table = {
        "rmsnorm": lambda x, w: lf.liger_rms_norm(x, w, 1e-6),  # casting_mode "llama", as our spelling
        "add_rmsnorm": lambda x, r, w: lf.liger_fused_add_rms_norm(x, r, w, 1e-6),
        "silu_gate": lf.liger_swiglu,
        "silu_gate_fused": fused_silu,
        "gelu_tanh_gate": lf.liger_geglu,
        "gelu_tanh_gate_fused": lambda x: lf.liger_geglu(*x.chunk(2, dim=-1)),
        "rotary": liger_rotary_pos_emb,
        "linear_cross_entropy": lambda h, w, y: lf.liger_fused_linear_cross_entropy(h, w, y, ignore_index=-100),
    }
    if op not in table:
        raise Unavailable(f"liger-kernel has no {op}")
    return table[op]


def fla(op: str):
    if not CUDA:
        raise Unavailable("fla-core runs on CUDA only")
    if op in ("rmsnorm", "add_rmsnorm"):
        from fla.modules.layernorm import rms_norm

        if op == "rmsnorm":
            return lambda x, w: rms_norm(x, w, None, eps=1e-6)
        return lambda x, r, w: rms_norm(x, w, None, residual=r, eps=1e-6, prenorm=True)
    if op == "silu_gate":
        from fla.modules.activations import swiglu

        return swiglu
    if op.startswith("causal_conv1d"):
        from fla.modules.convolution import causal_conv1d as fla_conv

        kind = "silu" if op.endswith("silu") else None

        def conv(x, w, b):
            # fla takes [B, S, D]: the transposed view of our [B, D, S], no copy
            y = fla_conv(x.transpose(1, 2), weight=w, bias=b, activation=kind)
            return (y[0] if isinstance(y, tuple) else y).transpose(1, 2)
        return conv
    raise Unavailable(f"fla-core has no {op} here")


def sdpa_backend(name: str):
    """SDPA held to one backend (attention ops). A backend that refuses grouped-query heads
    gets k/v repeated, and the record says so."""
    if not CUDA:
        raise Unavailable("the fused SDPA backends run on CUDA only")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, name)
    repeat = []

    def attention(q, k, v, causal):
        # causal: is_causal, the best a user can ask of each backend (no mask to read)
        n_rep = q.shape[1] // k.shape[1]
        with sdpa_kernel([backend]):
            if not repeat:
                try:
                    with warnings.catch_warnings():  # a refusal warns at length before it raises
                        warnings.simplefilter("ignore")
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=n_rep > 1)
                except RuntimeError:
                    if n_rep == 1:
                        raise
                    repeat.append(True)
                    attention.note = "k/v repeated: this backend refused enable_gqa"
            return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=causal)

    attention.note = None
    return attention


PEERS = {"liger": liger, "fla": fla, "sdpa-flash": lambda op: sdpa_backend("FLASH_ATTENTION"),
         "sdpa-efficient": lambda op: sdpa_backend("EFFICIENT_ATTENTION"),
         "sdpa-cudnn": lambda op: sdpa_backend("CUDNN_ATTENTION")}


# ------------------------------------------------------------------------------ the ops


@dataclasses.dataclass
class Op:
    name: str
    family: str  # the model workloads it takes: norm, gate, rotary, conv, attention, lce
    kb: str | None  # the kernels-benchmarks op whose workloads it takes, if any
    eager: Callable
    make: Callable  # workload dict -> inputs (tensors, or None / bool settings)
    grads: tuple[int, ...]  # inputs that take gradients
    bwd_reads: tuple[int, ...] = ()  # inputs the backward must read (bytes moved); () = all
    flops: Callable | None = None  # (wl, training) -> FLOPs: a compute-bound op
    ref: Callable | None = None  # (inputs64, cots64 | None) -> (outs, grads): a custom float64 reference
    ref_fn: Callable | None = None  # a float64-faithful spelling for the autograd reference
    directions: tuple[str, ...] = ("fwd", "fwd+bwd")
    peers: tuple[str, ...] = ()
    bundled: bool = True  # hubcompile bundles a Triton kernel for it
    sizes: tuple = ()  # the model sizes it runs at: (model, B, S), or (name, B, dim, S) for conv

    def runs(self, impl: str) -> bool:
        """Whether ``impl`` exists for this op at all (one that exists but cannot run here
        is still tried, and recorded as skipped)."""
        if impl in PEERS:
            return impl in self.peers
        return impl != "bundled-triton" or self.bundled


def _randn(*shape, dtype=BF16):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _heads(b, s, h, d):
    # as models lay them out: projected to [B, S, H, D], viewed as [B, H, S, D]
    return _randn(b, s, h, d).transpose(1, 2)


def _norm_inputs(wl, residual):
    x = _randn(wl["B"], wl["S"], wl["D"])
    w = (1 + 0.1 * torch.randn(wl["D"], device=DEVICE)).to(BF16)
    return [x, _randn(*x.shape), w] if residual else [x, w]


def _layer_norm_inputs(wl, residual):
    x = _randn(wl["B"], wl["S"], wl["D"])
    w, b = (1 + 0.1 * torch.randn(wl["D"], device=DEVICE)).to(BF16), _randn(wl["D"])
    return [x, _randn(*x.shape), w, b] if residual else [x, w, b]


def _rotary_inputs(wl):
    b, s, d = wl["B"], wl["S"], wl["hd"]
    angle = torch.rand(wl.get("cos_B", b), s, d // 2, device=DEVICE) * 6.3
    angle = torch.cat((angle, angle), dim=-1)  # as transformers builds them: the half repeated
    return [_heads(b, s, wl["H"], d), _heads(b, s, wl["KV"], d), angle.cos().to(BF16), angle.sin().to(BF16)]


def _attention_inputs(wl):
    b, s = wl["B"], wl["S"]
    q, k, v = _heads(b, s, wl["H"], wl["hd"]), _heads(b, s, wl["KV"], wl["hd"]), _heads(b, s, wl["KV"], wl["hd"])
    return [q, k, v, bool(wl["causal"])]  # the mask is built in the graph, as in a compiled model


def _attention_flops(wl, training):
    fwd = 4 * wl["B"] * wl["H"] * wl["S"] ** 2 * wl["hd"] * (0.5 if wl["causal"] else 1.0)
    return fwd * (3.5 if training else 1.0)  # the backward: 2.5x the forward's matmul work


def _lce_inputs(wl):
    t, h, v = wl["T"], wl["H"], wl["V"]
    y = torch.randint(0, v, (t,), device=DEVICE)
    y[torch.rand(t, device=DEVICE) < 0.05] = -100  # some ignored positions, as padding gives
    return [_randn(t, h), (_randn(v, h) * h ** -0.5).to(BF16), y]


def _gate_inputs(wl, fused):
    return [_randn(wl["T"], 2 * wl["I"])] if fused else [_randn(wl["T"], wl["I"]), _randn(wl["T"], wl["I"])]


def _conv_inputs(wl):
    return [_randn(wl["B"], wl["D"], wl["S"]), _randn(wl["D"], wl["W"]), _randn(wl["D"])]


# Model sizes (see model_workloads), smallest first. The main op of each family runs at
# sequences 128 to 16384, the variants at the larger two, to keep the set within ~8 min.
LLAMA = {"llama1b": dict(D=2048, I=8192, H=32, KV=8, hd=64, V=128256),
         "llama8b": dict(D=4096, I=14336, H=32, KV=8, hd=128, V=128256)}
SEQS = tuple((m, b, s) for b, s in ((4, 128), (4, 2048), (1, 16384)) for m in LLAMA)
LARGE = SEQS[2:]
ATTENTION = (("llama1b", 8, 128), ("llama1b", 4, 2048), ("llama8b", 4, 2048), ("llama1b", 1, 8192))
LCE = (("llama1b", 4, 1024), ("llama8b", 4, 1024))
CONV = (("mamba2-d4352", 8, 4352, 128), ("mamba-d1536", 4, 1536, 2048), ("target", 8, 4096, 2048),
        ("target", 4, 5120, 4096), ("mamba2-d8448", 1, 8448, 16384))
LAYER_NORM = (("gptneox-d4096", 1, 16384, 4096), ("gptneox-d4096", 16, 2048, 4096))  # (name, B, S, D)
SDPA_PEERS = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn")
OPS = {op.name: op for op in [
    Op("rmsnorm", "norm", "rmsnorm", rmsnorm, lambda wl: _norm_inputs(wl, False), (0, 1), peers=("liger", "fla"),
       sizes=SEQS),
    # the backward reads h (the size of x) and w
    Op("add_rmsnorm", "norm", None, add_rmsnorm, lambda wl: _norm_inputs(wl, True), (0, 1, 2), bwd_reads=(0, 2),
       peers=("liger", "fla"), sizes=LARGE),
    Op("silu_gate", "gate", "swiglu", silu_gate, lambda wl: _gate_inputs(wl, False), (0, 1),
       peers=("liger", "fla"), sizes=LARGE),
    Op("silu_gate_fused", "gate", "swiglu", silu_gate_fused, lambda wl: _gate_inputs(wl, True), (0,),
       peers=("liger",), sizes=SEQS),
    Op("gelu_tanh_gate", "gate", None, gelu_tanh_gate, lambda wl: _gate_inputs(wl, False), (0, 1), peers=("liger",),
       sizes=LARGE),
    Op("gelu_tanh_gate_fused", "gate", None, gelu_tanh_gate_fused, lambda wl: _gate_inputs(wl, True), (0,),
       peers=("liger",), sizes=LARGE),
    # kernels-benchmarks' LayerNorm grid, and 16384x4096 (the RMSNorm target's size)
    Op("layer_norm", "layer_norm", "layer_norm", layer_norm, lambda wl: _layer_norm_inputs(wl, False), (0, 1, 2),
       sizes=LAYER_NORM),
    Op("add_layer_norm", "layer_norm", None, add_layer_norm, lambda wl: _layer_norm_inputs(wl, True), (0, 1, 2, 3),
       bwd_reads=(0, 2), sizes=LAYER_NORM),
    # the backward reads only cos and sin
    Op("rotary", "rotary", "rotary", rotary, _rotary_inputs, (0, 1), bwd_reads=(2, 3), peers=("liger",), sizes=SEQS),
    Op("causal_conv1d", "conv", "causal_conv1d", causal_conv1d, _conv_inputs, (0, 1, 2), peers=("fla",),
       sizes=CONV[1::2]),
    Op("causal_conv1d_silu", "conv", None, causal_conv1d_silu, _conv_inputs, (0, 1, 2), peers=("fla",), sizes=CONV),
    Op("attention_eager", "attention", "attention", attention_eager, _attention_inputs,
       (0, 1, 2), flops=_attention_flops, ref=attention_f64, peers=SDPA_PEERS, bundled=False, sizes=ATTENTION),
    Op("attention_sdpa", "attention", "attention", attention_sdpa, _attention_inputs,
       (0, 1, 2), flops=_attention_flops, ref=attention_f64, peers=SDPA_PEERS, bundled=False, sizes=ATTENTION),
    Op("linear_cross_entropy", "lce", None, linear_cross_entropy, _lce_inputs, (0, 1),
       flops=lambda wl, training: 2 * wl["T"] * wl["H"] * wl["V"] * (3 if training else 1),
       ref_fn=linear_cross_entropy_f64, directions=("fwd+bwd",), peers=("liger",), sizes=LCE),
]}


# ------------------------------------------------------------------------- workloads


def handful(grid: list[dict]) -> list[dict]:
    """The first, middle and last workload of a grid (smallest, one between, largest)."""
    picks = [grid[0], grid[len(grid) // 2], grid[-1]]
    return [w for i, w in enumerate(picks) if w not in picks[:i]]


def kb_workloads(op: Op, whole_grid: bool, small: bool) -> list[dict]:
    """kernels-benchmarks' workloads (FIELD_NOTES section 5) for the ops it covers. Its
    causal conv1d takes an fp32 weight and bias; here they are bf16 like the input, as
    Mamba's nn.Conv1d holds them (the spelling hubcompile matches)."""
    if op.kb is None:
        return []
    if small:
        grid = {"rmsnorm": [dict(B=1, S=37, D=64)], "layer_norm": [dict(B=2, S=19, D=48)], "swiglu": [dict(T=37, I=48)],
                "rotary": [dict(B=1, S=13, H=3, KV=3, hd=16, cos_B=1)], "causal_conv1d": [dict(B=2, D=24, S=29, W=2)],
                "attention": [dict(B=1, S=19, H=3, KV=3, hd=16, causal=False)]}[op.kb]
    else:
        grid = {"rmsnorm": [dict(B=1, S=s, D=d) for s in (512, 1024, 2048) for d in (2048, 4096, 8192)],
                "layer_norm": [dict(B=16, S=s, D=d) for s in (2048, 4096) for d in (4096, 8192)]
                + [dict(B=1, S=16384, D=4096)],
                "swiglu": [dict(T=t, I=d) for t in (128, 256, 512) for d in (768, 1024, 2048)],
                "rotary": [dict(B=b, S=s, H=h, KV=h, hd=d, cos_B=1) for b in (1, 2) for s in (128, 512, 2048)
                           for h in (8, 32) for d in (64, 128)],
                "causal_conv1d": [dict(B=b, D=d, S=s, W=w) for b in (2, 4) for d in (64, 2048)
                                  for s in (128, 512, 2048) for w in (2, 4)],
                # non-causal, multi-head, as theirs (flux)
                "attention": [dict(B=1, S=4096 + n, H=24, KV=24, hd=128, causal=False)
                              for n in (128, 256, 320, 384, 448, 512)]}[op.kb]
        grid = grid if whole_grid else handful(grid)
    return [{"name": "kb_" + "_".join(f"{k}{v}" for k, v in wl.items() if k not in ("causal", "cos_B")), **wl}
            for wl in grid]


def model_workloads(op: Op, small: bool) -> list[dict]:
    """Real model sizes (``op.sizes``), tokens = batch x sequence: Llama-3.2-1B and
    Llama-3.1-8B (8B at 1x16384 is the issue's 16384x4096 RMSNorm target); attention to
    1x8192 (the eager spelling's fp32 scores alone take 8.6 GB there); the causal conv1d at
    Mamba's d_inner (1536, 5120) and Mamba2's conv dim (2*2048+2*128 = 4352, 2*4096+2*128 =
    8448), W=4, with the issue's targets 8x4096x2048 and 4x5120x4096 (B x dim x S)."""
    if small:
        return [{"name": f"tiny_{op.family}", **{
            "norm": dict(B=2, S=19, D=48), "layer_norm": dict(B=2, S=19, D=48), "gate": dict(T=37, I=40), "rotary": dict(B=2, S=13, H=4, KV=2, hd=16),
            "conv": dict(B=2, D=24, S=29, W=4), "attention": dict(B=2, S=13, H=4, KV=2, hd=16, causal=True),
            "lce": dict(T=37, H=32, V=101)}[op.family]}]
    if op.family == "conv":
        return [{"name": f"{name}_{b}x{d}x{s}", "B": b, "D": d, "S": s, "W": 4} for name, b, d, s in op.sizes]
    if op.family == "layer_norm":
        return [{"name": f"{name}_{b}x{s}", "B": b, "S": s, "D": d} for name, b, s, d in op.sizes]
    rows = []
    for model, b, s in op.sizes:
        m = LLAMA[model]
        dims = {"norm": dict(B=b, S=s, D=m["D"]), "gate": dict(T=b * s, I=m["I"]),
                "rotary": dict(B=b, S=s, H=m["H"], KV=m["KV"], hd=m["hd"]),
                "attention": dict(B=b, S=s, H=m["H"], KV=m["KV"], hd=m["hd"], causal=True),
                "lce": dict(T=b * s, H=m["D"], V=m["V"])}[op.family]
        rows.append({"name": f"{model}_{b}x{s}", **dims})
    return rows


# --------------------------------------------------------------------------- running


def as_list(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def differentiate(fn, inputs, grad_idx, cots):
    """(outputs, gradients of the inputs ``grad_idx``) of ``fn`` by autograd; the forward
    alone (no grad) when ``cots`` is None."""
    if cots is None:
        with torch.no_grad():
            return [o.detach() for o in as_list(fn(*inputs))], None
    leaves = [t.detach().requires_grad_(i in grad_idx) if isinstance(t, torch.Tensor) else t
              for i, t in enumerate(inputs)]
    outs = as_list(fn(*leaves))
    grads = torch.autograd.grad(outs, [leaves[i] for i in grad_idx], cots)
    return [o.detach() for o in outs], list(grads)


@dataclasses.dataclass
class Case:
    """One op x workload x direction: inputs, the eager and float64 results, the work."""

    op: Op
    wl: dict
    suite: str
    direction: str
    inputs: list
    cots: list | None
    eager: tuple  # (outs, grads)
    ref: tuple  # float64 (outs, grads)
    bytes: int | None
    flops: float | None

    @property
    def training(self) -> bool:
        return self.direction == "fwd+bwd"


def make_case(op: Op, wl: dict, suite: str, direction: str, inputs: list) -> Case:
    training = direction == "fwd+bwd"
    eager_outs, _ = differentiate(op.eager, inputs, op.grads, None)
    cots = [torch.randn_like(o) for o in eager_outs] if training else None
    eager = differentiate(op.eager, inputs, op.grads, cots) if training else (eager_outs, None)
    x64 = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    c64 = [c.double() for c in cots] if training else None
    ref = op.ref(x64, c64) if op.ref else differentiate(op.ref_fn or op.eager, x64, op.grads, c64)
    # The least traffic: read the inputs, write the outputs; the backward then reads the
    # cotangents and what it needs of the inputs, and writes the gradients.
    moved = nbytes(*inputs) + nbytes(*eager_outs)
    if training:
        reads = op.bwd_reads or range(len(inputs))
        moved += nbytes(*cots) + nbytes(*(inputs[i] for i in reads)) + nbytes(*(inputs[i] for i in op.grads))
    flops = op.flops(wl, training) if op.flops else None
    return Case(op, wl, suite, direction, inputs, cots, eager, ref, None if flops else moved, flops)


def compiled(case: Case, impl: str):
    torch._dynamo.reset()  # each impl and shape compiles afresh (and no recompile limit is met)
    if impl == "inductor":
        return torch.compile(case.op.eager, dynamic=False)
    # The guard's default ("auto") decides on CUDA only; on CPU (the smoke test) "on" runs it.
    options = {"perf_guard": "off"} if impl == "hubkernels-noguard" else (None if CUDA else {"perf_guard": "on"})
    return torch.compile(case.op.eager, backend="hubkernels", dynamic=False, options=options)


def run_impl(case: Case, impl: str, ceilings: dict) -> dict:
    """Check one implementation against the float64 reference, time it; the record's fields."""
    op, training = case.op, case.training
    hubcompile.RECORDS.clear()
    perf_guard.DECISIONS.clear()
    # A kernel that raised once runs as the eager reference for the rest of the process:
    # forget that, so that each row starts afresh (and says so when it happens again).
    hub_kernels._impls.clear()
    fields = {}
    if impl == "bundled-triton":
        fwd, bwd = bundled(op.name)
        fn = None
    elif impl in PEERS:
        fn = PEERS[impl](op.name)
    else:
        fn = op.eager if impl == "eager" else compiled(case, impl)
    # A copy of the inputs for each implementation: some write them in place (liger's rotary).
    # The bundled kernels take their gradients by hand: their inputs need no autograd.
    autograd = training and fn is not None
    leaves = [t.detach().clone().requires_grad_(autograd and i in op.grads) if isinstance(t, torch.Tensor) else t
              for i, t in enumerate(case.inputs)]
    grad_leaves = [leaves[i] for i in op.grads] if autograd else None
    cots = [c.clone() for c in case.cots] if training else None  # an in-place backward may write them

    # First call: compiles (and lets the performance guard decide), and is checked.
    start = time.perf_counter()
    if fn is None:
        outs, saved = fwd(*leaves)
        grads = bwd(saved, [c.clone() for c in cots], *leaves) if training else None
    else:
        outs, grads = differentiate(fn, leaves, op.grads, [c.clone() for c in cots] if training else None)
    if CUDA:
        torch.cuda.synchronize()
    fields["compile_ms"] = (time.perf_counter() - start) * 1e3
    checks = [accuracy(o, e, r, o.dtype) for o, e, r in zip(outs, case.eager[0], case.ref[0])]
    if training:
        checks += [accuracy(g, e, r, g.dtype) for g, e, r in zip(grads, case.eager[1], case.ref[1])]
    fields["corr"] = [{**c, "ref": "float64"} for c in checks]
    fields["ok"] = bool(checks) and all(c["ok"] for c in checks)
    fields["absmax"] = max(c["absmax"] for c in checks)
    if getattr(fn, "note", None):
        fields["note"] = fn.note
    del outs, grads

    if fn is None:
        def step():
            _, saved = fwd(*leaves)
            if training:
                bwd(saved, cots, *leaves)
    elif training:
        def step():
            torch.autograd.backward(as_list(fn(*leaves)), cots)
    else:
        def step():
            with torch.no_grad():
                fn(*leaves)
    lat = bench_ms(step, reps_ms=100, min_reps=MIN_REPS, grad_to_none=grad_leaves)
    fields["gpu_ms"] = gpu_ms(step, grad_to_none=grad_leaves)  # host launch hidden: the kernels alone
    for t in grad_leaves or ():
        t.grad = None
    # the step's peak above what is already allocated (inputs, references)
    before = torch.cuda.memory_allocated() if CUDA else 0
    peak = peak_of_one_step(step)
    fields["peak_bytes"] = peak - before if peak is not None else None
    fields.update(work_fields(case, lat["p50"], ceilings))
    if impl.startswith("hubkernels"):
        replaced = {}
        for r in hubcompile.RECORDS:
            for family, n in r.replaced.items():
                if n:
                    replaced[family] = replaced.get(family, 0) + n
        decisions = perf_guard.DECISIONS
        fields["replaced"] = replaced
        fields["perf_guard"] = [dataclasses.asdict(d) for d in decisions]
        kept = {d.keep for d in decisions}
        # which code ran: the replacements, Inductor's (the guard fell back), or Inductor's
        # because nothing matched
        fields["chose"] = ("inductor" if "inductor" in kept else "hubkernels") if replaced else "nothing replaced"
        if not replaced:
            fields["refused"] = {f: [why[:300] for _, why in reasons] for r in hubcompile.RECORDS
                                 for f, reasons in r.refused.items() if reasons}
        fell_back = [f"{spec} {name}" for (spec, name, _), impl in hub_kernels._impls.items()
                     if impl is hub_kernels._FALLBACK and spec != "reference"]
        if fell_back:  # the kernel raised: the row timed the eager reference inside the op
            fields["fell_back"] = fell_back
            fields["chose"] += " (kernel raised: reference ran)"
    return {"lat": lat, **fields}


def work_fields(case: Case, ms: float, ceilings: dict) -> dict:
    if case.flops:
        tflops = case.flops / (ms * 1e-3) / 1e12
        return {"flops": case.flops, "tflops": tflops, "frac_matmul_peak": tflops / ceilings["tflops"],
                "matmul_peak_tflops": ceilings["tflops"]}
    gbps = case.bytes / (ms * 1e-3) / 1e9
    return {"bytes": case.bytes, "gbps": gbps, "frac_copy_ceiling": gbps / ceilings["gbps"],
            "copy_ceiling_gbps": ceilings["gbps"]}


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ops.jsonl"
    if path.exists():  # a new run starts a new file; the old one is kept beside it
        path.rename(out / f"ops.{int(path.stat().st_mtime)}.jsonl")
    records = Records(str(path), run="ops")
    ceilings = {"gbps": copy_ceiling_gbps(), "tflops": matmul_peak_tflops()}
    print(f"{records.env['gpu']}: copy ceiling {ceilings['gbps']:.0f} GB/s, bf16 matmul {ceilings['tflops']:.0f} "
          f"TFLOP/s; perf guard cache {perf_guard.cache_path()}", flush=True)
    ops = [OPS[o] for o in args.ops.split(",")] if args.ops else list(OPS.values())
    impls = args.impls.split(",") if args.impls else list(IMPLS)
    suites = ("kb", "models") if args.suite == "all" else (args.suite,)
    queues = [[(op, suite, wl) for suite in suites for wl in (
        kb_workloads(op, args.kb_grid, args.small) if suite == "kb" else model_workloads(op, args.small))]
        for op in ops]
    # Round robin over the ops, each op's workloads smallest first: if the time budget runs
    # out, every op has rows.
    plan = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    begin = time.perf_counter()
    for n, (op, suite, wl) in enumerate(plan):
        if args.budget_s and time.perf_counter() - begin > args.budget_s:
            print(f"time budget of {args.budget_s:.0f} s spent: {len(plan) - n} of {len(plan)} workloads not run: "
                  + ", ".join(f"{o.name} {w['name']}" for o, _, w in plan[n:]), flush=True)
            return
        print(f"-- workload {n + 1}/{len(plan)}: {op.name} {suite}/{wl['name']}", flush=True)
        run_workload(op, wl, suite, impls, records, ceilings, begin)


def run_workload(op, wl, suite, impls, records, ceilings, begin) -> None:
    torch.manual_seed(0)
    wl_rec = {**wl, "dtype": "bfloat16"}
    try:
        inputs = op.make(wl)
    except Exception as e:  # noqa: BLE001 - out of memory, say: the next workload may fit
        print(f"{op.name} {wl['name']}: inputs failed: {e!r}"[:300], flush=True)
        return
    for direction in op.directions:
        try:
            case = make_case(op, wl, suite, direction, inputs)
        except Exception as e:  # noqa: BLE001
            print(f"{op.name} {wl['name']} {direction}: reference failed: {e!r}"[:300], flush=True)
            _free()
            continue
        for impl in (i for i in impls if op.runs(i)):
            print(f"[{time.perf_counter() - begin:5.0f} s] {op.name} {suite}/{wl['name']} {direction} {impl}:", end=" ",
                  flush=True)
            common = {"op": op.name, "suite": suite, "direction": direction}
            try:
                r = run_impl(case, impl, ceilings)
                lat = r.pop("lat")
                records.add(impl, wl_rec, lat, **common, **r)
                rate = (f"{r['tflops']:.0f} TFLOP/s ({100 * r['frac_matmul_peak']:.0f}% peak)" if "tflops" in r
                        else f"{r['gbps']:.0f} GB/s ({100 * r['frac_copy_ceiling']:.0f}% copy)")
                extra = f", kept {r['chose']} {r['replaced']}" if "chose" in r else ""
                gpu = f" (GPU alone {r['gpu_ms']['p50']:.4f})" if r.get("gpu_ms") else ""
                print(f"{lat['p50']:.4f} ms{gpu}, {rate}, ok={r['ok']}{extra}", flush=True)
            except (Unavailable, ImportError) as e:
                records.add(impl, wl_rec, None, **common, ok=False, skipped=True, err=f"{type(e).__name__}: {e}")
                print(f"skipped ({e})", flush=True)
            except Exception as e:  # noqa: BLE001 - a failing implementation is a result too
                records.add(impl, wl_rec, None, **common, ok=False, err=f"{type(e).__name__}: {e}"[:1000])
                print(f"FAILED {type(e).__name__}: {e}"[:400], flush=True)
            finally:
                torch._dynamo.reset()
                _free()
        del case
    _free()


def _free() -> None:
    if CUDA:
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- report


def report(out: str) -> str:
    """Plots and CSVs per op, direction and suite; the table and headline ratios (printed
    and written to summary.md)."""
    rows = plots.load([os.path.join(out, "ops.jsonl")])
    plots.main([os.path.join(out, "ops.jsonl"), "--out", out])
    lines = ["| op | dir | suite | workload | " + " | ".join(IMPLS) + " |",
             "|---|---|---|---|" + "---|" * len(IMPLS)]
    groups = plots.group(rows)
    for (op, direction, suite), recs in groups.items():
        for label in dict.fromkeys(r["wl"]["name"] for r in recs):
            cells = []
            for impl in IMPLS:
                r = next((x for x in recs if x["impl"] == impl and x["wl"]["name"] == label), None)
                cells.append("" if r is None else "skip" if r.get("skipped") else "fail" if not r.get("lat_ms") else
                             f"{r['lat_ms']['p50']:.3f}" + ("" if r.get("ok") else " (wrong)"))
            lines.append(f"| {op} | {direction} | {suite} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "Headline, at each op's largest workload (by bytes or FLOPs): speedup = Inductor ms / ms; "
                  "rate = share of the copy ceiling (memory-bound) or of the matmul peak (attention, LCE).", "",
              "GPU speedups: the same ratios of the steps' GPU time alone (host launch hidden, bench/common.py "
              "gpu_ms), where a compiled step is host-bound.", "",
              "| op | dir | suite | workload | Inductor ms | hubkernels ms (kept) | speedup | noguard speedup | "
              "GPU speedup, hub / noguard | best other | hubkernels rate | Inductor rate |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (op, direction, suite), recs in groups.items():
        timed = [r for r in recs if r.get("lat_ms")]
        if not timed:
            continue
        size = max(timed, key=lambda r: r.get("bytes") or r.get("flops") or 0)
        at = {r["impl"]: r for r in timed if r["wl"]["name"] == size["wl"]["name"]}

        def ms(impl):
            return at[impl]["lat_ms"]["p50"] if impl in at else None

        def rate(impl):
            r = at.get(impl, {})
            frac = r.get("frac_copy_ceiling", r.get("frac_matmul_peak"))
            return f"{100 * frac:.0f}%" if frac is not None else "-"

        def gpu(impl):
            return (at[impl].get("gpu_ms") or {}).get("p50") if impl in at else None

        ind, hub, nog = ms("inductor"), ms("hubkernels"), ms("hubkernels-noguard")
        g_ind, g_hub, g_nog = gpu("inductor"), gpu("hubkernels"), gpu("hubkernels-noguard")
        others = [(r["lat_ms"]["p50"], i) for i, r in at.items() if i not in ("hubkernels", "hubkernels-noguard")
                  and r.get("ok")]
        best = min(others) if others else None
        kept = at.get("hubkernels", {}).get("chose", "-")
        lines.append(" | ".join([
            f"| {op}", direction, suite, size["wl"]["name"], _fmt(ind), f"{_fmt(hub)} ({kept})",
            _ratio(ind, hub), _ratio(ind, nog), f"{_ratio(g_ind, g_hub)} / {_ratio(g_ind, g_nog)}",
            f"{best[1]} {best[0]:.3f}" if best else "-", rate("hubkernels"), rate("inductor")]) + " |")
    wrong = [f"{r['op']} {r['direction']} {r['wl']['name']} {r['impl']}" for r in rows if r.get("lat_ms")
             and not r.get("ok")]
    failed = [f"{r['op']} {r['direction']} {r['wl']['name']} {r['impl']}: {r.get('err', '')[:120]}" for r in rows
              if not r.get("lat_ms") and not r.get("skipped")]
    skipped = sorted({f"{r['impl']} ({r.get('err', '')[:80]})" for r in rows if r.get("skipped")})
    raised = [f"{r['op']} {r['direction']} {r['wl']['name']} {r['impl']}: {', '.join(r['fell_back'])}" for r in rows
              if r.get("fell_back")]
    if wrong:
        lines += ["", "Wrong results (timed, marked ok=false): " + "; ".join(wrong)]
    if raised:
        lines += ["", "hubkernels rows whose kernel raised (the op ran its eager reference): " + "; ".join(raised)]
    if failed:
        lines += ["", "Failed:"] + [f"- {f}" for f in failed]
    if skipped:
        lines += ["", "Skipped (not importable or not on this device): " + "; ".join(skipped)]
    text = "\n".join(lines) + "\n"
    Path(out, "summary.md").write_text(text)
    return text


def _ratio(base, ms) -> str:
    return f"{base / ms:.2f}x" if base and ms else "-"


def _fmt(ms) -> str:
    return f"{ms:.3f}" if ms is not None else "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/ops")
    parser.add_argument("--suite", choices=("kb", "models", "all"), default="all")
    parser.add_argument("--ops", default="", help=f"comma-separated, of: {', '.join(OPS)} (default: all)")
    parser.add_argument("--impls", default="", help=f"comma-separated, of: {', '.join(IMPLS)} (default: all)")
    parser.add_argument("--small", action="store_true", help="tiny sizes: a smoke test (CPU: TRITON_INTERPRET=1)")
    parser.add_argument("--kb-grid", action="store_true", help="all of kernels-benchmarks' grid, not a handful")
    parser.add_argument("--budget-s", type=float, default=0, help="start no workload after this many seconds")
    parser.add_argument("--report", metavar="DIR", help="only write the summary and plots of DIR/ops.jsonl")
    args = parser.parse_args(argv)
    for name, valid in ((args.ops, OPS), (args.impls, IMPLS)):
        unknown = [x for x in name.split(",") if x and x not in valid]
        if unknown:
            parser.error(f"unknown {', '.join(unknown)}; valid: {', '.join(valid)}")
    if not args.report:
        run(args)
    print(report(args.report or args.out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
