"""hubcompile-causal-conv1d (Triton variant): depthwise causal conv1d forward / backward.

Functional API (no autograd inside; callers wrap these in custom ops):

* ``causal_conv1d_forward(x, weight, bias=None, activation=None) -> out``
* ``causal_conv1d_backward(dout, x, weight, bias=None, activation=None) -> (dx, dweight, dbias_or_None)``

``x`` is ``[B, D, L]`` with any strides, ``weight`` is ``[D, W]`` with ``1 <= W <= 4``,
``bias`` is ``[D]`` or None, ``activation`` is None or ``"silu"``.

``out[b, d, t] = act(sum_{k<W} weight[d, k] * x[b, d, t - (W-1) + k] + bias[d])`` with zero
padding on the left, i.e. ``F.conv1d(x, weight[:, None, :], bias, padding=W-1, groups=D)[..., :L]``.

Accumulation is fp32; ``out``/``dx`` are in ``x.dtype`` (weight/bias may be another dtype,
e.g. fp32 weight with bf16 x), ``dweight``/``dbias`` are accumulated in fp32 over batch
and time (two-stage reduction) and returned in weight/bias dtype.  ``out`` and ``dx`` are
contiguous ``[B, D, L]`` tensors.
"""

import torch

from ._causal_conv1d_triton import launch_bwd, launch_fwd

__all__ = ["causal_conv1d_forward", "causal_conv1d_backward"]

_MAX_WIDTH = 4
_ACTIVATIONS = (None, "silu")


def _check(x, weight, bias, activation) -> bool:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation={activation!r} is not supported; valid choices: None, 'silu'")
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be 3-D [B, D, L], got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"causal_conv1d: weight must be 2-D [D, W], got shape {tuple(weight.shape)}")
    W = weight.shape[1]
    if not 1 <= W <= _MAX_WIDTH:
        raise ValueError(f"causal_conv1d: kernel width W={W} is not supported; valid range is 1..{_MAX_WIDTH}")
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d: weight has {weight.shape[0]} channels, x has {x.shape[1]}")
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"causal_conv1d: bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}")
    tensors = [x, weight] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in tensors):
        raise ValueError("causal_conv1d: x, weight and bias must be on the same device")
    return activation == "silu"


def _launch(fn, x, *args):
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    # Traced into Inductor's graph (hubcompile's inline.py), the device is Inductor's to set.
    if x.device.type == "cuda" and get_proxy_mode() is None:
        with torch.cuda.device(x.device):
            return fn(*args)
    # CPU tensors: only meaningful under TRITON_INTERPRET=1.
    return fn(*args)


def causal_conv1d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    silu = _check(x, weight, bias, activation)
    B, D, L = x.shape
    out = torch.empty((B, D, L), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    _launch(launch_fwd, x, x, weight, bias, out, silu)
    return out


def causal_conv1d_backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    silu = _check(x, weight, bias, activation)
    if tuple(dout.shape) != tuple(x.shape):
        raise ValueError(f"causal_conv1d: dout shape {tuple(dout.shape)} != x shape {tuple(x.shape)}")
    B, D, L = x.shape
    dx = torch.empty((B, D, L), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        dweight = torch.zeros_like(weight)
        dbias = torch.zeros_like(bias) if bias is not None else None
        return dx, dweight, dbias
    dw32, db32 = _launch(launch_bwd, x, dout, x, weight, bias, dx, silu)
    dweight = dw32.to(weight.dtype)
    dbias = db32.to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias

# Functions that only allocate, view and launch Triton kernels (through wrap_triton when
# traced): hubcompile may trace them into Inductor's graph (inline.py).
TRACEABLE = ("causal_conv1d_forward", "causal_conv1d_backward")
