"""hubcompile-activation, torch-cpu variant: the same API as the torch-cuda (Triton)
variant, written with plain torch ops that compute in fp32 and round like the kernels.

  a   = act(gate) rounded to gate.dtype
  out = a * up rounded once to promote(gate.dtype, up.dtype)
  dgate = dout * up * act'(gate) (rounded once to gate.dtype), dup = dout * a (to up.dtype)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh")

__all__ = [
    "ACTIVATIONS",
    "gated_act_forward",
    "gated_act_backward",
    "gated_act_fused_forward",
    "gated_act_fused_backward",
]

_K2 = 1.5957691216057308  # 2 * sqrt(2 / pi)


def _check(activation: str) -> None:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown gated activation {activation!r}; valid choices: {', '.join(ACTIVATIONS)}"
        )


def _act(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh")


def _act_and_grad(x: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    if activation == "silu":
        s, one_minus_s = torch.sigmoid(x), torch.sigmoid(-x)
        return x * s, s * (1.0 + x * one_minus_s)
    # gelu_tanh(x) = x * sigmoid(v), v = 2 sqrt(2/pi) (x + 0.044715 x^3)
    x2 = x * x
    v = _K2 * x * (1.0 + 0.044715 * x2)
    s, one_minus_s = torch.sigmoid(v), torch.sigmoid(-v)
    return F.gelu(x, approximate="tanh"), s + x * s * one_minus_s * (_K2 * (1.0 + 0.134145 * x2))


def _fwd(gate, up, activation, out_dtype):
    a = _act(gate.float(), activation).to(gate.dtype).float()
    return (a * up.float()).to(out_dtype)


def _bwd(dout, gate, up, activation):
    a, da = _act_and_grad(gate.float(), activation)
    a = a.to(gate.dtype).float()
    dof = dout.float()
    return dof * up.float() * da, dof * a


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"the last dim of x must be even ([..., 2d]), got shape {list(x.shape)}")
    d = x.shape[-1] // 2
    return x[..., :d], x[..., d:], d


def gated_act_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, in dtype promote(gate.dtype, up.dtype), with the broadcast shape."""
    _check(activation)
    return _fwd(gate, up, activation, torch.promote_types(gate.dtype, up.dtype))


def gated_act_backward(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dgate, dup) with gate's and up's shapes and dtypes."""
    _check(activation)
    shape = torch.broadcast_shapes(gate.shape, up.shape)
    if dout.shape != shape:
        raise ValueError(f"dout has shape {list(dout.shape)}, expected {list(shape)}")
    dgate, dup = _bwd(dout, gate, up, activation)
    return dgate.sum_to_size(gate.shape).to(gate.dtype), dup.sum_to_size(up.shape).to(up.dtype)


def gated_act_fused_forward(x: torch.Tensor, activation: str) -> torch.Tensor:
    """x is [..., 2d] (gate = x[..., :d], up = x[..., d:]); returns act(gate) * up, [..., d]."""
    _check(activation)
    gate, up, _ = _split(x)
    return _fwd(gate, up, activation, x.dtype)


def gated_act_fused_backward(dout: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    """Returns dx of shape [..., 2d]: dgate in the first half, dup in the second."""
    _check(activation)
    gate, up, d = _split(x)
    if dout.shape != (*x.shape[:-1], d):
        raise ValueError(f"dout has shape {list(dout.shape)}, expected {[*x.shape[:-1], d]}")
    dgate, dup = _bwd(dout, gate, up, activation)
    return torch.cat([dgate, dup], dim=-1).to(x.dtype)
