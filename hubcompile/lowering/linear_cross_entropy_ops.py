"""The fused LM head + cross-entropy ops (``torch.ops.hubcompile.linear_cross_entropy*``):

    loss = cross_entropy(softcap(scale * (h @ W^T + b)).float(), target,
                         ignore_index=ignore_index, reduction=reduction)

over h [N, H], W [V, H], b [V] or None, target [N]. Two ops, for the two ways a graph
holds the loss:

* ``linear_cross_entropy``: the logits are used by the loss only (a compiled training
  step or loss function). The kernel never materialises them; in training it computes
  the gradients in the forward pass, chunk by chunk, and returns them as extra outputs
  that the autograd formula scales by the loss's gradient.
* ``linear_cross_entropy_logits``: the graph also returns the logits (a transformers
  model compiled whole). They are produced once, in their dtype; the loss and, in the
  backward op, the gradient are computed from them chunk by chunk, with no fp32 copy.

Like the other ops: schema, fake, autograd, and the kernel named by ``kernel_spec`` (a spec
of ``kernels.py``) or the eager reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels

REF = "reference"


def reference_logits(h: Tensor, weight: Tensor, bias: Tensor | None, scale: float, softcap: float) -> Tensor:
    """The logits as fp32, as model code computes them and upcasts them for the loss."""
    z = F.linear(h, weight, bias).float() * scale
    return torch.tanh(z / softcap) * softcap if softcap > 0 else z


def _logits_grad(z: Tensor, target: Tensor, ignore_index: int, grad_scale: Tensor, softcap: float, scale: float,
                 tangent: Tensor | None = None) -> Tensor:
    """d loss / d (pre-transform logits), written out (no autograd: an op's implementation
    runs below it): softmax - one_hot on rows not ignored, times grad_scale, plus the
    gradient reaching the transformed logits, back through soft-capping and scale."""
    ignored = (target == ignore_index).unsqueeze(-1)
    g = torch.softmax(z, dim=-1) - F.one_hot(torch.where(ignored.squeeze(-1), 0, target), z.shape[-1]).to(z.dtype)
    g = torch.where(ignored, 0.0, g * grad_scale)
    if tangent is not None:
        g = g + tangent.to(g.dtype)
    return _through_transform(g, z, scale, softcap)


def _through_transform(g: Tensor, z: Tensor, scale: float, softcap: float) -> Tensor:
    """The gradient ``g`` reaching the logits ``z = softcap(scale * u)``, taken back to u:
    d (cap * tanh(v / cap)) / dv = 1 - (z / cap)^2."""
    if softcap > 0:
        g = g * (1 - (z / softcap) ** 2)
    return g * scale


def _grad_scale(grad_loss: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    if reduction == "sum":
        return grad_loss.float()
    return grad_loss.float() / (target != ignore_index).sum().clamp(min=1)


def _forward_reference(h, weight, bias, target, ignore_index, reduction, scale, softcap, compute_grads):
    z = reference_logits(h, weight, bias, scale, softcap)
    loss = F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction)
    if not compute_grads:
        return loss, h.new_empty(0), h.new_empty(0), h.new_empty(0)
    g = _logits_grad(z, target, ignore_index, _grad_scale(torch.ones((), device=h.device), target, ignore_index,
                                                          reduction), softcap, scale).to(h.dtype)
    grad_b = g.float().sum(0).to(bias.dtype) if bias is not None else h.new_empty(0)
    return loss, g @ weight, g.t() @ h, grad_b


@torch.library.custom_op("hubcompile::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ignore_index: int,
                         reduction: str, scale: float, softcap: float, compute_grads: bool,
                         kernel_spec: str = REF) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_h, grad_weight, grad_bias); the gradients (for a loss gradient of 1) are
    empty unless ``compute_grads``, grad_bias also when there is no bias."""
    return kernels.call(kernel_spec, "linear_cross_entropy_forward", h, weight, bias, target, ignore_index, reduction,
                        scale, softcap, compute_grads, reference=_forward_reference)


@linear_cross_entropy.register_fake
def _(h, weight, bias, target, ignore_index, reduction, scale, softcap, compute_grads, kernel_spec=REF):
    loss = h.new_empty((), dtype=torch.float32)
    if not compute_grads:
        return loss, h.new_empty(0), h.new_empty(0), h.new_empty(0)
    grad_b = bias.new_empty(bias.shape) if bias is not None else h.new_empty(0)
    return loss, h.new_empty(h.shape), weight.new_empty(weight.shape), grad_b


def _setup(ctx, inputs, output):
    bias, compute_grads = inputs[2], inputs[8]
    ctx.has_bias, ctx.compute_grads = bias is not None, compute_grads
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:])


def _grad(ctx, grad_loss, *_):
    if not ctx.compute_grads:
        raise RuntimeError("hubcompile: linear_cross_entropy was compiled without gradients (its inputs did not "
                           "require grad when the graph was traced); recompile with grad enabled")
    grad_h, grad_w, grad_b = ctx.saved_tensors
    return (grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype),
            grad_b * grad_loss.to(grad_b.dtype) if ctx.has_bias else None, None, None, None, None, None, None, None)


linear_cross_entropy.register_autograd(_grad, setup_context=_setup)


# ------------------------------------------------------------ with the logits returned


def _logits_forward_reference(h, weight, bias, target, ignore_index, reduction, scale, softcap, logits_dtype):
    z = reference_logits(h, weight, bias, scale, softcap)
    return F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction), z.to(logits_dtype)


@torch.library.custom_op("hubcompile::linear_cross_entropy_logits", mutates_args=())
def linear_cross_entropy_logits(h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ignore_index: int,
                                reduction: str, scale: float, softcap: float, logits_dtype: torch.dtype,
                                kernel_spec: str = REF, backward_kernel: str = REF) -> tuple[Tensor, Tensor]:
    """(loss, logits [N, V] in ``logits_dtype``, after scale and soft-capping)."""
    return kernels.call(kernel_spec, "linear_cross_entropy_logits_forward", h, weight, bias, target, ignore_index,
                        reduction, scale, softcap, logits_dtype, reference=_logits_forward_reference)


@linear_cross_entropy_logits.register_fake
def _(h, weight, bias, target, ignore_index, reduction, scale, softcap, logits_dtype, kernel_spec=REF, backward_kernel=REF):
    return h.new_empty((), dtype=torch.float32), h.new_empty((h.shape[0], weight.shape[0]), dtype=logits_dtype)


def _logits_backward_reference(grad_loss, grad_logits, h, weight, bias, target, logits, ignore_index, reduction,
                               scale, softcap):
    z = reference_logits(h, weight, bias, scale, softcap)
    g = _logits_grad(z, target, ignore_index, _grad_scale(grad_loss, target, ignore_index, reduction), softcap,
                     scale, tangent=grad_logits).to(weight.dtype)
    grad_b = g.float().sum(0).to(bias.dtype) if bias is not None else h.new_empty(0)
    return g @ weight, g.t() @ h, grad_b


@torch.library.custom_op("hubcompile::linear_cross_entropy_logits_backward", mutates_args=())
def linear_cross_entropy_logits_backward(grad_loss: Tensor, grad_logits: Tensor | None, h: Tensor, weight: Tensor,
                                         bias: Tensor | None, target: Tensor, logits: Tensor, ignore_index: int,
                                         reduction: str, scale: float, softcap: float,
                                         kernel_spec: str = REF) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_h, grad_weight, grad_bias; empty without a bias)."""
    return kernels.call(kernel_spec, "linear_cross_entropy_logits_backward", grad_loss, grad_logits, h, weight, bias,
                        target, logits, ignore_index, reduction, scale, softcap,
                        reference=_logits_backward_reference)


@linear_cross_entropy_logits_backward.register_fake
def _(grad_loss, grad_logits, h, weight, bias, target, logits, ignore_index, reduction, scale, softcap, kernel_spec=REF):
    grad_b = bias.new_empty(bias.shape) if bias is not None else h.new_empty(0)
    return h.new_empty(h.shape), weight.new_empty(weight.shape), grad_b


def _setup_logits(ctx, inputs, output):
    h, weight, bias, target, ignore_index, reduction, scale, softcap, _dtype, _kernel, backward_kernel = inputs
    ctx.save_for_backward(h, weight, bias, target, output[1])
    ctx.args = (ignore_index, reduction, scale, softcap)
    ctx.has_bias, ctx.backward_kernel = bias is not None, backward_kernel


def _grad_logits(ctx, grad_loss, grad_logits):
    h, weight, bias, target, logits = ctx.saved_tensors
    grad_h, grad_w, grad_b = linear_cross_entropy_logits_backward(
        grad_loss, grad_logits, h, weight, bias, target, logits, *ctx.args, ctx.backward_kernel)
    return grad_h, grad_w, (grad_b if ctx.has_bias else None), None, None, None, None, None, None, None, None


linear_cross_entropy_logits.register_autograd(_grad_logits, setup_context=_setup_logits)


# ------------------------------------- with the logits returned, in training

def _logits_grads_forward_reference(h, weight, bias, target, ignore_index, reduction, scale, softcap, logits_dtype):
    loss, logits = _logits_forward_reference(h, weight, bias, target, ignore_index, reduction, scale, softcap,
                                             logits_dtype)
    _, grad_h, grad_w, grad_b = _forward_reference(h, weight, bias, target, ignore_index, reduction, scale, softcap,
                                                   True)
    return loss, logits, grad_h, grad_w, grad_b


@torch.library.custom_op("hubcompile::linear_cross_entropy_logits_grads", mutates_args=())
def linear_cross_entropy_logits_grads(h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                                      ignore_index: int, reduction: str, scale: float, softcap: float,
                                      logits_dtype: torch.dtype, kernel_spec: str = REF
                                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, logits, grad_h, grad_weight, grad_bias) for a training graph that returns the
    logits: the logits come out without a gradient (``Reattach`` gives them one outside
    the compiled graph), so AOTAutograd neither saves them nor makes a [N, V] zeros
    gradient for them when they go unused. The gradients (for a loss gradient of 1) are
    computed in the forward, as ``linear_cross_entropy`` does; grad_bias is empty
    without a bias."""
    return kernels.call(kernel_spec, "linear_cross_entropy_logits_grads_forward", h, weight, bias, target, ignore_index,
                        reduction, scale, softcap, logits_dtype, reference=_logits_grads_forward_reference)


@linear_cross_entropy_logits_grads.register_fake
def _(h, weight, bias, target, ignore_index, reduction, scale, softcap, logits_dtype, kernel_spec=REF):
    grad_b = bias.new_empty(bias.shape) if bias is not None else h.new_empty(0)
    return (h.new_empty((), dtype=torch.float32), h.new_empty((h.shape[0], weight.shape[0]), dtype=logits_dtype),
            h.new_empty(h.shape), weight.new_empty(weight.shape), grad_b)


def _setup_logits_grads(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[2:])


def _grad_logits_grads(ctx, grad_loss, *_):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    return (grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype),
            grad_b * grad_loss.to(grad_b.dtype) if ctx.has_bias else None, None, None, None, None, None, None, None)


linear_cross_entropy_logits_grads.register_autograd(_grad_logits_grads, setup_context=_setup_logits_grads)


class Reattach(torch.autograd.Function):
    """The returned logits, given back their gradient: d logits / d (h, weight, bias),
    computed only when something differentiates the logits. Applied to the compiled
    graph's outputs (backend.py), outside what AOTAutograd sees."""

    @staticmethod
    def forward(ctx, logits, h, weight, bias, scale: float, softcap: float):
        ctx.save_for_backward(logits, h, weight, bias)
        ctx.scale, ctx.softcap = scale, softcap
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        logits, h, weight, bias = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0]).float()
        g = _through_transform(g, logits.reshape(g.shape).float(), ctx.scale, ctx.softcap).to(weight.dtype)
        grad_b = g.float().sum(0).to(bias.dtype) if bias is not None else None
        return None, (g @ weight).view(h.shape), g.t() @ h.reshape(-1, h.shape[-1]), grad_b, None, None
