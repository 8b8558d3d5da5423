"""hubcompile-rotary (Triton variant): rotary position embedding forward / x-gradient.

Functional API (no autograd inside; callers wrap these in custom ops):

* ``rotary_forward(x, cos, sin, interleaved) -> out``
* ``rotary_backward(dout, cos, sin, interleaved, *, dx_dtype=None) -> dx``

``x`` is 4-D ``[B, A1, A2, D]`` (any strides; a copy is made only when
``x.stride(-1) != 1``).  ``cos``/``sin`` have at most 4 dims and broadcast to
``x[..., :R]`` where ``R = cos.shape[-1]`` (even, ``<= D``) is the rotary dim.

Rounding / dtype policy: everything is computed in fp32 and rounded once to the result
dtype.  The forward result dtype is what eager ``x * cos + rotate(x) * sin`` produces,
i.e. ``promote_types(promote_types(x.dtype, cos.dtype), sin.dtype)`` (bf16 x with fp32
cos gives fp32, like eager).  ``rotary_backward`` returns ``dx_dtype`` if given (pass
``x.dtype``, as autograd needs), else ``dout.dtype``.  Outputs have the layout that
``torch.empty_like`` gives x (dout), as eager's elementwise ops do, or are contiguous when
its last dim is not: a q transposed from ``[B, S, H, D]`` stays so, and so does SDPA's
output, which follows q's, so the transpose back before the output projection is a view,
not a copy.  Columns ``R:`` are passed through unchanged (converted to the result dtype).
"""

import torch

from ._rotary_triton import launch_rotary

__all__ = ["rotary_forward", "rotary_backward"]


def _check_and_expand(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    if x.dim() != 4:
        raise ValueError(f"rotary: x must be 4-D [B, A1, A2, D], got shape {tuple(x.shape)}")
    if cos.dim() > 4 or sin.dim() > 4 or cos.dim() == 0 or sin.dim() == 0:
        raise ValueError(
            f"rotary: cos/sin must have 1 to 4 dims, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    B, A1, A2, D = x.shape
    R = cos.shape[-1]
    if sin.shape[-1] != R:
        raise ValueError(f"rotary: cos and sin last dims differ ({R} vs {sin.shape[-1]})")
    if R % 2 != 0 or R > D or R <= 0:
        raise ValueError(f"rotary: rotary dim R = cos.shape[-1] = {R} must be even and in (0, D={D}]")
    if cos.device != x.device or sin.device != x.device:
        raise ValueError("rotary: x, cos and sin must be on the same device")
    target = (B, A1, A2, R)
    try:
        cos_e = cos.expand(target)
        sin_e = sin.expand(target)
    except RuntimeError as e:
        raise ValueError(
            f"rotary: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} do not broadcast to {target}"
        ) from e
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, cos_e, sin_e, R


def _run(x, cos, sin, interleaved, backward, out_dtype):
    x, cos_e, sin_e, R = _check_and_expand(x, cos, sin)
    out = torch.empty_like(x, dtype=out_dtype)  # x's last dim is contiguous here
    if out.numel() == 0:
        return out
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    # Traced into Inductor's graph (hubcompile's inline.py), the device is Inductor's to set.
    if x.device.type == "cuda" and get_proxy_mode() is None:
        with torch.cuda.device(x.device):
            launch_rotary(x, cos_e, sin_e, out, R, interleaved, backward)
    else:
        # CPU tensors: only meaningful under TRITON_INTERPRET=1.
        launch_rotary(x, cos_e, sin_e, out, R, interleaved, backward)
    return out


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

# Functions that only allocate, view and launch Triton kernels (through wrap_triton when
# traced): hubcompile may trace them into Inductor's graph (inline.py).
TRACEABLE = ('rotary_forward', 'rotary_backward')
