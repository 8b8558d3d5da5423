"""Gated activations: ``act(gate) * up``, the core of SwiGLU and GeGLU MLPs.

Two families share one op with an ``activation`` argument:
  silu_gate       F.silu / nn.SiLU / ``x * sigmoid(x)`` (Llama, Mistral, Qwen, Phi-3)
  gelu_tanh_gate  F.gelu(approximate="tanh") (Gemma)
The gate and up projections come either from two Linear layers (``gated_activation``) or
from one fused Linear whose output is split in halves by ``chunk``, ``split`` or slicing,
as Phi-3 does (``gated_activation_fused``, which takes the ``[..., 2d]`` tensor whole so
its backward writes one gradient instead of concatenating two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lowering import ops
from .framework import Family, Spelling, chosen_kernels, meta_val, same_device

F32, BF16 = torch.float32, torch.bfloat16
DTYPES = [(F32,), (BF16,)]

_ACTS = {
    "silu": [
        ("silu", F.silu),
        ("sigmoid", lambda g: g * torch.sigmoid(g)),
        # The form Inductor's inference decomposition leaves in the graph.
        ("silu_exp", lambda g: (g.float() / (1 + torch.exp(-g.float()))).to(g.dtype)),
    ],
    "gelu_tanh": [("gelu_tanh", lambda g: F.gelu(g, approximate="tanh"))],
}

# How a fused [..., 2d] projection is cut into (gate, up).
_SPLITS = {
    "chunk": lambda x: x.chunk(2, dim=-1),
    "slice": lambda x: (x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]),
}


def _check_separate(match) -> str | None:
    gate, up = meta_val(match.kwargs["gate"]), meta_val(match.kwargs["up"])
    if not same_device(match.kwargs["gate"], match.kwargs["up"]):
        return "gate and up on different devices"
    if gate.shape != up.shape:
        return f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape (broadcast)"
    if gate.dtype != up.dtype or not gate.is_floating_point():
        return f"gate {gate.dtype} and up {up.dtype} are not one floating dtype"
    return None


def _check_fused(match) -> str | None:
    x = meta_val(match.kwargs["x"])
    if not x.is_floating_point():
        return f"input dtype {x.dtype} is not floating point"
    return None


def _separate(activation, act_name, act, up_first):
    def search(gate, up):
        return up * act(gate) if up_first else act(gate) * up

    def replace(gate, up):
        return ops.gated_activation(gate, up, activation, *chosen_kernels())

    name = f"{act_name}_{'up_first' if up_first else 'gate_first'}"
    return Spelling(name, search, replace, lambda dt: [torch.randn(2, 3, 8, dtype=dt), torch.randn(2, 3, 8, dtype=dt)],
                    DTYPES, check=_check_separate, op="gated_activation", backward_op="gated_activation_backward",
                    anchor="gate", requirements={"activation": activation})


def _fused(activation, act_name, act, split_name, split, up_first):
    def search(x):
        gate, up = split(x)
        return up * act(gate) if up_first else act(gate) * up

    def replace(x):
        return ops.gated_activation_fused(x, activation, *chosen_kernels())

    name = f"fused_{split_name}_{act_name}_{'up_first' if up_first else 'gate_first'}"
    return Spelling(name, search, replace, lambda dt: [torch.randn(2, 3, 16, dtype=dt)], DTYPES,
                    check=_check_fused, op="gated_activation_fused", backward_op="gated_activation_fused_backward",
                    requirements={"activation": activation})


def _family(activation: str, family_name: str, description: str) -> Family:
    fused, separate = [], []
    for act_name, act in _ACTS[activation]:
        for up_first in (False, True):
            separate.append(_separate(activation, act_name, act, up_first))
            for split_name, split in _SPLITS.items():
                fused.append(_fused(activation, act_name, act, split_name, split, up_first))
    # Fused spellings first: a split tensor's halves would also match the separate form.
    return Family(family_name, description, stages=[fused, separate], fusible=True)


FAMILIES = [
    _family("silu", "silu_gate", "SiLU-gate multiply (SwiGLU): silu(gate) * up"),
    _family("gelu_tanh", "gelu_tanh_gate", "GELU-tanh gate multiply (GeGLU): gelu_tanh(gate) * up"),
]
