"""LayerNorm ops (``torch.ops.hubcompile.layer_norm``, ``add_layer_norm``), as
``nn.LayerNorm`` / ``F.layer_norm`` over the last dim compute them: with or without
weight and bias, statistics and the affine in fp32, rounded once to the input's dtype
(the weight and bias may be fp32 beside bf16 activations: models that upcast around the
norm). Like the ops in ``ops.py``: functional schema, fake, autograd through a backward
op, and the kernel named by ``kernel_spec`` or the eager reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels

REF = "reference"


def reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): the model-code spelling ``F.layer_norm`` on the upcast input, its
    result in x's dtype; mean and rstd in fp32 with shape x.shape[:-1]."""
    h = x.float()
    n = h.shape[-1]
    y = F.layer_norm(h, (n,), weight.float() if weight is not None else None,
                     bias.float() if bias is not None else None, eps).to(x.dtype)
    var, mean = torch.var_mean(h, dim=-1, correction=0)
    return y, mean, torch.rsqrt(var + eps)


def add_reference(x, residual, weight, bias, eps):
    """(y, h, mean, rstd) for h = x + residual, y = layer_norm(h)."""
    h = x + residual
    y, mean, rstd = reference(h, weight, bias, eps)
    return y, h, mean, rstd


def _forward_reference(x, weight, bias, eps, residual=None):
    """The reference in the kernels' API: (y, mean, rstd, h)."""
    h = x if residual is None else x + residual
    return (*reference(h, weight, bias, eps), h)


def _stats(like: Tensor) -> Tensor:
    return like.new_empty(like.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("hubcompile::layer_norm", mutates_args=())
def layer_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, kernel_spec: str = REF,
    backward_kernel: str = REF,
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last dim: (y in x's dtype, mean, rstd in fp32 of shape x.shape[:-1])."""
    y, mean, rstd, _ = kernels.call(kernel_spec, "layer_norm_forward", x, weight, bias, eps,
                                    reference=_forward_reference)
    return y, mean, rstd


@layer_norm.register_fake
def _(x, weight, bias, eps, kernel_spec=REF, backward_kernel=REF):
    return x.new_empty(x.shape), _stats(x), _stats(x)


@torch.library.custom_op("hubcompile::add_layer_norm", mutates_args=())
def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, kernel_spec: str = REF,
    backward_kernel: str = REF,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """h = x + residual; returns (layer_norm(h), h, mean, rstd): the residual add fused in."""
    y, mean, rstd, h = kernels.call(kernel_spec, "layer_norm_forward", x, weight, bias, eps, residual=residual,
                                    reference=_forward_reference)
    return y, h, mean, rstd


@add_layer_norm.register_fake
def _(x, residual, weight, bias, eps, kernel_spec=REF, backward_kernel=REF):
    h = x.new_empty(x.shape)
    return h.new_empty(h.shape), h, _stats(h), _stats(h)


@torch.library.custom_op("hubcompile::layer_norm_backward", mutates_args=())
def layer_norm_backward(
    dy: Tensor, h: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor, eps: float,
    dh_extra: Tensor | None, kernel_spec: str = REF,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dh, dweight, dbias); dh_extra is added to dh (the sum's own gradient in the fused
    add+norm). dweight / dbias are empty where there is no weight / bias (a schema cannot
    return None)."""
    extra = {"eps": eps} if kernels.is_layer(kernel_spec) else {}
    dh, dw, db = kernels.call(kernel_spec, "layer_norm_backward", dy, h, weight, bias, mean, rstd,
                              dh_extra=dh_extra, reference=_backward_reference(eps), **extra)
    # Two distinct empties: one tensor returned twice would alias itself.
    return dh, (dw if weight is not None else h.new_empty(0)), (db if bias is not None else h.new_empty(0))


def _backward_reference(eps):
    def backward_reference(dy, h, weight, bias, mean, rstd, dh_extra=None, **_layer_only):
        present = [t for t in (h, weight, bias) if t is not None]

        def f(*args):
            it = iter(args)
            h_ = next(it)
            w_ = next(it) if weight is not None else None
            b_ = next(it) if bias is not None else None
            return reference(h_, w_, b_, eps)[0]

        _, vjp = torch.func.vjp(f, *present)
        grads = list(vjp(dy.to(h.dtype)))
        dh = grads.pop(0)
        dw = grads.pop(0) if weight is not None else None
        db = grads.pop(0) if bias is not None else None
        return (dh if dh_extra is None else dh + dh_extra), dw, db

    return backward_reference


@layer_norm_backward.register_fake
def _(dy, h, weight, bias, mean, rstd, eps, dh_extra, kernel_spec=REF):
    return (h.new_empty(h.shape), weight.new_empty(weight.shape) if weight is not None else h.new_empty(0),
            bias.new_empty(bias.shape) if bias is not None else h.new_empty(0))


def _grads(weight, bias, dw, db):
    return (dw if weight is not None else None), (db if bias is not None else None)


def _setup(ctx, inputs, output):
    x, weight, bias, eps, _kernel, backward_kernel = inputs
    ctx.mark_non_differentiable(output[1], output[2])  # mean and rstd are saved, not results
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.eps, ctx.backward_kernel = eps, backward_kernel


def _grad(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dy = torch.zeros_like(x) if dy is None else dy
    dx, dw, db = layer_norm_backward(dy, x, weight, bias, mean, rstd, ctx.eps, None, ctx.backward_kernel)
    return dx, *_grads(weight, bias, dw, db), None, None, None


layer_norm.register_autograd(_grad, setup_context=_setup)


def _add_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, _kernel, backward_kernel = inputs
    ctx.mark_non_differentiable(output[2], output[3])
    # An unused sum (BERT's post-norm add) gets no zeros gradient to add.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], weight, bias, output[2], output[3])
    ctx.eps, ctx.backward_kernel = eps, backward_kernel


def _add_grad(ctx, dy, dh, _dmean, _drstd):
    h, weight, bias, mean, rstd = ctx.saved_tensors
    dy = torch.zeros_like(h) if dy is None else dy
    dsum, dw, db = layer_norm_backward(dy, h, weight, bias, mean, rstd, ctx.eps, dh, ctx.backward_kernel)
    return dsum, dsum, *_grads(weight, bias, dw, db), None, None, None


add_layer_norm.register_autograd(_add_grad, setup_context=_add_setup)
