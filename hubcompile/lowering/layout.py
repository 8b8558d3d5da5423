"""Result layouts that follow an input's, for ops whose eager spelling keeps it.

Eager's elementwise ops give their result the input's layout, and SDPA gives its output
the query's. A q computed as ``q_proj(h).view(B, S, H, D).transpose(1, 2)`` is laid out
[B, S, H, D] under its [B, H, S, D] shape: kept so through rotary and attention, the
model's ``out.transpose(1, 2).reshape(B, S, H * D)`` before the output projection is a
view. A contiguous [B, H, S, D] result there costs a copy in the forward, another in the
backward, and in training one more saved tensor per layer.

An op's fake and its implementation must agree on the layout whatever kernel runs (a Hub
kernel, the reference), so the fake allocates with ``empty_following`` and the
implementation passes the kernel's result through ``following``, which copies only when
the kernel chose another layout.
"""

from __future__ import annotations

import torch
from torch import Tensor


def empty_following(x: Tensor, shape=None, dtype: torch.dtype | None = None) -> Tensor:
    """An empty tensor of ``shape`` (x's by default) whose dims are laid out in the order
    of x's (``torch.empty_like(x)`` when the shapes agree), as SDPA lays out its output;
    contiguous when x's last dim is not its innermost."""
    shape = tuple(x.shape) if shape is None else tuple(shape)
    dtype = x.dtype if dtype is None else dtype
    if x.dim() == 0 or x.stride(-1) != 1:
        return x.new_empty(shape, dtype=dtype)
    if shape == tuple(x.shape):
        return torch.empty_like(x, dtype=dtype)
    order = sorted(range(x.dim()), key=lambda i: x.stride(i), reverse=True)
    strides, step = [0] * len(shape), 1
    for i in reversed(order):
        strides[i] = step
        step *= shape[i]
    return x.new_empty_strided(shape, strides, dtype=dtype)


def following(x: Tensor, result: Tensor) -> Tensor:
    """``result`` in the layout of ``empty_following(x, result.shape, result.dtype)``."""
    if result.shape == x.shape and x.stride(-1) == 1 and result.stride() == x.stride():
        return result  # the kernel kept x's dense layout: nothing to allocate
    out = empty_following(x, result.shape, result.dtype)
    return result if out.stride() == result.stride() else out.copy_(result)
