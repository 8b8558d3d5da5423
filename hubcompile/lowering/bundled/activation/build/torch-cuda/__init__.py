"""hubcompile-activation, torch-cuda variant: Triton gated activations (SwiGLU / GeGLU).

Exports ``gated_act_forward``, ``gated_act_backward``, ``gated_act_fused_forward`` and
``gated_act_fused_backward``; see ``_gated_triton``.
"""

from ._gated_triton import (
    ACTIVATIONS,
    gated_act_backward,
    gated_act_forward,
    gated_act_fused_backward,
    gated_act_fused_forward,
)

__all__ = [
    "ACTIVATIONS",
    "gated_act_forward",
    "gated_act_backward",
    "gated_act_fused_forward",
    "gated_act_fused_backward",
]

# Functions that only allocate, view and launch Triton kernels (through wrap_triton when
# traced): hubcompile may trace them into Inductor's graph (inline.py).
TRACEABLE = ('gated_act_forward', 'gated_act_backward', 'gated_act_fused_forward', 'gated_act_fused_backward')
