"""The causal depthwise conv1d op (``torch.ops.hubcompile.causal_conv1d``), as Mamba and
Mamba2 use it: per channel, out[t] = sum_k w[k] * x[t - (W-1) + k] (+ bias), then SiLU.
Like the ops in ``ops.py``: functional schema, fake, autograd through a backward op,
and the kernel named by ``kernel_spec`` or the eager reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels

REF = "reference"


def reference(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """The model-code spelling: padded depthwise conv1d, sliced back to the length."""
    width = weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if silu else out


@torch.library.custom_op("hubcompile::causal_conv1d", mutates_args=())
def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool, kernel_spec: str = REF, backward_kernel: str = REF
) -> Tensor:
    """x [B, D, L], weight [D, W], bias [D] or None; returns [B, D, L] in x's dtype."""
    return kernels.call(kernel_spec, "causal_conv1d_forward", x, weight, bias, "silu" if silu else None,
                        reference=_forward_reference)


def _forward_reference(x, weight, bias, activation):
    return reference(x, weight, bias, activation == "silu")


@causal_conv1d.register_fake
def _(x, weight, bias, silu, kernel_spec=REF, backward_kernel=REF):
    return x.new_empty(x.shape)


@torch.library.custom_op("hubcompile::causal_conv1d_backward", mutates_args=())
def causal_conv1d_backward(
    dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool, kernel_spec: str = REF
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dbias is empty when there is no bias (a schema cannot
    return None)."""
    out = kernels.call(kernel_spec, "causal_conv1d_backward", dout, x, weight, bias, "silu" if silu else None,
                       reference=_backward_reference)
    dx, dw = out[0], out[1]
    db = out[2] if bias is not None else x.new_empty(0)
    return dx.contiguous(), dw.contiguous(), db.contiguous()


def _backward_reference(dout, x, weight, bias, activation):
    inputs = (x, weight) if bias is None else (x, weight, bias)
    _, vjp = torch.func.vjp(lambda x_, w_, *b: reference(x_, w_, b[0] if b else None, activation == "silu"), *inputs)
    return vjp(dout)


@causal_conv1d_backward.register_fake
def _(dout, x, weight, bias, silu, kernel_spec=REF):
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db


def _setup(ctx, inputs, output):
    x, weight, bias, silu, _kernel, backward_kernel = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu, ctx.backward_kernel = silu, backward_kernel


def _grad(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = causal_conv1d_backward(dout, x, weight, bias, ctx.silu, ctx.backward_kernel)
    return dx, dw, (db if bias is not None else None), None, None, None


causal_conv1d.register_autograd(_grad, setup_context=_setup)
