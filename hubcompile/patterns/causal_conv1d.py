"""Causal depthwise conv1d, as Mamba/Mamba2 write it:

    nn.Conv1d(D, D, W, groups=D, padding=W - 1)(x)[..., :L]      (then often SiLU)
    F.conv1d(F.pad(x, (W - 1, 0)), w, b, groups=D)

with or without bias, with or without a following SiLU. The checks make sure it is
depthwise (groups == channels, one input channel per group), causal (padding W-1 and a
slice back to the length, or a left pad), and of a width the kernels take (W <= 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lowering import causal_conv1d_ops as ops
from .framework import Family, Spelling, chosen_kernels, meta_val, same_device

F32, BF16 = torch.float32, torch.bfloat16
MAX_WIDTH = 4


def _sliced(x, w, b):
    return F.conv1d(x, w, b, padding=w.shape[-1] - 1, groups=x.shape[1])[..., : x.shape[-1]]


def _left_padded(x, w, b):
    return F.conv1d(F.pad(x, (w.shape[-1] - 1, 0)), w, b, groups=x.shape[1])


def _check(match) -> str | None:
    x, w = meta_val(match.kwargs["x"]), meta_val(match.kwargs["w"])
    b = meta_val(match.kwargs["b"]) if "b" in match.kwargs else None
    if not same_device(*[match.kwargs[k] for k in ("x", "w", "b") if k in match.kwargs]):
        return "inputs on different devices"
    if x.dim() != 3 or w.dim() != 3 or w.shape[1] != 1 or w.shape[0] != x.shape[1]:
        return f"not depthwise: x {tuple(x.shape)}, weight {tuple(w.shape)}"
    if w.shape[-1] > MAX_WIDTH:
        return f"kernel width {w.shape[-1]} > {MAX_WIDTH}"
    if b is not None and tuple(b.shape) != (x.shape[1],):
        return f"bias shape {tuple(b.shape)} is not ({x.shape[1]},)"
    return None


def _spelling(form_name, form, bias: bool, silu: bool) -> Spelling:
    def conv(x, w, b):
        out = form(x, w, b)
        return F.silu(out) if silu else out

    if bias:
        def search(x, w, b):
            return conv(x, w, b)

        def replace(x, w, b):
            return ops.causal_conv1d(x, w.squeeze(1), b, silu, *chosen_kernels())

        def inputs(dt):
            return [torch.randn(2, 6, 9, dtype=dt), torch.randn(6, 1, 4, dtype=dt), torch.randn(6, dtype=dt)]
    else:
        def search(x, w):
            return conv(x, w, None)

        def replace(x, w):
            return ops.causal_conv1d(x, w.squeeze(1), None, silu, *chosen_kernels())

        def inputs(dt):
            return [torch.randn(2, 6, 9, dtype=dt), torch.randn(6, 1, 4, dtype=dt)]

    name = f"{form_name}{'_bias' if bias else ''}{'_silu' if silu else ''}"
    return Spelling(name, search, replace, inputs, [(F32,), (BF16,)], check=_check, op="causal_conv1d",
                    backward_op="causal_conv1d_backward", anchor="x",
                    # cut: batch (and sequence); sampled: (batch, channel) rows, each a
                    # causal scan over the whole sequence with its channel's weight and bias
                    shrink_dims=(0, 2), row_dims=(0, 1), input_rows={"w": {0: 1}, "b": {0: 1}})


_FORMS = {"conv_slice": _sliced, "pad_conv": _left_padded}

FAMILY = Family(
    name="causal_conv1d",
    description="causal depthwise conv1d (Mamba), with optional bias and SiLU",
    # With SiLU first: the conv alone would match inside it and leave the SiLU behind.
    stages=[[_spelling(n, f, bias, True) for n, f in _FORMS.items() for bias in (True, False)],
            [_spelling(n, f, bias, False) for n, f in _FORMS.items() for bias in (True, False)]],
)
