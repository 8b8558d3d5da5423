"""hubcompile-causal-conv1d (plain torch variant): depthwise causal conv1d forward / backward.

Same API and semantics as the Triton (torch-cuda) variant:

* ``causal_conv1d_forward(x, weight, bias=None, activation=None) -> out``
* ``causal_conv1d_backward(dout, x, weight, bias=None, activation=None) -> (dx, dweight, dbias_or_None)``

Computed in fp32 (fp64 inputs stay fp64); ``out``/``dx`` in ``x.dtype`` (contiguous
``[B, D, L]``), ``dweight``/``dbias`` in weight/bias dtype.
"""

import torch
import torch.nn.functional as F

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
    return activation == "silu"


def _cdt(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _pre(xf: torch.Tensor, wf: torch.Tensor, bf: torch.Tensor | None) -> torch.Tensor:
    D, W = wf.shape
    L = xf.shape[-1]
    return F.conv1d(xf, wf[:, None, :], bf, padding=W - 1, groups=D)[..., :L]


def causal_conv1d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    silu = _check(x, weight, bias, activation)
    cdt = _cdt(x)
    y = _pre(x.to(cdt), weight.to(cdt), bias.to(cdt) if bias is not None else None)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype).contiguous()


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
    cdt = _cdt(x)
    xf = x.to(cdt)
    wf = weight.to(cdt)
    g = dout.to(cdt)
    D, W = wf.shape
    L = xf.shape[-1]
    if silu:
        pre = _pre(xf, wf, bias.to(cdt) if bias is not None else None)
        s = torch.sigmoid(pre)
        g = g * s * (1.0 + pre * (1.0 - s))
    xp = F.pad(xf, (W - 1, 0))  # xp[..., t + k] == x[..., t - (W-1) + k]
    gp = F.pad(g, (0, W - 1))  # gp[..., s + j] == dpre[..., s + j] (zero past L)
    dweight = torch.stack([(g * xp[..., k : k + L]).sum(dim=(0, 2)) for k in range(W)], dim=1)
    dx = torch.zeros_like(g)
    for j in range(W):
        dx = dx + wf[:, W - 1 - j, None] * gp[..., j : j + L]
    dbias = g.sum(dim=(0, 2)).to(bias.dtype) if bias is not None else None
    return dx.to(x.dtype).contiguous(), dweight.to(weight.dtype), dbias
