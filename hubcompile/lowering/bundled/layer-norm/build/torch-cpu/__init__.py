"""hubcompile-layer-norm, torch-cpu variant: the same API as the torch-cuda (Triton)
variant, written with plain torch ops that compute in fp32 and round like the Triton
kernels.

  h    = x + residual, rounded to h's dtype (like eager ``x + residual``)
  mean = mean(h), rstd = rsqrt(mean((h - mean)^2) + eps)          (fp32)
  y    = (h - mean) * rstd * w + b, in fp32, rounded once to h's dtype
"""

from __future__ import annotations

import torch

__all__ = ["layer_norm_forward", "layer_norm_backward"]


def _check_affine(t: torch.Tensor | None, n: int, what: str) -> None:
    if t is not None and (t.dim() != 1 or t.shape[0] != n):
        raise ValueError(f"{what} must have shape [{n}], got {list(t.shape)}")


def layer_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, mean, rstd, h): h = x + residual (or x itself when residual is None),
    mean and rstd in fp32 of shape h.shape[:-1], y = layer_norm(h) in h's dtype."""
    if residual is not None:
        h = (x.float() + residual.float()).to(torch.promote_types(x.dtype, residual.dtype))
    else:
        h = x
    n = h.shape[-1]
    _check_affine(weight, n, "weight")
    _check_affine(bias, n, "bias")
    hf = h.float()
    var, mean = torch.var_mean(hf, dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)
    y = (hf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(h.dtype), mean, rstd, h


def layer_norm_backward(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dh_extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Returns (dh, dweight, dbias): dh in h.dtype (plus dh_extra when given), dweight
    and dbias in their parameter's dtype (fp32 accumulation), None where absent."""
    if dy.shape != h.shape:
        raise ValueError(f"dy has shape {list(dy.shape)}, expected {list(h.shape)}")
    n = h.shape[-1]
    _check_affine(weight, n, "weight")
    _check_affine(bias, n, "bias")
    r = rstd.float().reshape(h.shape[:-1]).unsqueeze(-1)
    xhat = (h.float() - mean.float().reshape(h.shape[:-1]).unsqueeze(-1)) * r
    dyf = dy.float()
    g = dyf * weight.float() if weight is not None else dyf
    dh = r * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if dh_extra is not None:
        dh = dh + dh_extra.float()
    dweight = (dyf * xhat).reshape(-1, n).sum(0).to(weight.dtype) if weight is not None else None
    dbias = dyf.reshape(-1, n).sum(0).to(bias.dtype) if bias is not None else None
    return dh.to(h.dtype), dweight, dbias
