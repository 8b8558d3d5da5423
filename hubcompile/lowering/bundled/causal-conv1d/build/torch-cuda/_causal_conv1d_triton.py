"""Triton kernels for the depthwise causal conv1d (forward and backward).

Forward:   pre[b, d, t] = sum_{k<W} w[d, k] * x[b, d, t - (W-1) + k] + bias[d]
           out = silu(pre) if ACT_SILU else pre
Backward:  dpre = dout * silu'(pre) (pre recomputed) or dout
           dx[b, d, s]  = sum_{j<W} w[d, W-1-j] * dpre[b, d, s + j]
           dw[d, k]     = sum_{b, t} dpre[b, d, t] * x[b, d, t - (W-1) + k]
           dbias[d]     = sum_{b, t} dpre[b, d, t]
dw / dbias use a two-stage reduction: each program reduces its (batch, time-chunk) slice
into an fp32 partial buffer, the host sums the partials.
All accumulation is fp32.
"""

import triton
import triton.language as tl


@triton.jit
def _cast_out(v, dst_ty: tl.constexpr):
    """Cast to the output element type with round-to-nearest-even.

    bf16 is rounded with integer ops: bit-identical to ``torch.Tensor.to(torch.bfloat16)``
    and to the GPU's native cvt.rn, and also correct under TRITON_INTERPRET=1 (whose
    native fp32->bf16 cast truncates).
    """
    if dst_ty == tl.bfloat16:
        v = v.to(tl.float32)
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        r = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(v != v, v.to(tl.bfloat16), r)
    else:
        return v.to(dst_ty)


@triton.jit
def _conv_pre(x_base, sx_l, w_ptr, sw_d, sw_k, b_ptr, d, d_mask, tt, L, HAS_BIAS: tl.constexpr, W: tl.constexpr):
    """fp32 pre-activation at times ``tt`` ([BLOCK_L]) for channels ``d`` ([BLOCK_D])."""
    acc = tl.zeros((d.shape[0], tt.shape[0]), dtype=tl.float32)
    for k in tl.static_range(W):
        w_k = tl.load(w_ptr + d * sw_d + k * sw_k, mask=d_mask, other=0.0).to(tl.float32)
        src = tt - (W - 1) + k
        m = d_mask[:, None] & ((src >= 0) & (src < L))[None, :]
        xv = tl.load(x_base + src[None, :].to(tl.int64) * sx_l, mask=m, other=0.0).to(tl.float32)
        acc += w_k[:, None] * xv
    if HAS_BIAS:
        bias = tl.load(b_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
        acc += bias[:, None]
    return acc


@triton.jit
def _causal_conv1d_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    D,
    L,
    sx_b,
    sx_d,
    sx_l,
    sw_d,
    sw_k,
    HAS_BIAS: tl.constexpr,
    ACT_SILU: tl.constexpr,
    W: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    t_mask = t < L

    x_base = x_ptr + pid_b * sx_b + d[:, None].to(tl.int64) * sx_d
    acc = _conv_pre(x_base, sx_l, w_ptr, sw_d, sw_k, b_ptr, d, d_mask, t, L, HAS_BIAS, W)
    if ACT_SILU:
        acc = acc * tl.sigmoid(acc)
    # out is contiguous [B, D, L]
    o_ptrs = out_ptr + (pid_b * D + d[:, None].to(tl.int64)) * L + t[None, :]
    tl.store(o_ptrs, _cast_out(acc, out_ptr.dtype.element_ty), mask=d_mask[:, None] & t_mask[None, :])


@triton.jit
def _dpre_at(
    x_base,
    sx_l,
    w_ptr,
    sw_d,
    sw_k,
    b_ptr,
    do_base,
    sdo_l,
    d,
    d_mask,
    tt,
    L,
    HAS_BIAS: tl.constexpr,
    ACT_SILU: tl.constexpr,
    W: tl.constexpr,
):
    """fp32 gradient w.r.t. the pre-activation at times ``tt``; zero where tt >= L."""
    m = d_mask[:, None] & (tt < L)[None, :]
    g = tl.load(do_base + tt[None, :].to(tl.int64) * sdo_l, mask=m, other=0.0).to(tl.float32)
    if ACT_SILU:
        pre = _conv_pre(x_base, sx_l, w_ptr, sw_d, sw_k, b_ptr, d, d_mask, tt, L, HAS_BIAS, W)
        s = tl.sigmoid(pre)
        g = g * s * (1.0 + pre * (1.0 - s))
    return g


@triton.jit
def _causal_conv1d_bwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    dout_ptr,
    dx_ptr,
    dw_part_ptr,
    db_part_ptr,
    D,
    L,
    n_lprog,
    BLOCKS_PER_PROG,
    sx_b,
    sx_d,
    sx_l,
    sw_d,
    sw_k,
    sdo_b,
    sdo_d,
    sdo_l,
    HAS_BIAS: tl.constexpr,
    ACT_SILU: tl.constexpr,
    W: tl.constexpr,
    WP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    kk = tl.arange(0, WP)

    x_base = x_ptr + pid_b * sx_b + d[:, None].to(tl.int64) * sx_d
    do_base = dout_ptr + pid_b * sdo_b + d[:, None].to(tl.int64) * sdo_d
    dx_base = dx_ptr + (pid_b * D + d[:, None].to(tl.int64)) * L

    dw_acc = tl.zeros((BLOCK_D, WP), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    t_start = pid_l * BLOCKS_PER_PROG * BLOCK_L
    t_end = tl.minimum(t_start + BLOCKS_PER_PROG * BLOCK_L, L)
    for t0 in range(t_start, t_end, BLOCK_L):
        t = t0 + tl.arange(0, BLOCK_L)
        t_mask = t < L
        # j = 0 shift: dpre at t itself (feeds dweight, dbias and dx)
        g0 = _dpre_at(
            x_base, sx_l, w_ptr, sw_d, sw_k, b_ptr, do_base, sdo_l, d, d_mask, t, L, HAS_BIAS, ACT_SILU, W
        )
        db_acc += tl.sum(g0, axis=1)
        for k in tl.static_range(W):
            src = t - (W - 1) + k
            m = d_mask[:, None] & ((src >= 0) & (src < L))[None, :]
            xv = tl.load(x_base + src[None, :].to(tl.int64) * sx_l, mask=m, other=0.0).to(tl.float32)
            part = tl.sum(g0 * xv, axis=1)
            dw_acc += tl.where(kk[None, :] == k, part[:, None], 0.0)

        w_last = tl.load(w_ptr + d * sw_d + (W - 1) * sw_k, mask=d_mask, other=0.0).to(tl.float32)
        dx = w_last[:, None] * g0
        for j in tl.static_range(1, W):
            gj = _dpre_at(
                x_base, sx_l, w_ptr, sw_d, sw_k, b_ptr, do_base, sdo_l, d, d_mask, t + j, L, HAS_BIAS, ACT_SILU, W
            )
            w_j = tl.load(w_ptr + d * sw_d + (W - 1 - j) * sw_k, mask=d_mask, other=0.0).to(tl.float32)
            dx += w_j[:, None] * gj
        tl.store(dx_base + t[None, :], _cast_out(dx, dx_ptr.dtype.element_ty), mask=d_mask[:, None] & t_mask[None, :])

    # partial buffers: dw_part [n_part, D, W], db_part [n_part, D], n_part = B * n_lprog
    part_idx = pid_b * n_lprog + pid_l
    dw_ptrs = dw_part_ptr + (part_idx * D + d[:, None].to(tl.int64)) * W + kk[None, :]
    tl.store(dw_ptrs, dw_acc, mask=d_mask[:, None] & (kk < W)[None, :])
    if HAS_BIAS:
        tl.store(db_part_ptr + part_idx * D + d, db_acc, mask=d_mask)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _blocks(x, budget: int):
    """Tile [BLOCK_D, BLOCK_L] of about ``budget`` elements (sized so that the W=4 + silu
    variants compile without register spills at 4 warps on sm_90).  Channels-last x
    (stride 1 along D, e.g. a transpose of [B, L, D]) gets a wider D extent."""
    _, D, L = x.shape
    d_contig = x.stride(1) == 1 and x.stride(2) != 1
    block_l = min(_next_pow2(L), 32 if d_contig else 64)
    block_d = min(_next_pow2(D), max(budget // block_l, 1))
    block_l = min(_next_pow2(L), max(budget // block_d, 1))
    return block_d, block_l


def _launch(kernel, grid, *args, **meta) -> None:
    """Launch ``kernel`` on ``grid``. While hubcompile traces this module into Inductor's
    graph (a proxy mode is active), through ``torch.library.wrap_triton``: Inductor then
    launches the kernel from its own generated code, without this module's Python on
    every call."""
    import torch
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if get_proxy_mode() is not None:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def launch_fwd(x, weight, bias, out, activation_silu: bool) -> None:
    B, D, L = x.shape
    W = weight.shape[1]
    block_d, block_l = _blocks(x, 1024)
    grid = (triton.cdiv(L, block_l), triton.cdiv(D, block_d), B)
    _launch(
        _causal_conv1d_fwd_kernel,
        grid,
        x,
        weight,
        bias if bias is not None else weight,
        out,
        D,
        L,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        weight.stride(0),
        weight.stride(1),
        HAS_BIAS=bias is not None,
        ACT_SILU=bool(activation_silu),
        W=W,
        BLOCK_D=block_d,
        BLOCK_L=block_l,
        num_warps=4,
    )


def launch_bwd(dout, x, weight, bias, dx, activation_silu: bool, target_programs: int = 1024):
    """Runs the backward kernel; returns fp32 (dweight [D, W], dbias [D] or None)."""
    import torch

    B, D, L = x.shape
    W = weight.shape[1]
    block_d, block_l = _blocks(x, 512)
    n_d = triton.cdiv(D, block_d)
    n_lblocks = triton.cdiv(L, block_l)
    want_lprog = max(1, min(n_lblocks, triton.cdiv(target_programs, max(B * n_d, 1))))
    blocks_per_prog = triton.cdiv(n_lblocks, want_lprog)
    n_lprog = triton.cdiv(n_lblocks, blocks_per_prog)
    n_part = B * n_lprog
    dw_part = torch.empty((n_part, D, W), dtype=torch.float32, device=x.device)
    db_part = torch.empty((n_part, D), dtype=torch.float32, device=x.device) if bias is not None else dw_part
    grid = (n_lprog, n_d, B)
    _launch(
        _causal_conv1d_bwd_kernel,
        grid,
        x,
        weight,
        bias if bias is not None else weight,
        dout,
        dx,
        dw_part,
        db_part,
        D,
        L,
        n_lprog,
        blocks_per_prog,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        weight.stride(0),
        weight.stride(1),
        dout.stride(0),
        dout.stride(1),
        dout.stride(2),
        HAS_BIAS=bias is not None,
        ACT_SILU=bool(activation_silu),
        W=W,
        WP=_next_pow2(W),
        BLOCK_D=block_d,
        BLOCK_L=block_l,
        num_warps=4,
    )
    # second stage of the reduction (fp32)
    dweight = dw_part.sum(dim=0)
    dbias = db_part.sum(dim=0) if bias is not None else None
    return dweight, dbias
