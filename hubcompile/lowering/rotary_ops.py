"""The rotary position embedding op (``torch.ops.hubcompile.rotary``), as transformers'
``apply_rotary_pos_emb`` computes it for one tensor (q or k):

    out[..., :R] = x_r * cos + rotate(x_r) * sin      R = cos.shape[-1] (even, <= D)
    out[..., R:] = x[..., R:]                          (partial rotary: passed through)

``rotate`` is Llama's ``rotate_half`` (half-split) or GPT-J's ``rotate_every_two``
(``interleaved``). cos/sin arrive already broadcastable to ``x[..., :R]`` (the model's
``cos.unsqueeze(1)`` or ``repeat_interleave`` happen before the op). Like the ops in
``ops.py``: functional schema, fake, autograd through a backward op, and the kernel
named by ``kernel_spec`` or the eager reference.

Only x is differentiated: in every model cos/sin are computed under ``no_grad`` from
buffers. The pattern check refuses matches whose cos/sin require grad, and calling the
op eagerly with such cos/sin raises in backward rather than dropping their gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .layout import empty_following, following

REF = "reference"


def rotate_half(x: Tensor) -> Tensor:
    """Llama's spelling: (x1, x2) -> (-x2, x1) on the halves of the last dim."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: Tensor) -> Tensor:
    """GPT-J's spelling: each pair (a, b) of the last dim -> (-b, a)."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def reference(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """The model-code spelling; partial rotary as GPT-NeoX/Phi write it (slice, rotate, cat)."""
    rotate = rotate_every_two if interleaved else rotate_half
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return (x * cos) + (rotate(x) * sin)
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat(((x_rot * cos) + (rotate(x_rot) * sin), x_pass), dim=-1)


def _out_dtype(x: Tensor, cos: Tensor, sin: Tensor) -> torch.dtype:
    # What eager's x * cos + rotate(x) * sin gives (bf16 x with fp32 cos is fp32).
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


def _check_shapes(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    r, d = cos.shape[-1], x.shape[-1]
    torch._check(sin.shape[-1] == r, lambda: f"rotary: cos and sin last dims differ ({r} vs {sin.shape[-1]})")
    torch._check(r % 2 == 0 and 0 < r <= d, lambda: f"rotary: rotary dim {r} must be even and in (0, {d}]")


@torch.library.custom_op("hubcompile::rotary", mutates_args=())
def rotary(
    x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, kernel_spec: str = REF, backward_kernel: str = REF
) -> Tensor:
    """x [B, A1, A2, D]; cos/sin broadcastable to x[..., :R]. Returns x's shape in the
    promoted dtype of x, cos and sin."""
    _check_shapes(x, cos, sin)
    return following(x, kernels.call(kernel_spec, "rotary_forward", x, cos, sin, interleaved, reference=reference,
                                         contiguous=False))


@rotary.register_fake
def _(x, cos, sin, interleaved, kernel_spec=REF, backward_kernel=REF):
    _check_shapes(x, cos, sin)
    return empty_following(x, dtype=_out_dtype(x, cos, sin))


@torch.library.custom_op("hubcompile::rotary_backward", mutates_args=())
def rotary_backward(dout: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, kernel_spec: str = REF) -> Tensor:
    """dx in dout's dtype (the autograd formula casts it to x's)."""
    return following(dout, kernels.call(kernel_spec, "rotary_backward", dout, cos, sin, interleaved,
                                            reference=_backward_reference, contiguous=False))


def _backward_reference(dout, cos, sin, interleaved):
    # The rotation is linear in x: its vjp is the same at every x, so zeros stand in for x
    # (dout's dtype is already the promoted one, so the reference keeps it).
    _, vjp = torch.func.vjp(lambda x_: reference(x_, cos, sin, interleaved), dout.new_zeros(dout.shape))
    return vjp(dout)[0]


@rotary_backward.register_fake
def _(dout, cos, sin, interleaved, kernel_spec=REF):
    return empty_following(dout)


def _setup(ctx, inputs, output):
    x, cos, sin, interleaved, _kernel, backward_kernel = inputs
    ctx.save_for_backward(cos, sin)
    ctx.x_dtype, ctx.interleaved, ctx.backward_kernel = x.dtype, interleaved, backward_kernel


def _grad(ctx, dout):
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError("hubcompile.rotary differentiates x only; cos and sin must not require grad")
    cos, sin = ctx.saved_tensors
    dx = rotary_backward(dout, cos, sin, ctx.interleaved, ctx.backward_kernel)
    return dx.to(ctx.x_dtype), None, None, None, None, None


rotary.register_autograd(_grad, setup_context=_setup)
