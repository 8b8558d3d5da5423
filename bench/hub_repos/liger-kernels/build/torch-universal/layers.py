"""Hub layers over liger-kernel's autograd functions."""

from liger_kernel.ops.rms_norm import LigerRMSNormFunction
from torch import nn


class LigerRMSNorm(nn.Module):
    """Llama's RMSNorm (``self.weight``, ``self.variance_epsilon``) with liger's kernels."""

    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states):
        # offset 0 and the "llama" casting mode are Llama's RMSNorm; liger's defaults otherwise
        return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", True, None)
