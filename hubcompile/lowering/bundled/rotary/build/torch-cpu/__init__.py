"""hubcompile-rotary (plain torch variant): rotary position embedding forward / x-gradient.

Same API and semantics as the Triton (torch-cuda) variant:

* ``rotary_forward(x, cos, sin, interleaved) -> out``
* ``rotary_backward(dout, cos, sin, interleaved, *, dx_dtype=None) -> dx``

Computed in fp32 (fp64 inputs stay fp64), rounded once to the result dtype
(forward: ``promote_types(promote_types(x.dtype, cos.dtype), sin.dtype)``; backward:
``dx_dtype`` or ``dout.dtype``).  Outputs have the layout that ``torch.empty_like`` gives
x (dout), or are contiguous when its last dim is not, as in the Triton variant.
"""

import torch

__all__ = ["rotary_forward", "rotary_backward"]


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> int:
    if x.dim() != 4:
        raise ValueError(f"rotary: x must be 4-D [B, A1, A2, D], got shape {tuple(x.shape)}")
    if cos.dim() > 4 or sin.dim() > 4 or cos.dim() == 0 or sin.dim() == 0:
        raise ValueError(
            f"rotary: cos/sin must have 1 to 4 dims, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    D = x.shape[-1]
    R = cos.shape[-1]
    if sin.shape[-1] != R:
        raise ValueError(f"rotary: cos and sin last dims differ ({R} vs {sin.shape[-1]})")
    if R % 2 != 0 or R > D or R <= 0:
        raise ValueError(f"rotary: rotary dim R = cos.shape[-1] = {R} must be even and in (0, D={D}]")
    target = tuple(x.shape[:-1]) + (R,)
    try:
        ok = all(torch.broadcast_shapes(tuple(t.shape), target) == target for t in (cos, sin))
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"rotary: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} do not broadcast to {target}")
    return R


def _rotate(t: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        return torch.stack((-t[..., 1::2], t[..., 0::2]), dim=-1).flatten(-2)
    h = t.shape[-1] // 2
    return torch.cat((-t[..., h:], t[..., :h]), dim=-1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _run(x, cos, sin, interleaved, backward, out_dtype):
    R = _check(x, cos, sin)
    cdt = _compute_dtype(out_dtype)
    xf = x.to(cdt)
    c = cos.to(cdt)
    s = sin.to(cdt)
    xr = xf[..., :R]
    if backward:
        # transpose of (x -> x*cos + rotate(x)*sin); rotate^T == -rotate
        yr = xr * c - _rotate(xr * s, interleaved)
    else:
        yr = xr * c + _rotate(xr, interleaved) * s
    y = torch.cat((yr, xf[..., R:]), dim=-1) if R < x.shape[-1] else yr
    out = torch.empty_like(x, dtype=out_dtype) if x.stride(-1) == 1 else x.new_empty(x.shape, dtype=out_dtype)
    return out.copy_(y)


def rotary_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """out[..., :R] = x_r * cos + rotate(x_r) * sin; out[..., R:] = x[..., R:]."""
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    return _run(x, cos, sin, interleaved, False, out_dtype)


def rotary_backward(
    dout: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    *,
    dx_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. x: dx[..., :R] = dout_r * cos - rotate(dout_r * sin); dx[..., R:] = dout[..., R:]."""
    return _run(dout, cos, sin, interleaved, True, dx_dtype if dx_dtype is not None else dout.dtype)
