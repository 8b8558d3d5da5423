"""Triton LayerNorm over the last dim, with an optional fused residual add.

  h    = x + residual, rounded to h's dtype (eager ``x + residual``)
  mean = mean(h), rstd = rsqrt(mean((h - mean)^2) + eps)      (fp32, two passes)
  y    = (h - mean) * rstd * w + b in fp32, rounded once to h's dtype
Backward, with xhat = (h - mean) * rstd and g = dy * w:
  dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dh_extra)
  dw = sum over rows of dy * xhat, db = sum over rows of dy (fp32, two-stage)
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
    """fp32 ``x`` rounded to the nearest ``DTYPE`` value, returned as fp32. bf16 is
    rounded by hand: Triton's interpreter truncates fp32 -> bf16 casts (GPUs round to
    nearest even), so this gives the GPU's result on both."""
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
def _load_h(X, R, x_row, r_row, cols, mask, HAS_RESIDUAL: tl.constexpr, H_DTYPE: tl.constexpr):
    h = tl.load(X + x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + r_row + cols, mask=mask, other=0.0).to(tl.float32)
        h = _rne(h + r, H_DTYPE)
    return h


@triton.jit
def _affine(n, W, B, cols, mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_WEIGHT:
        n = n * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        n = n + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return n


@triton.jit
def _layer_norm_fwd_kernel(
    X,
    R,
    W,
    B,
    Y,
    H,
    MEAN,
    RSTD,
    stride_x,
    stride_r,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
):
    # One program per row. Y and H are contiguous [M, N].
    row = tl.program_id(0).to(tl.int64)
    x_row = row * stride_x
    r_row = row * stride_r
    o_row = row * N
    H_DTYPE: tl.constexpr = H.dtype.element_ty
    eps = tl.cast(eps, tl.float32)  # Inductor's launches pass Python floats as fp64
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        h = _load_h(X, R, x_row, r_row, cols, mask, HAS_RESIDUAL, H_DTYPE)
        if HAS_RESIDUAL:
            tl.store(H + o_row + cols, _cast(h, H_DTYPE), mask=mask)
        mean = tl.sum(h, axis=0) / N
        d = tl.where(mask, h - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=0) / N + eps)
        y = _affine(d * rstd, W, B, cols, mask, HAS_WEIGHT, HAS_BIAS)
        tl.store(Y + o_row + cols, _cast(y, Y.dtype.element_ty), mask=mask)
    else:
        # Three passes over the row (sum, squared deviations, output): each recomputes h
        # from the inputs and never reads back this program's own stores.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            h = _load_h(X, R, x_row, r_row, cols, mask, HAS_RESIDUAL, H_DTYPE)
            if HAS_RESIDUAL:
                tl.store(H + o_row + cols, _cast(h, H_DTYPE), mask=mask)
            acc += h
        mean = tl.sum(acc, axis=0) / N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            h = _load_h(X, R, x_row, r_row, cols, mask, HAS_RESIDUAL, H_DTYPE)
            d = tl.where(mask, h - mean, 0.0)
            acc += d * d
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            h = _load_h(X, R, x_row, r_row, cols, mask, HAS_RESIDUAL, H_DTYPE)
            y = _affine((h - mean) * rstd, W, B, cols, mask, HAS_WEIGHT, HAS_BIAS)
            tl.store(Y + o_row + cols, _cast(y, Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _load_g(DY, W, row_dy, cols, mask, HAS_WEIGHT: tl.constexpr):
    dy = tl.load(DY + row_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = dy
    if HAS_WEIGHT:
        g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    return dy, g


@triton.jit
def _layer_norm_bwd_rowdot_kernel(
    DY,
    H,
    W,
    MEAN,
    RSTD,
    C1,
    C2,
    stride_dy,
    stride_h,
    N,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Long rows only: C1[row] = mean(g), C2[row] = mean(g * xhat).
    row = tl.program_id(0).to(tl.int64)
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        _, g = _load_g(DY, W, row * stride_dy, cols, mask, HAS_WEIGHT)
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)
        acc1 += g
        acc2 += g * xhat
    tl.store(C1 + row, tl.sum(acc1, axis=0) / N)
    tl.store(C2 + row, tl.sum(acc2, axis=0) / N)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,
    H,
    W,
    MEAN,
    RSTD,
    DH_EXTRA,
    C1,
    C2,
    DH,
    DW_PARTIAL,
    DB_PARTIAL,
    stride_dy,
    stride_h,
    stride_dhe,
    M,
    N,
    HAS_WEIGHT: tl.constexpr,
    HAS_DH_EXTRA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE_C: tl.constexpr,
):
    # Grid (P, column blocks). Program (p, b) handles rows p, p + P, ... in column block b
    # and writes its partial dweight / dbias sums to DW_PARTIAL / DB_PARTIAL[p, block b].
    # COMPUTE_C: the block covers the whole row, so the row means are computed here;
    # otherwise _layer_norm_bwd_rowdot_kernel precomputed them into C1, C2.
    pid = tl.program_id(0)
    num_p = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    H_DTYPE: tl.constexpr = H.dtype.element_ty
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r in range(pid, M, num_p):
        row = tl.cast(r, tl.int64)
        dy, g = _load_g(DY, W, row * stride_dy, cols, mask, HAS_WEIGHT)
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)
        if COMPUTE_C:
            c1 = tl.sum(g, axis=0) / N
            c2 = tl.sum(g * xhat, axis=0) / N
        else:
            c1 = tl.load(C1 + row)
            c2 = tl.load(C2 + row)
        dh = rstd * (g - c1 - xhat * c2)
        if HAS_DH_EXTRA:
            dh += tl.load(DH_EXTRA + row * stride_dhe + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DH + row * N + cols, _cast(dh, H_DTYPE), mask=mask)
        dw += dy * xhat
        db += dy
    tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=mask)
    tl.store(DB_PARTIAL + pid.to(tl.int64) * N + cols, db, mask=mask)


# --------------------------------------------------------------------------- helpers


def _interpreted() -> bool:
    return type(_layer_norm_fwd_kernel).__name__ == "InterpretedFunction"


def _launch(kernel, grid, *args, **meta) -> None:
    """Launch ``kernel`` on ``grid``. While hubcompile traces this module into Inductor's
    graph (a proxy mode is active), through ``torch.library.wrap_triton``: Inductor then
    launches the kernel from its own generated code."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if get_proxy_mode() is not None:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta, enable_fp_fusion=False)


def _check_device(*tensors) -> None:
    for t in tensors:
        if t is not None and t.device.type == "cpu" and not _interpreted():
            raise RuntimeError(
                "hubcompile-layer-norm (torch-cuda variant): Triton kernels need GPU tensors, got a "
                "CPU tensor; use the torch-cpu variant, or set TRITON_INTERPRET=1 before this "
                "module is imported to run the kernels in Triton's interpreter"
            )


def _check_affine(t, n: int, what: str) -> None:
    if t is not None and (t.dim() != 1 or t.shape[0] != n):
        raise ValueError(f"{what} must have shape [{n}], got {list(t.shape)}")


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


def layer_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, mean, rstd, h): h = x + residual (or x itself when residual is None),
    mean and rstd in fp32 of shape h.shape[:-1], y = layer_norm(h) in h's dtype."""
    _check_device(x, weight, bias, residual)
    if residual is not None:
        shape = torch.broadcast_shapes(x.shape, residual.shape)
        h_dtype = torch.promote_types(x.dtype, residual.dtype)
        x_in, r_in = x.expand(shape), residual.expand(shape)
    else:
        shape, h_dtype, x_in, r_in = x.shape, x.dtype, x, None
    n = shape[-1]
    _check_affine(weight, n, "weight")
    _check_affine(bias, n, "bias")
    y = torch.empty(shape, dtype=h_dtype, device=x.device)
    mean = torch.empty(shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(shape[:-1], dtype=torch.float32, device=x.device)
    h = torch.empty(shape, dtype=h_dtype, device=x.device) if r_in is not None else x
    m = mean.numel()
    if m == 0 or n == 0:
        if n == 0:  # like eager: the statistics of an empty row are nan
            mean.fill_(float("nan"))
            rstd.fill_(float("nan"))
        if r_in is not None:
            h.copy_(x_in + r_in)
        return y, mean, rstd, h
    x2 = _as_rows(x_in)
    r2 = _as_rows(r_in) if r_in is not None else x2
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    block, single = _blocks(n)
    _launch(_layer_norm_fwd_kernel, (m,),
        x2, r2, w, b, y, h, mean, rstd,
        x2.stride(0), r2.stride(0), n, float(eps),
        HAS_RESIDUAL=r_in is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_N=block,
        SINGLE_BLOCK=single,
        num_warps=_num_warps(block),
    )
    return y, mean, rstd, h


def layer_norm_backward(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dh_extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Returns (dh, dweight, dbias): dh in h.dtype (plus dh_extra when given), dweight
    and dbias in their parameter's dtype (fp32 accumulation, two-stage reduction), None
    where absent."""
    _check_device(dy, h, weight, bias, mean, rstd, dh_extra)
    shape = h.shape
    n = shape[-1]
    if dy.shape != shape:
        raise ValueError(f"dy has shape {list(dy.shape)}, expected {list(shape)}")
    _check_affine(weight, n, "weight")
    _check_affine(bias, n, "bias")
    dh = torch.empty(shape, dtype=h.dtype, device=h.device)
    m = dh.numel() // n if n else 0

    def finish(dw32, db32):
        return (dh, dw32.to(weight.dtype) if weight is not None else None,
                db32.to(bias.dtype) if bias is not None else None)

    if m == 0 or n == 0:
        if dh_extra is not None:
            dh.copy_(dh_extra.expand(shape))
        zeros = torch.zeros(n, dtype=torch.float32, device=h.device)
        return finish(zeros, zeros)
    mean1 = mean.reshape(-1).to(torch.float32).contiguous()
    rstd1 = rstd.reshape(-1).to(torch.float32).contiguous()
    if rstd1.numel() != m or mean1.numel() != m:
        raise ValueError(f"mean and rstd must have {m} elements, got {mean1.numel()} and {rstd1.numel()}")
    dy2 = _as_rows(dy)
    h2 = _as_rows(h)
    dhe2 = _as_rows(dh_extra.expand(shape)) if dh_extra is not None else dy2
    w = weight.contiguous() if weight is not None else dy2
    block, single = _blocks(n)
    if single:
        c1 = c2 = rstd1  # unused
    else:
        c1 = torch.empty(m, dtype=torch.float32, device=h.device)
        c2 = torch.empty(m, dtype=torch.float32, device=h.device)
        _launch(_layer_norm_bwd_rowdot_kernel, (m,),
            dy2, h2, w, mean1, rstd1, c1, c2, dy2.stride(0), h2.stride(0), n,
            HAS_WEIGHT=weight is not None,
            BLOCK_N=block,
            num_warps=_num_warps(block),
        )
    p = _num_row_programs(h.device, m)
    dw_partial = torch.empty((p, n), dtype=torch.float32, device=h.device)
    db_partial = torch.empty((p, n), dtype=torch.float32, device=h.device)
    _launch(_layer_norm_bwd_kernel, (p, triton.cdiv(n, block)),
        dy2, h2, w, mean1, rstd1, dhe2, c1, c2, dh, dw_partial, db_partial,
        dy2.stride(0), h2.stride(0), dhe2.stride(0), m, n,
        HAS_WEIGHT=weight is not None,
        HAS_DH_EXTRA=dh_extra is not None,
        BLOCK_N=block,
        COMPUTE_C=single,
        num_warps=_num_warps(block),
    )
    return finish(dw_partial.sum(0), db_partial.sum(0))
