"""hubcompile's custom ops (``torch.ops.hubcompile.*``).

Each matched pattern becomes one of these ops. Every op has a functional schema, a fake
implementation (shapes and dtypes only, for tracing and dynamic shapes), an autograd
formula whose backward is itself a custom op, and a real implementation that runs the
kernel named by its ``kernel_spec`` argument (a spec of ``kernels.py``, chosen when the graph
was compiled), or the eager reference for ``"reference"`` and whenever that kernel
cannot run. ``backward_kernel`` names the kernel of the backward op. (``kernel_spec``, not
``kernel``: Inductor's fallback lowering has a ``kernel`` parameter of its own, and the
argument, filled in by keyword when it has its default, collided with it.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels, reference

REF = "reference"


def _empty(like: Tensor) -> Tensor:
    # Every implementation returns fresh contiguous tensors; fakes must say the same.
    return like.new_empty(like.shape)


# ---------------------------------------------------------------------------- RMSNorm


def _eps(eps: float, eps_tensor: Tensor | None) -> float:
    # Under dynamic=True, Dynamo may lift a module's float eps into a graph input (a 0-d
    # CPU tensor), so its value is only known at run time: read it here.
    return eps if eps_tensor is None else float(eps_tensor.item())


def _norm_out_dtype(x: Tensor, weight: Tensor | None, cast_before_scale: bool) -> torch.dtype:
    if weight is None:
        return x.dtype
    return torch.promote_types(x.dtype, weight.dtype) if cast_before_scale else x.dtype


def _memory_order(x: Tensor) -> list[int] | None:
    """The permutation of x's dims into the order they lie in memory, when x is dense with
    its last dim innermost but not contiguous, else None. A rotation keeps q's layout
    ([B, S, H, D] under its [B, H, S, D] shape, layout.py), and a q/k norm after it
    (NanoChat) must too: the graph was traced with that layout (attention's matmul copies
    q from it), and a contiguous q would be another graph to the attention patterns."""
    if x.dim() < 2 or x.is_contiguous() or x.stride(-1) != 1:
        return None
    order = sorted(range(x.dim() - 1), key=lambda i: x.stride(i), reverse=True) + [x.dim() - 1]
    return order if x.permute(order).is_contiguous() else None


def _inverse(order: list[int]) -> list[int]:
    return [order.index(i) for i in range(len(order))]


def _dweight(dw: Tensor | None, like: Tensor) -> Tensor:
    # A custom op cannot return None: a norm without a weight gets an empty dweight.
    return like.new_empty(0) if dw is None else dw


@torch.library.custom_op("hubcompile::rms_norm", mutates_args=())
def rms_norm(
    x: Tensor,
    weight: Tensor | None,
    eps: float,
    weight_offset: float,
    cast_before_scale: bool,
    eps_tensor: Tensor | None = None,
    kernel_spec: str = REF,
    backward_kernel: str = REF,
) -> tuple[Tensor, Tensor]:
    """RMSNorm over the last dim. Returns (y, rstd); rstd is fp32 with shape x.shape[:-1].

    cast_before_scale=True is the Llama form ``w * (x * rstd).to(x.dtype)``; False is the
    Gemma form ``((x * rstd) * (weight_offset + w.float())).to(x.dtype)``; with no weight
    (Mamba mixers' inner norms, q/k L2 norms) ``(x * rstd).to(x.dtype)``.
    ``eps_tensor``, when given, replaces ``eps`` (see ``_eps``).
    """
    eps = _eps(eps, eps_tensor)
    order = _memory_order(x)
    if order is not None:  # normed in memory order, so y keeps x's layout with no copy
        x = x.permute(order)
    y, rstd, _ = kernels.call(kernel_spec, "rms_norm_forward", x, weight, eps, weight_offset, cast_before_scale,
                              reference=_rms_norm_reference)
    if order is not None:
        back = _inverse(order)
        return y.permute(back), rstd.permute(back[:-1]).contiguous()
    return y, rstd


def _rms_norm_reference(x, weight, eps, weight_offset, cast_before_scale, residual=None):
    """The reference in the kernels' API: (y, rstd, h or None)."""
    if residual is None:
        return (*reference.rms_norm(x, weight, eps, weight_offset, cast_before_scale), None)
    y, h, rstd = reference.add_rms_norm(x, residual, weight, eps, weight_offset, cast_before_scale)
    return y, rstd, h


@rms_norm.register_fake
def _(x, weight, eps, weight_offset, cast_before_scale, eps_tensor=None, kernel_spec=REF, backward_kernel=REF):
    dtype = _norm_out_dtype(x, weight, cast_before_scale)
    order = _memory_order(x)
    if order is None:
        y = x.new_empty(x.shape, dtype=dtype)
    else:
        y = x.new_empty([x.shape[i] for i in order], dtype=dtype).permute(_inverse(order))
    return y, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("hubcompile::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    weight: Tensor | None,
    eps: float,
    weight_offset: float,
    cast_before_scale: bool,
    eps_tensor: Tensor | None = None,
    kernel_spec: str = REF,
    backward_kernel: str = REF,
) -> tuple[Tensor, Tensor, Tensor]:
    """h = x + residual; returns (rms_norm(h), h, rstd): the residual add fused into the norm."""
    eps = _eps(eps, eps_tensor)
    y, rstd, h = kernels.call(kernel_spec, "rms_norm_forward", x, weight, eps, weight_offset, cast_before_scale,
                              residual=residual, reference=_rms_norm_reference)
    return y, h, rstd


@add_rms_norm.register_fake
def _(x, residual, weight, eps, weight_offset, cast_before_scale, eps_tensor=None, kernel_spec=REF, backward_kernel=REF):
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    h = torch.empty(torch.broadcast_shapes(x.shape, residual.shape), dtype=h_dtype, device=x.device)
    y = h.new_empty(h.shape, dtype=_norm_out_dtype(h, weight, cast_before_scale))
    return y, h, h.new_empty(h.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("hubcompile::rms_norm_backward", mutates_args=())
def rms_norm_backward(
    dy: Tensor,
    h: Tensor,
    weight: Tensor | None,
    rstd: Tensor,
    eps: float,
    weight_offset: float,
    cast_before_scale: bool,
    dh_extra: Tensor | None,
    eps_tensor: Tensor | None = None,
    kernel_spec: str = REF,
) -> tuple[Tensor, Tensor]:
    """Gradients (dh, dweight) of rms_norm; dh_extra is added to dh (the residual's own
    gradient in the fused add+norm). With no weight, dweight is empty."""
    eps = _eps(eps, eps_tensor)

    def backward_reference(dy, h, weight, rstd, weight_offset, cast_before_scale, dh_extra=None, **_layer_only):
        def f(h_, w_):
            return reference.rms_norm(h_, w_, eps, weight_offset, cast_before_scale)[0]

        dy = dy.to(_norm_out_dtype(h, weight, cast_before_scale))
        if weight is None:
            _, vjp = torch.func.vjp(lambda h_: f(h_, None), h)
            dh, dw = *vjp(dy), None
        else:
            _, vjp = torch.func.vjp(f, h, weight)
            dh, dw = vjp(dy)
        return (dh if dh_extra is None else dh + dh_extra), dw

    # A Hub layer recomputes its forward to differentiate it, which needs eps; the
    # bundled API's backward works from rstd alone.
    extra = {"eps": eps} if kernels.is_layer(kernel_spec) else {}
    dh, dw = kernels.call(kernel_spec, "rms_norm_backward", dy, h, weight, rstd, weight_offset, cast_before_scale,
                          dh_extra=dh_extra, reference=backward_reference, **extra)
    return dh, _dweight(dw, h)


@rms_norm_backward.register_fake
def _(dy, h, weight, rstd, eps, weight_offset, cast_before_scale, dh_extra, eps_tensor=None, kernel_spec=REF):
    return _empty(h), _dweight(None if weight is None else _empty(weight), h)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps, weight_offset, cast_before_scale, eps_tensor, _kernel, backward_kernel = inputs
    ctx.mark_non_differentiable(output[1])  # rstd is saved for backward, not a result
    ctx.save_for_backward(x, weight, output[1], eps_tensor)
    ctx.args = (eps, weight_offset, cast_before_scale)
    ctx.backward_kernel = backward_kernel


def _rms_norm_grad(ctx, dy, _drstd):
    x, weight, rstd, eps_tensor = ctx.saved_tensors
    dx, dw = rms_norm_backward(dy, x, weight, rstd, *ctx.args, None, eps_tensor, ctx.backward_kernel)
    return dx, (None if weight is None else dw), None, None, None, None, None, None


rms_norm.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


def _add_rms_norm_setup(ctx, inputs, output):
    x, residual, weight, eps, weight_offset, cast_before_scale, eps_tensor, _kernel, backward_kernel = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(output[1], weight, output[2], eps_tensor)
    ctx.args = (eps, weight_offset, cast_before_scale)
    ctx.backward_kernel = backward_kernel


def _add_rms_norm_grad(ctx, dy, dh, _drstd):
    h, weight, rstd, eps_tensor = ctx.saved_tensors
    dsum, dw = rms_norm_backward(dy, h, weight, rstd, *ctx.args, dh, eps_tensor, ctx.backward_kernel)
    return dsum, dsum, (None if weight is None else dw), None, None, None, None, None, None


add_rms_norm.register_autograd(_add_rms_norm_grad, setup_context=_add_rms_norm_setup)

# ----------------------------------------------------------------- Gated activations


@torch.library.custom_op("hubcompile::gated_activation", mutates_args=())
def gated_activation(
    gate: Tensor, up: Tensor, activation: str, kernel_spec: str = REF, backward_kernel: str = REF
) -> Tensor:
    """act(gate) * up, for activation "silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""
    reference.check_activation(activation)
    return kernels.call(kernel_spec, "gated_act_forward", gate, up, activation, reference=reference.gated_activation)


@gated_activation.register_fake
def _(gate, up, activation, kernel_spec=REF, backward_kernel=REF):
    shape = torch.broadcast_shapes(gate.shape, up.shape)
    return gate.new_empty(shape, dtype=torch.promote_types(gate.dtype, up.dtype))


@torch.library.custom_op("hubcompile::gated_activation_backward", mutates_args=())
def gated_activation_backward(
    dout: Tensor, gate: Tensor, up: Tensor, activation: str, kernel_spec: str = REF
) -> tuple[Tensor, Tensor]:
    return kernels.call(kernel_spec, "gated_act_backward", dout, gate, up, activation, reference=_gated_backward_reference)


def _gated_backward_reference(dout, gate, up, activation):
    _, vjp = torch.func.vjp(lambda g, u: reference.gated_activation(g, u, activation), gate, up)
    return vjp(dout)


@gated_activation_backward.register_fake
def _(dout, gate, up, activation, kernel_spec=REF):
    return _empty(gate), _empty(up)


def _gated_setup(ctx, inputs, output):
    gate, up, activation, _kernel, backward_kernel = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation, ctx.backward_kernel = activation, backward_kernel


def _gated_grad(ctx, dout):
    gate, up = ctx.saved_tensors
    dgate, dup = gated_activation_backward(dout, gate, up, ctx.activation, ctx.backward_kernel)
    return dgate, dup, None, None, None


gated_activation.register_autograd(_gated_grad, setup_context=_gated_setup)


@torch.library.custom_op("hubcompile::gated_activation_fused", mutates_args=())
def gated_activation_fused(x: Tensor, activation: str, kernel_spec: str = REF, backward_kernel: str = REF) -> Tensor:
    """act(x[..., :d]) * x[..., d:] for x of shape [..., 2d] (one fused gate/up Linear)."""
    reference.check_activation(activation)
    return kernels.call(kernel_spec, "gated_act_fused_forward", x, activation, reference=reference.gated_activation_fused)


@gated_activation_fused.register_fake
def _(x, activation, kernel_spec=REF, backward_kernel=REF):
    torch._check(x.shape[-1] % 2 == 0, lambda: f"last dim must be even, got {x.shape[-1]}")
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("hubcompile::gated_activation_fused_backward", mutates_args=())
def gated_activation_fused_backward(dout: Tensor, x: Tensor, activation: str, kernel_spec: str = REF) -> Tensor:
    return kernels.call(kernel_spec, "gated_act_fused_backward", dout, x, activation,
                        reference=_gated_fused_backward_reference)


def _gated_fused_backward_reference(dout, x, activation):
    _, vjp = torch.func.vjp(lambda x_: reference.gated_activation_fused(x_, activation), x)
    return vjp(dout)[0]


@gated_activation_fused_backward.register_fake
def _(dout, x, activation, kernel_spec=REF):
    return _empty(x)


def _gated_fused_setup(ctx, inputs, output):
    x, activation, _kernel, backward_kernel = inputs
    ctx.save_for_backward(x)
    ctx.activation, ctx.backward_kernel = activation, backward_kernel


def _gated_fused_grad(ctx, dout):
    (x,) = ctx.saved_tensors
    return gated_activation_fused_backward(dout, x, ctx.activation, ctx.backward_kernel), None, None, None


gated_activation_fused.register_autograd(_gated_fused_grad, setup_context=_gated_fused_setup)
