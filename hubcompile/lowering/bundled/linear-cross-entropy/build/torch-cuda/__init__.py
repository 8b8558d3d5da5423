"""hubcompile-linear-cross-entropy: the LM head and the cross-entropy loss in one pass
over chunks of tokens, so that the [tokens, vocab] logits never exist in fp32, and,
when the logits are not wanted, never exist at all.

Per chunk of c tokens: x = h_c @ W^T (+ b) in the model's dtype (one [c, vocab] buffer),
then one row kernel computes the log-sum-exp, the loss of each row and the gradient of
the logits, written in place over x; the two matmuls of the backward follow on that
chunk. Triton runs the row kernel on GPUs; torch ops run it elsewhere.

    logits z = softcap(scale * (h @ W^T + b)),  softcap(u) = cap * tanh(u / cap) (cap > 0)
    loss = sum over rows with target != ignore_index of logsumexp(z) - z[target]
           divided by their count for reduction "mean"

The functions take 2-D h [N, H], weight [V, H], bias [V] or None, target [N] (int64).
"""

import os

import torch

# Why hubcompile keeps these functions behind their ops rather than tracing them into
# Inductor's graph (its inline.py): the chunk loop writes its outputs and one chunk buffer
# in place; traced, functionalized, each chunk would get fresh buffers, and the weight's
# gradient two live copies (0.5 GiB more at a 128k vocabulary). It is one call a step.
NOT_TRACEABLE = "the chunk loop accumulates into its outputs in place (traced, it would hold more memory)"

try:  # Triton is optional: CPU builds of torch may not have it
    from ._ce_rows_triton import cross_entropy_rows as _rows_triton
except Exception:  # noqa: BLE001
    _rows_triton = None

# The most memory one chunk of logits may take, and the share of free memory it may use.
# 128 MiB: on an H200 (Llama-1B-shaped step, 128k vocabulary) it peaked 0.12 GiB lower
# than 256 MiB (4.63 against 4.75 GiB) at 35.2 against 34.5 ms, both faster than
# Inductor's 36.2 ms (bench/results/h200/2026-12-01, lce_memory_step_run7).
MAX_CHUNK_BYTES = 128 << 20
FREE_MEMORY_SHARE = 8


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def chunk_rows(n_rows: int, vocab: int, itemsize: int, device: torch.device, fused: bool = True) -> int:
    """Rows per chunk: as many as fit in the smaller of MAX_CHUNK_BYTES and 1/8 of the
    free memory, at ``itemsize`` bytes per logit (plus fp32 temporaries where the rows
    run as torch ops). A multiple of 64 rows when more than 64 fit (matmul tiles)."""
    per_row = vocab * (itemsize + (0 if fused else 12))
    budget = min(MAX_CHUNK_BYTES, _free_bytes(device) // FREE_MEMORY_SHARE)
    rows = max(1, budget // max(per_row, 1))
    if rows > 64:
        rows -= rows % 64
    return int(min(max(n_rows, 1), rows))


def _use_triton(x: torch.Tensor) -> bool:
    return _rows_triton is not None and (x.device.type in ("cuda", "xpu") or _TRITON_ON_CPU)


# Tests set this to run the Triton rows on CPU tensors (under TRITON_INTERPRET=1).
_TRITON_ON_CPU = False


def cross_entropy_rows_torch(x, target, ignore_index: int, scale: float, softcap: float,
                             grad_scale=None, tangent=None, grad_out=None, transformed: bool = False):
    """The row kernel in torch ops (the same contract as ``_ce_rows_triton``): returns
    (loss of each row, log-sum-exp of each row), both fp32; with ``grad_out``, writes the
    gradient of the pre-transform logits there (it may be ``x`` itself). ``transformed``:
    x already holds the scaled, soft-capped logits."""
    z = x.float()
    if not transformed:
        z = z * scale
        if softcap > 0:
            z = torch.tanh(z / softcap) * softcap
    lse = torch.logsumexp(z, dim=-1)
    ignored = target == ignore_index
    safe_target = torch.where(ignored, 0, target).unsqueeze(-1)
    picked = z.gather(-1, safe_target).squeeze(-1)
    loss = torch.where(ignored, 0.0, lse - picked)
    if grad_out is not None:
        g = torch.exp(z - lse.unsqueeze(-1))
        g.scatter_add_(-1, safe_target, torch.full_like(picked, -1.0).unsqueeze(-1))
        g = torch.where(ignored.unsqueeze(-1), 0.0, g * grad_scale)
        if tangent is not None:
            g = g + tangent.float()
        if softcap > 0:
            g = g * (1 - (z / softcap) ** 2)
        grad_out.copy_(g * scale)
    return loss, lse


def cross_entropy_rows(x, target, ignore_index, scale, softcap, grad_scale=None, tangent=None, grad_out=None,
                       transformed=False):
    impl = _rows_triton if _use_triton(x) else cross_entropy_rows_torch
    return impl(x, target, ignore_index, scale, softcap, grad_scale=grad_scale, tangent=tangent, grad_out=grad_out,
                transformed=transformed)


def _check(h, weight, bias, target, reduction):
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h must be [N, H] and weight [V, H]; got {tuple(h.shape)} and {tuple(weight.shape)}")
    if target.shape != h.shape[:1]:
        raise ValueError(f"target must be [N] = [{h.shape[0]}], got {tuple(target.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _logits(h_c, weight, bias, out=None):
    if bias is not None:
        return torch.addmm(bias, h_c, weight.t(), out=out)
    return torch.mm(h_c, weight.t(), out=out)


def _normalize(total, target, ignore_index, reduction):
    """The loss from the sum over rows; "mean" divides by the rows not ignored (0/0 gives
    NaN, as F.cross_entropy does when every row is ignored)."""
    if reduction == "sum":
        return total
    return total / (target != ignore_index).sum()


def _grad_scale(grad_loss, target, ignore_index, reduction):
    # Clamped: with every row ignored each row's gradient is 0, never 0 * inf.
    scale = grad_loss.float().reshape(())
    if reduction == "mean":
        scale = scale / (target != ignore_index).sum().clamp(min=1)
    return scale


def _transform(x, scale: float, softcap: float):
    """softcap(scale * x) in fp32: the logits as the model returns them."""
    z = x.float() * scale
    return torch.tanh(z / softcap) * softcap if softcap > 0 else z


def _grad_buffers(h, weight, bias):
    """(grad_h, grad_weight, grad_bias) to fill chunk by chunk (``_accumulate``): the first
    chunk writes grad_weight (no zero-fill, no read of zeros); grad_bias is fp32, None
    without a bias."""
    grad_w = torch.empty_like(weight) if h.shape[0] else torch.zeros_like(weight)
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if bias is not None else None
    return torch.empty_like(h), grad_w, grad_b


def _accumulate(g, h_c, weight, start: int, grads) -> None:
    """The share of the chunk of rows from ``start`` in the gradients, from ``g``, the
    gradient of its logits: three matmuls in all, as unfused code has."""
    grad_h, grad_w, grad_b = grads
    torch.mm(g, weight, out=grad_h[start:start + g.shape[0]])
    grad_w.addmm_(g.t(), h_c, beta=1 if start else 0)
    if grad_b is not None:
        grad_b += g.float().sum(0)


def _finished(grads, h, bias):
    """The gradients as the functions return them: grad_bias in the bias's dtype, or an
    empty tensor without a bias (outputs of an op may not alias each other)."""
    grad_h, grad_w, grad_b = grads
    return grad_h, grad_w, (grad_b.to(bias.dtype) if grad_b is not None else h.new_empty(0))


def linear_cross_entropy_forward(h, weight, bias, target, ignore_index: int, reduction: str, scale: float,
                                 softcap: float, compute_grads: bool):
    """(loss, grad_h, grad_weight, grad_bias). With ``compute_grads`` the gradients for a
    loss gradient of 1 are computed here, chunk by chunk, while each chunk's logits are at
    hand (the backward then only scales them): three matmuls in all, as unfused code has.
    Without, the gradients are empty tensors. grad_bias is empty when bias is None."""
    _check(h, weight, bias, target, reduction)
    h, n = h.contiguous(), h.shape[0]
    fused = _use_triton(h)
    rows = chunk_rows(n, weight.shape[0], h.element_size(), h.device, fused)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grads = _grad_buffers(h, weight, bias) if compute_grads else None
    grad_scale = _grad_scale(torch.ones((), device=h.device), target, ignore_index, reduction) if compute_grads \
        else None
    # One chunk buffer, reused: a fresh one per chunk would hold two chunks at the switch.
    buffer = h.new_empty((min(rows, n), weight.shape[0]))
    for start in range(0, n, rows):
        h_c, t_c = h[start:start + rows], target[start:start + rows]
        x = _logits(h_c, weight, bias, out=buffer[:h_c.shape[0]])
        loss_rows, _ = cross_entropy_rows(x, t_c, ignore_index, scale, softcap, grad_scale=grad_scale,
                                          grad_out=x if compute_grads else None)
        total += loss_rows.sum()
        if compute_grads:  # x now holds the gradient of this chunk's logits
            _accumulate(x, h_c, weight, start, grads)
    # Outputs of an op may not alias each other: a fresh empty tensor for each one unused.
    out = _finished(grads, h, bias) if compute_grads else (h.new_empty(0), h.new_empty(0), h.new_empty(0))
    return _normalize(total, target, ignore_index, reduction), *out


def linear_cross_entropy_logits_forward(h, weight, bias, target, ignore_index: int, reduction: str, scale: float,
                                        softcap: float, logits_dtype: torch.dtype):
    """(loss, logits): for graphs that also return the logits. The logits [N, V] (after
    scale and soft-capping, in ``logits_dtype``) are the one full-size tensor; the loss
    is taken from them chunk by chunk, without an fp32 copy."""
    _check(h, weight, bias, target, reduction)
    logits = _logits(h.contiguous(), weight, bias).to(logits_dtype)
    n = h.shape[0]
    rows = chunk_rows(n, weight.shape[0], 4, h.device, _use_triton(h))
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, n, rows):
        chunk = logits[start:start + rows]
        if scale != 1.0 or softcap > 0:  # the returned logits are the transformed ones
            chunk.copy_(_transform(chunk, scale, softcap))
        loss_rows, _ = cross_entropy_rows(chunk, target[start:start + rows], ignore_index, scale, softcap,
                                          transformed=True)
        total += loss_rows.sum()
    return _normalize(total, target, ignore_index, reduction), logits


def linear_cross_entropy_logits_grads_forward(h, weight, bias, target, ignore_index: int, reduction: str,
                                              scale: float, softcap: float, logits_dtype: torch.dtype):
    """(loss, logits, grad_h, grad_weight, grad_bias): for training graphs that return the
    logits without differentiating them. Per chunk, the logits are written to the returned
    [N, V] tensor and, while at hand, turned into the loss and the gradients for a loss
    gradient of 1 (as ``linear_cross_entropy_forward`` with ``compute_grads``): nothing of
    size [N, V] is kept for the backward. grad_bias is empty when bias is None."""
    _check(h, weight, bias, target, reduction)
    h, n = h.contiguous(), h.shape[0]
    rows = chunk_rows(n, weight.shape[0], 4, h.device, _use_triton(h))
    logits = h.new_empty((n, weight.shape[0]), dtype=logits_dtype)
    grads = _grad_buffers(h, weight, bias)
    grad_scale = _grad_scale(torch.ones((), device=h.device), target, ignore_index, reduction)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    buffer = weight.new_empty((min(rows, n), weight.shape[0]))
    for start in range(0, n, rows):
        h_c, t_c, chunk = h[start:start + rows], target[start:start + rows], logits[start:start + rows]
        g = buffer[:h_c.shape[0]]
        x = _logits(h_c, weight, bias, out=g)
        if scale != 1.0 or softcap > 0:  # the returned logits are the transformed ones
            x = _transform(x, scale, softcap)
        chunk.copy_(x)
        # The loss from x, before the logits' rounding: as eager takes it from fp32 logits.
        loss_rows, _ = cross_entropy_rows(x, t_c, ignore_index, scale, softcap, grad_scale=grad_scale,
                                          grad_out=g, transformed=True)
        total += loss_rows.sum()
        _accumulate(g, h_c, weight, start, grads)
    return _normalize(total, target, ignore_index, reduction), logits, *_finished(grads, h, bias)


def linear_cross_entropy_logits_backward(grad_loss, grad_logits, h, weight, bias, target, logits, ignore_index: int,
                                         reduction: str, scale: float, softcap: float):
    """(grad_h, grad_weight, grad_bias) of ``linear_cross_entropy_logits_forward``, chunk by
    chunk: the gradient of each chunk's logits (the loss's plus ``grad_logits``, the
    gradient reaching the returned logits, or None) exists one chunk at a time."""
    h, n = h.contiguous(), h.shape[0]
    rows = chunk_rows(n, weight.shape[0], 2 * weight.element_size(), h.device, _use_triton(h))
    grad_scale = _grad_scale(grad_loss, target, ignore_index, reduction)
    grads = _grad_buffers(h, weight, bias)
    buffer = weight.new_empty((min(rows, n), weight.shape[0]))
    from_saved = scale == 1.0 and softcap == 0  # the saved logits are the head's output itself
    for start in range(0, n, rows):
        x, h_c = logits[start:start + rows], h[start:start + rows]
        g = buffer[:x.shape[0]]
        tangent = grad_logits[start:start + rows] if grad_logits is not None else None
        if not from_saved:
            # The saved logits are scaled and soft-capped, then rounded: the gradient taken
            # from them was up to 4x eager's error in bf16. The chunk's head output again
            # (one more matmul) gives eager's numbers.
            x = _logits(h_c, weight, bias, out=g)
        cross_entropy_rows(x, target[start:start + rows], ignore_index, scale, softcap, grad_scale=grad_scale,
                           tangent=tangent, grad_out=g, transformed=from_saved)
        _accumulate(g, h_c, weight, start, grads)
    return _finished(grads, h, bias)
