"""Triton RMSNorm (optionally fused with a residual add): forward and backward.

Functional API: every function returns new tensors and records no autograd graph.

Numerics (all arithmetic in fp32):
  h    = x + residual, rounded to h's dtype (like eager ``x + residual``)
  rstd = rsqrt(mean(h^2) + eps)                                   (fp32)
  n    = h * rstd
  cast_before_scale=True  (Llama):  y = round_h(n) * round_w(w + offset), rounded once to
                                    promote(h.dtype, w.dtype)
  cast_before_scale=False (Gemma):  y = n * (w + offset), rounded once to h.dtype
  weight=None:                      y = n, rounded once to h.dtype (no weight read, no dweight)
Backward treats the roundings as identities except that dweight uses the n the forward
multiplied by (round_h(n) in the Llama form).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Rows of at most this many (power-of-two padded) elements are kept in registers in one
# block; longer rows are processed in LOOP_BLOCK-sized chunks. Module attributes so that
# tests can shrink them to exercise the looping kernels on small inputs.
MAX_FUSED_BLOCK = 16384
LOOP_BLOCK = 4096


# --------------------------------------------------------------------------- kernels


@triton.jit
def _rne_bits(x):
    # fp32 -> the fp32 bit pattern of the nearest bf16 value (ties to even); NaN stays NaN.
    bits = x.to(tl.int32, bitcast=True)
    bits = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16)
    return tl.where(x != x, x.to(tl.int32, bitcast=True), bits)


@triton.jit
def _rne(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to the nearest ``DTYPE`` value (ties to even), returned as fp32.

    bf16 is rounded by hand: Triton's interpreter truncates fp32 -> bf16 casts (GPUs
    round to nearest even), so this gives the GPU's result on both."""
    if DTYPE == tl.bfloat16:
        return _rne_bits(x).to(tl.float32, bitcast=True)
    elif DTYPE == tl.float32:
        return x
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _cast(x, DTYPE: tl.constexpr):
    """fp32 ``x`` -> ``DTYPE``, rounding to nearest even (see ``_rne``)."""
    if DTYPE == tl.bfloat16:
        return (_rne_bits(x) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _effective_weight(W, cols, mask, offset, CAST_BEFORE_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    if HAS_WEIGHT:
        offset = tl.cast(offset, tl.float32)  # Inductor's launches pass Python floats as fp64
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if CAST_BEFORE_SCALE:
            # eager: ``weight + offset`` happens in the weight's dtype
            w = _rne(w + offset, W.dtype.element_ty)
        else:
            # eager: ``offset + weight.float()``
            w = w + offset
    else:
        # no weight: a product with 1.0 is exact, and rounding n twice to one dtype is
        # rounding it once
        w = 1.0
    return w


@triton.jit
def _load_h(X, R, x_row, r_row, cols, mask, HAS_RESIDUAL: tl.constexpr, H_DTYPE: tl.constexpr):
    h = tl.load(X + x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + r_row + cols, mask=mask, other=0.0).to(tl.float32)
        h = _rne(h + r, H_DTYPE)
    return h


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    R,
    W,
    Y,
    H,
    RSTD,
    stride_x,
    stride_r,
    N,
    eps,
    offset,
    HAS_RESIDUAL: tl.constexpr,
    CAST_BEFORE_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
):
    # One program per row. Y and H are contiguous [M, N].
    row = tl.program_id(0).to(tl.int64)
    x_row = row * stride_x
    r_row = row * stride_r
    o_row = row * N
    H_DTYPE: tl.constexpr = H.dtype.element_ty
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        h = _load_h(X, R, x_row, r_row, cols, mask, HAS_RESIDUAL, H_DTYPE)
        if HAS_RESIDUAL:
            tl.store(H + o_row + cols, _cast(h, H_DTYPE), mask=mask)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + tl.cast(eps, tl.float32))
        tl.store(RSTD + row, rstd)
        w = _effective_weight(W, cols, mask, offset, CAST_BEFORE_SCALE, HAS_WEIGHT)
        n = h * rstd
        if CAST_BEFORE_SCALE:
            n = _rne(n, H_DTYPE)
        tl.store(Y + o_row + cols, _cast(n * w, Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            h = _load_h(X, R, x_row, r_row, cols, mask, HAS_RESIDUAL, H_DTYPE)
            if HAS_RESIDUAL:
                tl.store(H + o_row + cols, _cast(h, H_DTYPE), mask=mask)
            acc += h * h
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + tl.cast(eps, tl.float32))
        tl.store(RSTD + row, rstd)
        # Second pass recomputes h from the inputs (never reads back this program's own
        # stores, which would need a barrier).
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            h = _load_h(X, R, x_row, r_row, cols, mask, HAS_RESIDUAL, H_DTYPE)
            w = _effective_weight(W, cols, mask, offset, CAST_BEFORE_SCALE, HAS_WEIGHT)
            n = h * rstd
            if CAST_BEFORE_SCALE:
                n = _rne(n, H_DTYPE)
            tl.store(Y + o_row + cols, _cast(n * w, Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_rowdot_kernel(
    DY,
    H,
    W,
    RSTD,
    C,
    stride_dy,
    stride_h,
    N,
    offset,
    CAST_BEFORE_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Long rows only: C[row] = mean(dn * n) with dn = dy * w', n = h * rstd.
    row = tl.program_id(0).to(tl.int64)
    rstd = tl.load(RSTD + row)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        w = _effective_weight(W, cols, mask, offset, CAST_BEFORE_SCALE, HAS_WEIGHT)
        acc += (dy * w) * (h * rstd)
    tl.store(C + row, tl.sum(acc, axis=0) / N)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    H,
    W,
    RSTD,
    DH_EXTRA,
    C,
    DH,
    DW_PARTIAL,
    stride_dy,
    stride_h,
    stride_dhe,
    M,
    N,
    offset,
    HAS_DH_EXTRA: tl.constexpr,
    CAST_BEFORE_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE_C: tl.constexpr,
):
    # Grid (P, column blocks). Program (p, b) handles rows p, p + P, ... in column block b
    # and writes its partial dweight sums to DW_PARTIAL[p, block b] (fp32).
    # COMPUTE_C: the block covers the whole row, so mean(dn * n) is computed here;
    # otherwise it was precomputed into C by _rms_norm_bwd_rowdot_kernel.
    pid = tl.program_id(0)
    num_p = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    H_DTYPE: tl.constexpr = H.dtype.element_ty
    w = _effective_weight(W, cols, mask, offset, CAST_BEFORE_SCALE, HAS_WEIGHT)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r in range(pid, M, num_p):
        row = tl.cast(r, tl.int64)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        n = h * rstd
        dn = dy * w
        if COMPUTE_C:
            c = tl.sum(dn * n, axis=0) / N
        else:
            c = tl.load(C + row)
        dh = rstd * (dn - n * c)
        if HAS_DH_EXTRA:
            dh += tl.load(DH_EXTRA + row * stride_dhe + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DH + row * N + cols, _cast(dh, H_DTYPE), mask=mask)
        if HAS_WEIGHT:
            if CAST_BEFORE_SCALE:
                n = _rne(n, H_DTYPE)
            dw += dy * n
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=mask)


# --------------------------------------------------------------------------- helpers


def _interpreted() -> bool:
    return type(_rms_norm_fwd_kernel).__name__ == "InterpretedFunction"


def _launch(kernel, grid, *args, **meta) -> None:
    """Launch ``kernel`` on ``grid``. While hubcompile traces this module into Inductor's
    graph (a proxy mode is active), through ``torch.library.wrap_triton``: Inductor then
    launches the kernel from its own generated code, without this module's Python on
    every call. Inductor compiles user kernels with fp fusion on (its default), so there
    an fp32 multiply-add may round once instead of twice."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if get_proxy_mode() is not None:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta, enable_fp_fusion=False)


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None and t.device.type == "cpu" and not _interpreted():
            raise RuntimeError(
                "hubcompile-rmsnorm (torch-cuda variant): Triton kernels need GPU tensors, got a "
                "CPU tensor; use the torch-cpu variant, or set TRITON_INTERPRET=1 before this "
                "module is imported to run the kernels in Triton's interpreter"
            )


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A [M, N] view of ``t`` whose last dim is contiguous and whose rows are one stride
    apart; copies only when no such view exists."""
    n = t.shape[-1]
    if n > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, n)
    except RuntimeError:
        return t.contiguous().view(-1, n)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_row_programs(device: torch.device, m: int) -> int:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        target = 4 * _sm_count(idx)
    else:  # interpreter: a few programs, each looping over several rows
        target = 4
    return max(1, min(m, target))


def _num_warps(block: int) -> int:
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    if block >= 512:
        return 4
    return 2 if block >= 128 else 1


def _blocks(n: int) -> tuple[int, bool]:
    block = triton.next_power_of_2(max(n, 1))
    if block <= MAX_FUSED_BLOCK:
        return block, True
    return min(LOOP_BLOCK, block), False


# --------------------------------------------------------------------------- API


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    weight_offset: float,
    cast_before_scale: bool,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, rstd, h): h = x + residual (or x itself when residual is None),
    rstd = rsqrt(mean(h.float()**2, -1) + eps) in fp32 of shape h.shape[:-1], y = norm(h)."""
    _check_device(x, weight, residual)
    if residual is not None:
        shape = torch.broadcast_shapes(x.shape, residual.shape)
        h_dtype = torch.promote_types(x.dtype, residual.dtype)
        x_in, r_in = x.expand(shape), residual.expand(shape)
    else:
        shape, h_dtype, x_in, r_in = x.shape, x.dtype, x, None
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != shape[-1]):
        raise ValueError(f"weight must have shape [{shape[-1]}], got {list(weight.shape)}")
    out_dtype = torch.promote_types(h_dtype, weight.dtype) if cast_before_scale and weight is not None else h_dtype
    n = shape[-1]
    y = torch.empty(shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(shape[:-1], dtype=torch.float32, device=x.device)
    h = torch.empty(shape, dtype=h_dtype, device=x.device) if r_in is not None else x
    m = rstd.numel()
    if m == 0 or n == 0:
        if n == 0:
            rstd.fill_(float("nan"))  # like eager: the mean of an empty row is nan
        if r_in is not None:
            h.copy_(x_in + r_in)
        return y, rstd, h
    x2 = _as_rows(x_in)
    r2 = _as_rows(r_in) if r_in is not None else x2
    block, single = _blocks(n)
    _launch(_rms_norm_fwd_kernel, (m,),
        x2,
        r2,
        x2 if weight is None else weight.contiguous(),  # not read without a weight
        y,
        h,
        rstd,
        x2.stride(0),
        r2.stride(0),
        n,
        float(eps),
        float(weight_offset),
        HAS_RESIDUAL=r_in is not None,
        CAST_BEFORE_SCALE=bool(cast_before_scale),
        HAS_WEIGHT=weight is not None,
        BLOCK_N=block,
        SINGLE_BLOCK=single,
        num_warps=_num_warps(block),
    )
    return y, rstd, h


def rms_norm_backward(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    weight_offset: float,
    cast_before_scale: bool,
    dh_extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dh, dweight): dh in h.dtype (plus dh_extra when given), dweight in
    weight.dtype (fp32 accumulation, two-stage reduction), None without a weight."""
    _check_device(dy, h, weight, rstd, dh_extra)
    shape = h.shape
    n = shape[-1]
    if dy.shape != shape:
        raise ValueError(f"dy has shape {list(dy.shape)}, expected {list(shape)}")
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != n):
        raise ValueError(f"weight must have shape [{n}], got {list(weight.shape)}")
    dh = torch.empty(shape, dtype=h.dtype, device=h.device)
    m = dh.numel() // n if n else 0
    if m == 0 or n == 0:
        if dh_extra is not None:
            dh.copy_(dh_extra.expand(shape))
        return dh, None if weight is None else torch.zeros_like(weight, memory_format=torch.contiguous_format)
    rstd1 = rstd.reshape(-1)
    if rstd1.numel() != m:
        raise ValueError(f"rstd has {rstd1.numel()} elements, expected {m}")
    rstd1 = rstd1.to(torch.float32).contiguous()
    dy2 = _as_rows(dy)
    h2 = _as_rows(h)
    dhe2 = _as_rows(dh_extra.expand(shape)) if dh_extra is not None else dy2
    has_weight = weight is not None
    w = weight.contiguous() if has_weight else dy2  # not read without a weight
    block, single = _blocks(n)
    if single:
        c = rstd1  # unused
    else:
        c = torch.empty(m, dtype=torch.float32, device=h.device)
        _launch(_rms_norm_bwd_rowdot_kernel, (m,),
            dy2,
            h2,
            w,
            rstd1,
            c,
            dy2.stride(0),
            h2.stride(0),
            n,
            float(weight_offset),
            CAST_BEFORE_SCALE=bool(cast_before_scale),
            HAS_WEIGHT=has_weight,
            BLOCK_N=block,
            num_warps=_num_warps(block),
        )
    p = _num_row_programs(h.device, m)
    # per-program dweight sums; without a weight nothing is written there
    partial = torch.empty((p, n) if has_weight else (0,), dtype=torch.float32, device=h.device)
    _launch(_rms_norm_bwd_kernel, (p, triton.cdiv(n, block)),
        dy2,
        h2,
        w,
        rstd1,
        dhe2,
        c,
        dh,
        partial,
        dy2.stride(0),
        h2.stride(0),
        dhe2.stride(0),
        m,
        n,
        float(weight_offset),
        HAS_DH_EXTRA=dh_extra is not None,
        CAST_BEFORE_SCALE=bool(cast_before_scale),
        HAS_WEIGHT=has_weight,
        BLOCK_N=block,
        COMPUTE_C=single,
        num_warps=_num_warps(block),
    )
    if not has_weight:
        return dh, None
    return dh, partial.sum(0).to(weight.dtype)
