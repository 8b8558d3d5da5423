"""Eager reference implementations of hubcompile's ops.

Each is the canonical model-code spelling of the computation, so that "the reference"
means "what the model computed". They are the ops' fallback on every device, the
escape hatch users can call directly, and the baseline the tests compare kernels with.
Backward references are autograd through these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GATED_ACTIVATIONS = ("silu", "gelu_tanh")


def check_activation(activation: str) -> None:
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(
            f"unknown gated activation {activation!r}; valid choices: "
            f"{', '.join(GATED_ACTIVATIONS)}"
        )


def _scale(n: torch.Tensor, x_dtype, weight, weight_offset: float, cast_before_scale: bool):
    if weight is None:
        # no weight (Mamba mixers' inner norms, q/k L2 norms): normalize in fp32, round once
        return n.to(x_dtype)
    if cast_before_scale:
        # Llama/Mistral/Qwen: normalize in fp32, round to the input dtype, then scale.
        w = weight if weight_offset == 0.0 else weight + weight_offset
        return w * n.to(x_dtype)
    # Gemma: scale in fp32 by (offset + w), then round once.
    return (n * (weight_offset + weight.float())).to(x_dtype)


def rms_norm(x, weight, eps: float, weight_offset: float, cast_before_scale: bool):
    """Returns (y, rstd) with rstd = rsqrt(mean(x^2) + eps) in fp32, shape x.shape[:-1]."""
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = _scale(h * rstd, x.dtype, weight, weight_offset, cast_before_scale)
    return y, rstd.squeeze(-1)


def add_rms_norm(x, residual, weight, eps: float, weight_offset: float, cast_before_scale: bool):
    """Returns (y, h, rstd) for h = x + residual, y = rms_norm(h)."""
    h = x + residual
    y, rstd = rms_norm(h, weight, eps, weight_offset, cast_before_scale)
    return y, h, rstd


def gated_activation(gate, up, activation: str):
    check_activation(activation)
    if activation == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh") * up


def gated_activation_fused(x, activation: str):
    """x is [..., 2d]: the first half is the gate, the second the up projection."""
    gate, up = x.chunk(2, dim=-1)
    return gated_activation(gate, up, activation)
