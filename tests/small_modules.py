"""Small hand-written modules, one per family, spelled as model code spells them."""

import torch
import torch.nn.functional as F
from torch import nn


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden, inter, act="silu", bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act = nn.SiLU() if act == "silu" else nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """RMSNorm -> gated MLP -> residual add -> RMSNorm (fused add+norm)."""

    def __init__(self, hidden=16, inter=24, act="silu"):
        super().__init__()
        self.norm1 = LlamaRMSNorm(hidden)
        self.mlp = SwiGLU(hidden, inter, act)
        self.norm2 = LlamaRMSNorm(hidden)

    def forward(self, x):
        h = x + self.mlp(self.norm1(x))
        return self.norm2(h)


class Phi3MLP(nn.Module):
    def __init__(self, hidden=16, inter=12):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class GemmaRMSNorm(nn.Module):
    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.randn(hidden))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class ResidualNorm(nn.Module):
    """h = x + residual; norm(h), returning both (a decoder layer's residual stream)."""

    def __init__(self, hidden=16):
        super().__init__()
        self.norm = LlamaRMSNorm(hidden, eps=1e-5)

    def forward(self, x, residual):
        h = residual + x
        return self.norm(h), h
