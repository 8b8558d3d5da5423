"""Hub layers as kernelize uses them: no ``__init__``, state read from the module they
replace, ``has_backward`` / ``can_torch_compile`` flags (tests only)."""

from collections import Counter

import torch
from torch import nn

CALLS: Counter = Counter()
WEIGHTS: list = []  # data_ptr of the weight of each LigerRMSNorm call: which module it served
MLP_WEIGHTS: list = []  # data_ptr of down_proj's weight in each LigerSwiGLUMLP call


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


class LigerSwiGLUMLP(nn.Module):
    """A SwiGLU MLP reading gate_proj, up_proj and down_proj, as liger's layer does."""

    def forward(self, x):
        CALLS["LigerSwiGLUMLP"] += 1
        MLP_WEIGHTS.append(self.down_proj.weight.data_ptr())
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class LigerPhi3SwiGLUMLP(nn.Module):
    """Phi-3's MLP: one fused gate_up_proj (gate rows first), then down_proj."""

    def forward(self, x):
        CALLS["LigerPhi3SwiGLUMLP"] += 1
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * torch.nn.functional.silu(gate))


class LigerGEGLUMLP(nn.Module):
    """A GELU-tanh gated MLP."""

    def forward(self, x):
        CALLS["LigerGEGLUMLP"] += 1
        gate = torch.nn.functional.gelu(self.gate_proj(x), approximate="tanh")
        return self.down_proj(gate * self.up_proj(x))


class liger_rotary_pos_emb_layer(nn.Module):  # noqa: N801 - the real layer's name
    """Like liger's kernel, it reads only the first half of cos and sin (transformers'
    cos/sin repeat it in the second)."""

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        CALLS["liger_rotary_pos_emb_layer"] += 1
        half = cos.shape[-1] // 2
        cos, sin = cos[..., :half].unsqueeze(unsqueeze_dim), sin[..., :half].unsqueeze(unsqueeze_dim)

        def rotate(x):
            x1, x2 = x[..., :half], x[..., half:]
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

        return rotate(q), rotate(k)


class LigerForCausalLMLossLayer(nn.Module):
    """transformers' causal-LM loss from the hidden states and the LM head's weight, with
    the real layer's signature (and its torch.compiler.disable)."""

    @torch.compiler.disable
    def forward(self, logits=None, labels=None, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                shift_labels=None, hidden_states=None, lm_head_weight=None, lm_head_bias=None, hidden_size=None,
                **kwargs):
        CALLS["LigerForCausalLMLossLayer"] += 1
        if shift_labels is None:
            labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        logits = torch.nn.functional.linear(hidden_states.view(-1, hidden_size), lm_head_weight, lm_head_bias)
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = torch.nn.functional.cross_entropy(logits.float(), shift_labels.reshape(-1), ignore_index=ignore_index,
                                                 reduction=reduction)
        return loss / num_items_in_batch if reduction == "sum" else loss
