"""hubcompile-layer-norm, torch-cuda variant: Triton LayerNorm (+ fused residual add).

Exports ``layer_norm_forward`` and ``layer_norm_backward``; see ``_layer_norm_triton``.
"""

from ._layer_norm_triton import layer_norm_backward, layer_norm_forward

__all__ = ["layer_norm_forward", "layer_norm_backward"]

# Functions that only allocate, view and launch Triton kernels (through wrap_triton when
# traced): hubcompile may trace them into Inductor's graph (inline.py).
TRACEABLE = ("layer_norm_forward", "layer_norm_backward")
