"""hubcompile-rmsnorm, torch-cpu variant: the same API as the torch-cuda (Triton) variant,
written with plain torch ops that compute in fp32 and round like the Triton kernels.

  h    = x + residual, rounded to h's dtype (like eager ``x + residual``)
  rstd = rsqrt(mean(h^2) + eps)                                   (fp32)
  n    = h * rstd
  cast_before_scale=True  (Llama):  y = round_h(n) * round_w(w + offset), rounded once to
                                    promote(h.dtype, w.dtype)
  cast_before_scale=False (Gemma):  y = n * (w + offset), rounded once to h.dtype
  weight=None:                      y = n, rounded once to h.dtype (dweight None)
"""

from __future__ import annotations

import torch

__all__ = ["rms_norm_forward", "rms_norm_backward"]


def _effective_weight(weight: torch.Tensor, weight_offset: float, cast_before_scale: bool):
    w = weight.float()
    if cast_before_scale:
        # eager: ``weight + offset`` happens in the weight's dtype
        return (w + weight_offset).to(weight.dtype).float() if weight_offset != 0.0 else w
    return w + weight_offset


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    weight_offset: float,
    cast_before_scale: bool,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, rstd, h): h = x + residual (or x itself when residual is None),
    rstd = rsqrt(mean(h.float()**2, -1) + eps) in fp32 of shape h.shape[:-1], y = norm(h)."""
    if residual is not None:
        h_dtype = torch.promote_types(x.dtype, residual.dtype)
        h = (x.float() + residual.float()).to(h_dtype)
    else:
        h = x
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != h.shape[-1]):
        raise ValueError(f"weight must have shape [{h.shape[-1]}], got {list(weight.shape)}")
    hf = h.float()
    rstd = torch.rsqrt(hf.pow(2).mean(-1) + eps)
    n = hf * rstd.unsqueeze(-1)
    if weight is None:
        return n.to(h.dtype), rstd, h
    w = _effective_weight(weight, weight_offset, cast_before_scale)
    if cast_before_scale:
        out_dtype = torch.promote_types(h.dtype, weight.dtype)
        y = (n.to(h.dtype).float() * w).to(out_dtype)
    else:
        y = (n * w).to(h.dtype)
    return y, rstd, h


def rms_norm_backward(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    weight_offset: float,
    cast_before_scale: bool,
    dh_extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dh, dweight): dh in h.dtype (plus dh_extra when given), dweight in
    weight.dtype (fp32 accumulation), None without a weight."""
    if dy.shape != h.shape:
        raise ValueError(f"dy has shape {list(dy.shape)}, expected {list(h.shape)}")
    nh = h.shape[-1]
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != nh):
        raise ValueError(f"weight must have shape [{nh}], got {list(weight.shape)}")
    r = rstd.float().reshape(h.shape[:-1]).unsqueeze(-1)
    n = h.float() * r
    dyf = dy.float()
    dn = dyf if weight is None else dyf * _effective_weight(weight, weight_offset, cast_before_scale)
    dh = r * (dn - n * (dn * n).mean(-1, keepdim=True))
    if dh_extra is not None:
        dh = dh + dh_extra.float()
    if weight is None:
        return dh.to(h.dtype), None
    n_used = n.to(h.dtype).float() if cast_before_scale else n
    dweight = (dyf * n_used).reshape(-1, nh).sum(0)
    return dh.to(h.dtype), dweight.to(weight.dtype)
