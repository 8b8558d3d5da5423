"""Stand-in with kernels-community/layer-norm's calling convention (tests only): the
forward of flash-attention's fused dropout + residual + LayerNorm, without dropout."""
import torch

from . import layers

__all__ = ["layers", "dropout_add_ln_fwd"]


def dropout_add_ln_fwd(input, gamma, beta, rowscale, colscale, x0_subset, z_subset, dropout_p, epsilon,
                       rowscale_const, z_numrows, gen, residual_in_fp32, is_rms_norm):
    assert input.dim() == 2 and input.is_contiguous() and gamma is not None and dropout_p == 0.0
    assert rowscale is colscale is x0_subset is z_subset is gen is None and not is_rms_norm
    x = input.float()
    var, mu = torch.var_mean(x, dim=-1, correction=0)
    rsigma = torch.rsqrt(var + epsilon)
    z = (x - mu[:, None]) * rsigma[:, None] * gamma.float()
    if beta is not None:
        z = z + beta.float()
    return [z.to(input.dtype), input, None, mu, rsigma]
