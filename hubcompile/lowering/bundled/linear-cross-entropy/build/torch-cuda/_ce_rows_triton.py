"""The per-chunk core of the fused linear cross-entropy, in Triton.

The caller computes x = h_chunk @ W^T chunk by chunk, so the [tokens, vocab] logits
never exist in fp32; this kernel reads one chunk of logits in the model's dtype and, in
fp32 registers, takes each row's log-sum-exp (an online max and rescaled sum over
blocks), its loss, and, optionally, the gradient of the logits, written back in the
model's dtype (over x itself, if asked): two reads and one write of the chunk.

    z = softcap(scale * x),  softcap(u) = cap * tanh(u / cap) when cap > 0
    loss[r] = lse(z[r]) - z[r, target[r]]             (0 where target[r] == ignore_index)
    grad[r] = ((softmax(z[r]) - onehot(target[r])) * grad_scale + tangent[r])
              * (1 - (z[r] / cap)^2) * scale           (the loss part 0 on ignored rows)
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _transform(x, scale, softcap, HAS_SCALE: tl.constexpr, HAS_CAP: tl.constexpr, TRANSFORMED: tl.constexpr):
    z = x.to(tl.float32)
    if TRANSFORMED:  # x already holds softcap(scale * logits)
        return z
    if HAS_SCALE:
        z = z * scale
    if HAS_CAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)  # cap * tanh(z / cap)
    return z


@triton.jit
def _ce_rows_kernel(x_ptr, x_stride, t_ptr, loss_ptr, lse_ptr, gscale_ptr, tan_ptr, tan_stride, g_ptr, g_stride,
                    V, ignore_index, scale, softcap, HAS_SCALE: tl.constexpr, HAS_CAP: tl.constexpr,
                    WRITE_GRAD: tl.constexpr, HAS_TANGENT: tl.constexpr, TRANSFORMED: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    target = tl.load(t_ptr + row)
    ignored = target == ignore_index
    # Pass 1: per-lane running max and rescaled sum of exp; lanes that have seen nothing
    # stay at -inf / 0 (never exp(-inf - -inf)).
    m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        z = _transform(tl.load(x_row + offs, mask=mask, other=0.0), scale, softcap, HAS_SCALE, HAS_CAP, TRANSFORMED)
        z = tl.where(mask, z, float("-inf"))
        new_m = tl.maximum(m_vec, z)
        seen = new_m > float("-inf")
        s_vec = tl.where(seen, s_vec * tl.exp(m_vec - new_m) + tl.exp(z - new_m), 0.0)
        m_vec = new_m
    m = tl.max(m_vec, axis=0)
    lse = m + tl.log(tl.sum(tl.where(m_vec > float("-inf"), s_vec * tl.exp(m_vec - m), 0.0), axis=0))
    safe_target = tl.where(ignored, 0, target)
    z_t = _transform(tl.load(x_row + safe_target), scale, softcap, HAS_SCALE, HAS_CAP, TRANSFORMED)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - z_t))
    tl.store(lse_ptr + row, lse)
    if WRITE_GRAD:
        # Pass 2: every block of the row is read before it is written, so g may be x.
        gs = tl.load(gscale_ptr).to(tl.float32)
        gs = tl.where(ignored, 0.0, gs)
        g_row = g_ptr + row * g_stride
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            z = _transform(tl.load(x_row + offs, mask=mask, other=0.0), scale, softcap, HAS_SCALE, HAS_CAP, TRANSFORMED)
            g = (tl.exp(z - lse) - tl.where(offs == safe_target, 1.0, 0.0)) * gs
            if HAS_TANGENT:
                g += tl.load(tan_ptr + row * tan_stride + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_CAP:
                u = z / softcap
                g = g * (1.0 - u * u)
            if HAS_SCALE:
                g = g * scale
            tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


def _check_rows(name, t, x):
    if t.dim() != 2 or t.shape != x.shape or t.stride(1) != 1:
        raise ValueError(f"{name} must be a [c, V] tensor like x {tuple(x.shape)} with unit last-dim stride; got "
                         f"shape {tuple(t.shape)}, strides {t.stride()}")


def cross_entropy_rows(x, target, ignore_index: int, scale: float, softcap: float, grad_scale=None, tangent=None,
                       grad_out=None, transformed: bool = False, block: int | None = None):
    """(loss of each row, log-sum-exp of each row), fp32 [c]. With ``grad_out`` ([c, V], may
    be ``x`` itself) the gradient of the logits before scale and soft-cap is written
    there; ``grad_scale`` (a 0-d fp32 tensor, read on the device) multiplies the loss part
    of it. ``transformed``: x already holds the scaled, soft-capped logits (only the
    gradient's chain rule uses scale and softcap then). ``block`` overrides the block
    width (tests)."""
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be [c, V] fp32/bf16/fp16 with unit last-dim stride; got {tuple(x.shape)} "
                         f"{x.dtype}, strides {x.stride()}")
    if target.shape != x.shape[:1] or target.dtype != torch.int64:
        raise ValueError(f"target must be int64 [{x.shape[0]}]; got {target.dtype} {tuple(target.shape)}")
    if grad_out is not None:
        _check_rows("grad_out", grad_out, x)
        if grad_scale is None:
            raise ValueError("grad_scale is required with grad_out (the loss's gradient factor, a 0-d tensor)")
    if tangent is not None:
        _check_rows("tangent", tangent, x)
    c, vocab = x.shape
    loss = torch.empty(c, dtype=torch.float32, device=x.device)
    lse = torch.empty(c, dtype=torch.float32, device=x.device)
    if c == 0:
        return loss, lse
    target = target.contiguous()
    # Wide blocks, 16 elements per thread: a 128k-word row is 16 blocks of 8192.
    block = block or min(triton.next_power_of_2(vocab), 8192)
    dummy = loss  # stands in for pointers a constexpr flag leaves unused
    gs = grad_scale.to(device=x.device, dtype=torch.float32).reshape(1) if grad_scale is not None else dummy
    _ce_rows_kernel[(c,)](
        x, x.stride(0), target, loss, lse, gs,
        tangent if tangent is not None else dummy, tangent.stride(0) if tangent is not None else 0,
        grad_out if grad_out is not None else dummy, grad_out.stride(0) if grad_out is not None else 0,
        vocab, ignore_index, float(scale), float(softcap),
        HAS_SCALE=scale != 1.0, HAS_CAP=softcap > 0, WRITE_GRAD=grad_out is not None,
        HAS_TANGENT=tangent is not None, TRANSFORMED=transformed, BLOCK=block,
        num_warps=max(1, min(16, block // 512)))
    return loss, lse
