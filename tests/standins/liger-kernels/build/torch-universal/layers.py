"""Hub layers as kernelize uses them: no ``__init__``, state read from the module they
replace, ``has_backward`` / ``can_torch_compile`` flags (tests only)."""

from collections import Counter

import torch
from torch import nn

CALLS: Counter = Counter()
WEIGHTS: list = []  # data_ptr of the weight of each LigerRMSNorm call: which module it served


class _RMSNormFunction(torch.autograd.Function):
    """An old-style autograd.Function, as liger writes its kernels (ctx in forward)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        n = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * n

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        CALLS["LigerRMSNorm.backward"] += 1
        xf, dyf = x.float(), dy.float()
        n = xf * rstd
        dn = dyf * weight.float()
        dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
        dw = (dyf * n.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), None


class _RMSNormFunctionInPlace(_RMSNormFunction):
    """liger's in_place=True: the input gradient is written over the output gradient."""

    @staticmethod
    def backward(ctx, dy):
        dx, dw, _ = _RMSNormFunction.backward(ctx, dy)
        CALLS["LigerRMSNormInPlace.backward"] += 1
        return dy.copy_(dx), dw, None


class LigerRMSNormInPlace(nn.Module):
    """The same layer with liger's default in-place backward."""

    has_backward = True

    def forward(self, hidden_states):
        CALLS["LigerRMSNormInPlace"] += 1
        return _RMSNormFunctionInPlace.apply(hidden_states, self.weight, self.variance_epsilon)


class LigerRMSNorm(nn.Module):
    """Llama RMSNorm with its own backward; liger's layer cannot be traced by torch.compile."""

    has_backward = True
    can_torch_compile = False

    def forward(self, hidden_states):
        CALLS["LigerRMSNorm"] += 1
        WEIGHTS.append(self.weight.data_ptr())
        return _RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


class RMSNormInferenceOnly(nn.Module):
    """The same computation, with no backward: kernelize keeps it out of training."""

    has_backward = False
    can_torch_compile = True

    def forward(self, hidden_states):
        CALLS["RMSNormInferenceOnly"] += 1
        dtype = hidden_states.dtype
        h = hidden_states.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class LigerCausalConv1d(nn.Module):
    """transformers' causal_conv1d_fn(hidden_states, weight, bias, activation) as a layer."""

    has_backward = True

    def forward(self, hidden_states, weight, bias=None, activation=None):
        CALLS["LigerCausalConv1d"] += 1
        width = weight.shape[-1]
        out = torch.nn.functional.conv1d(hidden_states, weight.unsqueeze(1), bias, padding=width - 1,
                                         groups=hidden_states.shape[1])[..., : hidden_states.shape[-1]]
        return torch.nn.functional.silu(out) if activation in ("silu", "swish") else out
