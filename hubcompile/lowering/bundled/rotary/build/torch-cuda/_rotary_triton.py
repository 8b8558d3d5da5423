"""Triton kernels for rotary position embeddings (forward and x-gradient).

One kernel serves both directions and both pairings:

* half-split (HF ``rotate_half``): the pair of column ``j`` is ``j + R/2``;
* interleaved (GPT-J ``rotate_every_two``): the pair of column ``2j`` is ``2j + 1``.

With ``(a, b)`` a pair of x columns and ``(ca, cb)``, ``(sa, sb)`` the cos/sin values
at those columns:

* forward:  ``out_a = a*ca - b*sa``, ``out_b = b*cb + a*sb``
* backward: ``dx_a = a*ca + b*sb``,  ``dx_b = b*cb - a*sa``   (transpose of the rotation)

Columns ``R..D`` (partial rotary) are copied through unchanged.  All arithmetic is fp32;
the result is rounded once (round-to-nearest-even) to the output dtype.
"""

import torch
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
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    n_rows,
    A1,
    A2,
    D,
    HALF,
    sx_b,
    sx_1,
    sx_2,
    sc_b,
    sc_1,
    sc_2,
    sc_d,
    ss_b,
    ss_1,
    ss_2,
    ss_d,
    so_b,
    so_1,
    so_2,
    INTERLEAVED: tl.constexpr,
    BACKWARD: tl.constexpr,
    HAS_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < n_rows
    i2 = rows % A2
    tmp = rows // A2
    i1 = tmp % A1
    b = tmp // A1

    x_row = b * sx_b + i1 * sx_1 + i2 * sx_2
    c_row = b * sc_b + i1 * sc_1 + i2 * sc_2
    s_row = b * ss_b + i1 * ss_1 + i2 * ss_2
    o_row = b * so_b + i1 * so_1 + i2 * so_2

    j = tl.arange(0, BLOCK_H)
    if INTERLEAVED:
        col_a = 2 * j
        col_b = 2 * j + 1
    else:
        col_a = j
        col_b = j + HALF
    mask = row_mask[:, None] & (j < HALF)[None, :]

    xa = tl.load(x_ptr + x_row[:, None] + col_a[None, :], mask=mask, other=0.0).to(tl.float32)
    xb = tl.load(x_ptr + x_row[:, None] + col_b[None, :], mask=mask, other=0.0).to(tl.float32)
    ca = tl.load(cos_ptr + c_row[:, None] + col_a[None, :] * sc_d, mask=mask, other=0.0).to(tl.float32)
    cb = tl.load(cos_ptr + c_row[:, None] + col_b[None, :] * sc_d, mask=mask, other=0.0).to(tl.float32)
    sa = tl.load(sin_ptr + s_row[:, None] + col_a[None, :] * ss_d, mask=mask, other=0.0).to(tl.float32)
    sb = tl.load(sin_ptr + s_row[:, None] + col_b[None, :] * ss_d, mask=mask, other=0.0).to(tl.float32)

    if BACKWARD:
        oa = xa * ca + xb * sb
        ob = xb * cb - xa * sa
    else:
        oa = xa * ca - xb * sa
        ob = xb * cb + xa * sb

    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + o_row[:, None] + col_a[None, :], _cast_out(oa, out_ty), mask=mask)
    tl.store(out_ptr + o_row[:, None] + col_b[None, :], _cast_out(ob, out_ty), mask=mask)

    if HAS_PASS:
        # Partial rotary: columns [2*HALF, D) pass through unchanged.
        p = tl.arange(0, BLOCK_P)
        for p0 in range(2 * HALF, D, BLOCK_P):
            cols = p0 + p
            pmask = row_mask[:, None] & (cols < D)[None, :]
            v = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=pmask, other=0.0)
            tl.store(out_ptr + o_row[:, None] + cols[None, :], _cast_out(v, out_ty), mask=pmask)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _launch(kernel, grid, *args, **meta) -> None:
    """Launch ``kernel`` on ``grid``; while hubcompile traces this module into Inductor's
    graph (a proxy mode is active), through ``torch.library.wrap_triton``, so that
    Inductor launches it from its own generated code."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if get_proxy_mode() is not None:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def launch_rotary(x, cos_e, sin_e, out, rotary_dim: int, interleaved: bool, backward: bool) -> None:
    """Launch the kernel.

    x: 4-D ``[B, A1, A2, D]`` with ``stride(-1) == 1``; cos_e/sin_e: already expanded to
    ``[B, A1, A2, R]`` (stride 0 on broadcast dims); out: ``[B, A1, A2, D]`` with
    ``stride(-1) == 1``, any other strides.
    """
    B, A1, A2, D = x.shape
    n_rows = B * A1 * A2
    half = rotary_dim // 2
    block_h = _next_pow2(max(half, 1))
    pass_cols = D - rotary_dim
    block_p = min(_next_pow2(max(pass_cols, 1)), 128)
    # ~1K rotary pairs per program (no register spills at 4 warps on sm_90), <= 64 rows.
    block_m = max(1, min(64, 1024 // block_h, _next_pow2(n_rows)))
    grid = (triton.cdiv(n_rows, block_m),)
    _launch(_rotary_kernel, grid,
        x,
        cos_e,
        sin_e,
        out,
        n_rows,
        A1,
        A2,
        D,
        half,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        cos_e.stride(0),
        cos_e.stride(1),
        cos_e.stride(2),
        cos_e.stride(3),
        sin_e.stride(0),
        sin_e.stride(1),
        sin_e.stride(2),
        sin_e.stride(3),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        INTERLEAVED=bool(interleaved),
        BACKWARD=bool(backward),
        HAS_PASS=pass_cols > 0,
        BLOCK_M=block_m,
        BLOCK_H=block_h,
        BLOCK_P=block_p,
        num_warps=4,
    )
