"""hubcompile-rmsnorm, torch-cuda variant: Triton RMSNorm (+ fused residual add).

Exports ``rms_norm_forward`` and ``rms_norm_backward``; see ``_rmsnorm_triton``.
"""

from ._rmsnorm_triton import rms_norm_backward, rms_norm_forward

__all__ = ["rms_norm_forward", "rms_norm_backward"]
