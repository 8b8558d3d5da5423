"""The attention op (``torch.ops.hubcompile.attention``): softmax(q k^T * scale + mask) v
over [B, H, S, D] tensors, with k and v at their own (grouped-query) head count. Like
the ops in ``ops.py``: schema, fake, autograd through a backward op, and the kernel
named by ``kernel_spec`` or the eager reference."""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .layout import empty_following, following

REF = "reference"


def reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, is_causal: bool = False) -> Tensor:
    """Eager attention as transformers writes it: repeat k/v, fp32 softmax, cast back."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None:
        scores = scores + mask
    if is_causal:
        blocked = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(blocked, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _causal(causal: bool) -> dict:
    # Only a causal call passes the flag: kernels written before it keep working.
    return {"is_causal": True} if causal else {}


@torch.library.custom_op("hubcompile::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
              kernel_spec: str = REF, backward_kernel: str = REF, causal: bool = False) -> Tensor:
    """``causal``: query i sees keys 0..i (on top of ``mask``, usually None then)."""
    out = kernels.call(kernel_spec, "attention_forward", q, k, v, mask, scale, reference=reference, contiguous=False,
                       **_causal(causal))
    return following(q, out)


@attention.register_fake
def _(q, k, v, mask, scale, kernel_spec=REF, backward_kernel=REF, causal=False):
    return empty_following(q, (*q.shape[:-1], v.shape[-1]))  # laid out like q, as SDPA's output


@torch.library.custom_op("hubcompile::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                       kernel_spec: str = REF, causal: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    grads = kernels.call(kernel_spec, "attention_backward", dout, q, k, v, mask, scale,
                         reference=_backward_reference, contiguous=False, **_causal(causal))
    return tuple(following(x, g) for x, g in zip((q, k, v), grads))


def _backward_reference(dout, q, k, v, mask, scale, is_causal=False):
    _, vjp = torch.func.vjp(lambda q_, k_, v_: reference(q_, k_, v_, mask, scale, is_causal), q, k, v)
    return vjp(dout)


@attention_backward.register_fake
def _(dout, q, k, v, mask, scale, kernel_spec=REF, causal=False):
    return empty_following(q), empty_following(k), empty_following(v)


def _setup(ctx, inputs, output):
    q, k, v, mask, scale, _kernel, backward_kernel, causal = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.scale, ctx.backward_kernel, ctx.causal = scale, backward_kernel, causal


def _grad(ctx, dout):
    q, k, v, mask = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, q, k, v, mask, ctx.scale, ctx.backward_kernel, ctx.causal)
    return dq, dk, dv, None, None, None, None, None


attention.register_autograd(_grad, setup_context=_setup)
