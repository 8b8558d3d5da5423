"""A whole gated MLP as one op (``torch.ops.hubcompile.gated_mlp``), for Hub MLP layers
of a kernel mapping (``MLP``, ``SwiGLUMLP``, ``GeGLUMLP``; patterns/gated_mlp.py):

    down_proj(act(gate_proj(x)) * up_proj(x))              up_weight given
    down_proj(act(gate) * up), gate, up = gate_up_proj(x).chunk(2, -1)    up_weight None

with ``act`` "silu" or "gelu_tanh". Without a mapped layer no graph holds this op: the gate
alone is replaced (ops.gated_activation) and the projections stay matmuls. Like the other
ops: schema, fake, autograd through a backward op, the kernel named by ``kernel_spec`` or
the eager reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels, reference as ref

REF = "reference"


def reference(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias, activation):
    if up_weight is None:
        return F.linear(ref.gated_activation_fused(F.linear(x, gate_weight, gate_bias), activation), down_weight,
                        down_bias)
    gate, up = F.linear(x, gate_weight, gate_bias), F.linear(x, up_weight, up_bias)
    return F.linear(ref.gated_activation(gate, up, activation), down_weight, down_bias)


@torch.library.custom_op("hubcompile::gated_mlp", mutates_args=())
def gated_mlp(x: Tensor, gate_weight: Tensor, gate_bias: Tensor | None, up_weight: Tensor | None,
              up_bias: Tensor | None, down_weight: Tensor, down_bias: Tensor | None, activation: str,
              kernel_spec: str = REF, backward_kernel: str = REF) -> Tensor:
    """x [..., hidden] -> [..., hidden]; ``up_weight`` None: ``gate_weight`` is the fused
    [2 * intermediate, hidden] projection, the gate's rows first."""
    ref.check_activation(activation)
    return kernels.call(kernel_spec, "gated_mlp_forward", x, gate_weight, gate_bias, up_weight, up_bias, down_weight,
                        down_bias, activation, reference=reference)


@gated_mlp.register_fake
def _(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias, activation, kernel_spec=REF,
      backward_kernel=REF):
    return x.new_empty((*x.shape[:-1], down_weight.shape[0]))


def _backward_reference(dout, x, *weights_and_activation):
    *weights, activation = weights_and_activation
    present = [i for i, w in enumerate(weights) if w is not None]

    def f(x_, *given):
        full = list(weights)
        for i, w in zip(present, given):
            full[i] = w
        return reference(x_, *full, activation)

    _, vjp = torch.func.vjp(f, x, *(weights[i] for i in present))
    grads = vjp(dout)
    out = [None] * len(weights)
    for i, g in zip(present, grads[1:]):
        out[i] = g
    return (grads[0], *out)


@torch.library.custom_op("hubcompile::gated_mlp_backward", mutates_args=())
def gated_mlp_backward(dout: Tensor, x: Tensor, gate_weight: Tensor, gate_bias: Tensor | None,
                       up_weight: Tensor | None, up_bias: Tensor | None, down_weight: Tensor,
                       down_bias: Tensor | None, activation: str,
                       kernel_spec: str = REF) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, then the gradient of each of gate_weight, gate_bias, up_weight, up_bias,
    down_weight, down_bias): empty for one not given."""
    weights = (gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias)
    grads = kernels.call(kernel_spec, "gated_mlp_backward", dout, x, *weights, activation,
                         reference=_backward_reference)
    return tuple(g if w is not None else x.new_empty(0) for w, g in zip((x, *weights), grads))


@gated_mlp_backward.register_fake
def _(dout, x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias, activation, kernel_spec=REF):
    return tuple(t.new_empty(t.shape) if t is not None else x.new_empty(0)
                 for t in (x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias))


def _setup(ctx, inputs, output):
    *tensors, activation, _kernel, backward_kernel = inputs
    ctx.save_for_backward(*tensors)
    ctx.activation, ctx.backward_kernel = activation, backward_kernel


def _grad(ctx, dout):
    tensors = ctx.saved_tensors
    grads = gated_mlp_backward(dout, *tensors, ctx.activation, ctx.backward_kernel)
    return (*(g if t is not None else None for t, g in zip(tensors, grads)), None, None, None)


gated_mlp.register_autograd(_grad, setup_context=_setup)
