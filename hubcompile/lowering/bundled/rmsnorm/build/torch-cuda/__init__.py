"""hubcompile-rmsnorm, torch-cuda variant: Triton RMSNorm (+ fused residual add).

Exports ``rms_norm_forward`` and ``rms_norm_backward``; see ``_rmsnorm_triton``.
"""

from ._rmsnorm_triton import rms_norm_backward, rms_norm_forward

__all__ = ["rms_norm_forward", "rms_norm_backward"]

# Functions that only allocate, view and launch Triton kernels (through wrap_triton when
# traced): hubcompile may trace them into Inductor's graph (inline.py).
TRACEABLE = ('rms_norm_forward', 'rms_norm_backward')
