"""Row-wise cross-entropy over one chunk of logits, in Triton: loss, log-sum-exp, gradient.

This is the per-chunk core of a chunked fused linear + cross-entropy. The caller computes
the logits ``x = h_chunk @ W^T`` one chunk of tokens at a time, in the model's dtype, and
hands each chunk here; so the full [tokens, vocab] logits never exist at once, and never
in fp32. Everything beyond the chunk's own storage happens in fp32 registers.

For each row r of ``x`` ([c, V]), with one Triton program per row::

    z        = softcap * tanh(scale * x[r] / softcap)   (or scale * x[r] when softcap == 0)
    lse[r]   = logsumexp(z)                              (online max, rescaled sum of exp)
    loss[r]  = lse[r] - z[target[r]]                     (0 where target[r] == ignore_index)

and, when ``grad_out`` is given, the gradient of ``sum(loss * grad_scale) + sum(z * tangent)``
with respect to ``x[r]``::

    g  = (softmax(z) - onehot(target[r])) * grad_scale   (0 on ignored rows)
    g += tangent[r]                                       (when given)
    g *= 1 - (z / softcap)**2                             (when softcap > 0)
    g *= scale

written in ``grad_out``'s dtype. The row is read once for the log-sum-exp and the target
logit, and once more (block by block, each block read before it is written) for the
gradient, so ``grad_out`` may be ``x`` itself: the gradient then replaces the logits, and
the chunk needs no second buffer.
"""

import torch
import triton
import triton.language as tl

# Widest block a row is processed in; longer rows loop over blocks of this width.
MAX_BLOCK_V = 8192
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TANGENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def _tanh(u):
    """fp32 tanh from plain tl ops, within about 2 ulp: its odd Taylor polynomial (to u^15)
    below |u| = 0.55, where 1 - exp(-2|u|) would cancel; above, sign(u) * (1 - e) / (1 + e)
    with e = exp(-2|u|) <= 1, which never overflows."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    u2 = u * u
    p = -0.0014558343870513183  # -929569 / 638512875
    p = p * u2 + 0.0035921280365724811  # 21844 / 6081075
    p = p * u2 - 0.0088632355299021973  # -1382 / 155925
    p = p * u2 + 0.021869488536155203  # 62 / 2835
    p = p * u2 - 0.053968253968253971  # -17 / 315
    p = p * u2 + 0.13333333333333333  # 2 / 15
    p = p * u2 - 0.33333333333333331  # -1 / 3
    small = a + a * u2 * p
    t = tl.where(a < 0.55, small, big)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def _transform(x, scale, softcap, inv_softcap, HAS_SCALE: tl.constexpr, HAS_CAP: tl.constexpr):
    """fp32 ``(z, t)``: ``z = softcap * t``, ``t = tanh(scale * x / softcap)`` (t is z when
    there is no cap, and only the cap's derivative 1 - t^2 uses it). The parts a flag turns
    off cost nothing."""
    z = x.to(tl.float32)
    if HAS_SCALE:
        z = z * scale
    t = z
    if HAS_CAP:
        t = _tanh(z * inv_softcap)
        z = softcap * t
    return z, t


@triton.jit
def _round_to_bf16(g):
    """fp32 -> bf16, rounding to nearest even, by hand. Only for Triton's interpreter, whose
    fp32 -> bf16 cast truncates; compiled code keeps the hardware's (already RTNE) cast."""
    bits = g.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(g != g, g.to(tl.bfloat16), out)  # nan stays nan


@triton.jit
def _ce_rows_kernel(
    x_ptr, x_stride,
    target_ptr, target_stride,
    loss_ptr, lse_ptr,
    grad_scale_ptr,
    tangent_ptr, tangent_stride,
    grad_ptr, grad_stride,
    V, ignore_index,
    scale, softcap, inv_softcap,
    HAS_SCALE: tl.constexpr, HAS_CAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr, HAS_TANGENT: tl.constexpr,
    BLOCK_V: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    cols = tl.arange(0, BLOCK_V)

    target = tl.load(target_ptr + row * target_stride)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < V)
    safe_target = tl.where(in_range, target, 0)

    # Pass 1: running max m and sum of exp(z - m), rescaled whenever m grows. m_ref stands
    # in for m while m is still -inf (a row of -inf so far), so that no exp(-inf - -inf).
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        xv = tl.load(x_row + offs, mask=mask, other=0.0)
        z, _ = _transform(xv, scale, softcap, inv_softcap, HAS_SCALE, HAS_CAP)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref), axis=0)
        m = m_new
    lse = m + tl.log(s)  # -inf for a row of -inf (s == 0)

    x_t = tl.load(x_row + safe_target)
    z_t, _ = _transform(x_t, scale, softcap, inv_softcap, HAS_SCALE, HAS_CAP)
    loss = tl.where(in_range, lse - z_t, float("nan"))  # a target outside [0, V): nan
    loss = tl.where(ignored, 0.0, loss)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)

    if WRITE_GRAD:
        # Pass 2: each block is read in full before it is written, so grad may alias x.
        gs = tl.load(grad_scale_ptr).to(tl.float32)
        gs = tl.where(in_range, gs, float("nan"))
        grad_row = grad_ptr + row * grad_stride
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            xv = tl.load(x_row + offs, mask=mask, other=0.0)
            z, t = _transform(xv, scale, softcap, inv_softcap, HAS_SCALE, HAS_CAP)
            g = tl.exp(z - lse) - tl.where(offs == safe_target, 1.0, 0.0)
            g = tl.where(ignored, 0.0, g * gs)
            if HAS_TANGENT:
                tv = tl.load(tangent_ptr + row * tangent_stride + offs, mask=mask, other=0.0)
                g = g + tv.to(tl.float32)
            if HAS_CAP:
                g = g * (1.0 - t * t)
            if HAS_SCALE:
                g = g * scale
            if ROUND_BF16:
                g_out = _round_to_bf16(g)
            else:
                g_out = g.to(grad_ptr.dtype.element_ty)
            tl.store(grad_row + offs, g_out, mask=mask)


# ------------------------------------------------------------------------------ host side


def _interpreted() -> bool:
    """Whether Triton runs this module's kernels in its interpreter (TRITON_INTERPRET=1)."""
    return type(_ce_rows_kernel).__name__ == "InterpretedFunction"


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, strides {t.stride()}, device {t.device}"


def _byte_span(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage pointer, first byte, one past the last byte) of a non-empty 2-d tensor."""
    first = t.data_ptr()
    last = first + ((t.shape[0] - 1) * t.stride(0) + (t.shape[1] - 1) * t.stride(1) + 1) * t.element_size()
    return t.untyped_storage().data_ptr(), first, last


def _check_no_partial_overlap(name: str, out: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    """``out`` is written: it may be ``other`` exactly (same start and strides), or apart."""
    base_o, lo_o, hi_o = _byte_span(out)
    base_t, lo_t, hi_t = _byte_span(other)
    if base_o != base_t or hi_o <= lo_t or hi_t <= lo_o:
        return
    same = lo_o == lo_t and out.stride() == other.stride() and out.element_size() == other.element_size()
    if not same:
        raise ValueError(
            f"{name} overlaps {other_name} without being the same view of it: {name} may be "
            f"{other_name} itself (same start and strides) or separate memory; got {name} "
            f"{_describe(out)} at {lo_o:#x}, {other_name} {_describe(other)} at {lo_t:#x}"
        )


def _check_rows_like(name: str, t: torch.Tensor, x: torch.Tensor, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {tuple(x.shape)}; got {type(t).__name__}")
    if t.dim() != 2 or t.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {tuple(x.shape)}; got {_describe(t)}")
    if t.dtype not in dtypes:
        valid = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} dtype must be one of {valid}; got {t.dtype}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have last-dim stride 1 (rows may be strided); got {_describe(t)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}; got {t.device}")


def _default_block(V: int) -> int:
    return min(triton.next_power_of_2(V), MAX_BLOCK_V)


def _num_warps(block: int) -> int:
    # About 8 to 16 elements per thread for large blocks (16-byte loads of bf16), 1 warp for tiny rows.
    return max(1, min(16, block // 256))


def cross_entropy_rows(
    x: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    scale: float,
    softcap: float,
    grad_scale: torch.Tensor | None = None,
    tangent: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of the logits ``x`` against ``target``: ``(loss_rows, lse)``.

    x: [c, V] fp32/bf16/fp16 logits, last-dim stride 1 (the row stride is free).
    target: [c] int64 class indices in [0, V), or ``ignore_index`` (loss 0, gradient 0
        from the loss). A target outside [0, V) that is not ``ignore_index`` gives a nan
        loss (and a nan gradient row): the kernel cannot raise without a device sync.
    scale, softcap: logits transform ``z = softcap * tanh(scale * x / softcap)``;
        ``softcap == 0`` means no cap, ``scale == 1`` no scaling.
    grad_scale: 1-element floating tensor on x's device (read on the device, no sync),
        the factor on the loss rows' gradient; required with ``grad_out``.
    tangent: optional [c, V] float tensor added to the gradient with respect to z (the
        gradient of some other use of the transformed logits), last-dim stride 1.
    grad_out: optional [c, V] tensor of x's dtype, last-dim stride 1, disjoint rows; it
        receives d/dx of ``sum(loss_rows * grad_scale) + sum(z * tangent)``. It may be
        ``x`` itself (the gradient is written over the logits), but not a different view
        overlapping x or tangent.
    block_v: block width override (a power of two), for tests and tuning.

    Returns ``loss_rows`` and ``lse``, new fp32 [c] tensors (``lse`` is computed for
    ignored rows too).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-d [c, V]; got {_describe(x)}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x dtype must be one of torch.float32, torch.bfloat16, torch.float16; got {x.dtype}")
    c, V = x.shape
    if V < 1:
        raise ValueError(f"x must have at least one column (V >= 1); got {_describe(x)}")
    if V > 1 and x.stride(1) != 1:
        raise ValueError(f"x must have last-dim stride 1 (rows may be strided); got {_describe(x)}")
    if x.device.type == "cpu" and not _interpreted():
        raise ValueError(
            "x is a CPU tensor: the Triton kernel needs GPU tensors, or TRITON_INTERPRET=1 set "
            "before this module is imported to run it in Triton's interpreter"
        )
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a torch.Tensor of shape ({c},); got {type(target).__name__}")
    if target.dim() != 1 or target.shape[0] != c:
        raise ValueError(f"target must have shape ({c},) (one index per row of x); got {_describe(target)}")
    if target.dtype != torch.int64:
        raise ValueError(f"target dtype must be torch.int64; got {target.dtype}")
    if target.device != x.device:
        raise ValueError(f"target must be on x's device {x.device}; got {target.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int; got {ignore_index!r}")
    scale, softcap = float(scale), float(softcap)
    if not (scale == scale and abs(scale) != float("inf")):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    if not (softcap >= 0.0 and softcap != float("inf")):
        raise ValueError(f"softcap must be 0 (no cap) or a finite positive number; got {softcap!r}")
    if grad_out is not None:
        _check_rows_like("grad_out", grad_out, x, (x.dtype,))
        if c > 1 and grad_out.stride(0) < V:
            raise ValueError(f"grad_out rows must not overlap (row stride >= V = {V}); got {_describe(grad_out)}")
        if grad_scale is None:
            raise ValueError(
                "grad_scale is required when grad_out is given: a 1-element floating tensor on "
                "x's device, the factor on the loss rows' gradient"
            )
    if grad_scale is not None:
        if not isinstance(grad_scale, torch.Tensor):
            raise ValueError(
                f"grad_scale must be a 1-element floating torch.Tensor on x's device; got {type(grad_scale).__name__}"
            )
        if grad_scale.numel() != 1 or not grad_scale.is_floating_point():
            raise ValueError(f"grad_scale must be a 1-element floating tensor (0-d fp32); got {_describe(grad_scale)}")
        if grad_scale.device != x.device:
            raise ValueError(f"grad_scale must be on x's device {x.device}; got {grad_scale.device}")
    if tangent is not None:
        _check_rows_like("tangent", tangent, x, _TANGENT_DTYPES)
    if block_v is None:
        block_v = _default_block(V)
    elif isinstance(block_v, bool) or not isinstance(block_v, int) or block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a positive power of two; got {block_v!r}")

    loss = torch.empty(c, dtype=torch.float32, device=x.device)
    lse = torch.empty(c, dtype=torch.float32, device=x.device)
    if c == 0:
        return loss, lse
    if grad_out is not None:
        _check_no_partial_overlap("grad_out", grad_out, "x", x)
        if tangent is not None:
            _check_no_partial_overlap("grad_out", grad_out, "tangent", tangent)

    write_grad = grad_out is not None
    gs = grad_scale.detach().reshape(1).to(torch.float32) if write_grad else loss  # loss: unused stand-in
    tan = tangent if (write_grad and tangent is not None) else loss
    grad = grad_out if write_grad else x
    has_cap = softcap > 0.0
    _ce_rows_kernel[(c,)](
        x, x.stride(0),
        target, target.stride(0),
        loss, lse,
        gs,
        tan, tan.stride(0),
        grad, grad.stride(0),
        V, ignore_index,
        scale, softcap, (1.0 / softcap) if has_cap else 0.0,
        HAS_SCALE=scale != 1.0, HAS_CAP=has_cap,
        WRITE_GRAD=write_grad, HAS_TANGENT=write_grad and tangent is not None,
        BLOCK_V=block_v, ROUND_BF16=write_grad and grad_out.dtype == torch.bfloat16 and _interpreted(),
        num_warps=_num_warps(block_v),
    )
    return loss, lse
