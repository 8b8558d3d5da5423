"""Small modules for the graph-diff report snapshots (test_explain.py). Kept in their
own file so that the source lines the report quotes do not move when tests change."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden=16, weight_shape=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(weight_shape or hidden))
        self.eps = 1e-6

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class UnweightedRMSNorm(nn.Module):
    """No weight (Mamba mixers' inner norms, q/k L2 norms): the weightless spelling."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class GatedMLP(nn.Module):
    def __init__(self, act="silu"):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 24), nn.Linear(16, 24), nn.Linear(24, 16)
        self.act = nn.SiLU() if act == "silu" else nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class Rotary(nn.Module):
    def forward(self, q, cos, sin):
        half = q.shape[-1] // 2
        rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
        return q * cos + rotated * sin


class Attention(nn.Module):
    def forward(self, q, k, v, mask):
        w = torch.matmul(q, k.transpose(2, 3)) * 0.25
        w = F.softmax(w + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v)


class CausalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 4, groups=8, padding=3)

    def forward(self, x):
        return F.silu(self.conv(x)[..., : x.shape[-1]])


class ReversedRMSNorm(nn.Module):
    """rsqrt(...) * x, then a weight: no spelling has this operand order, a "not matched" near miss."""

    def __init__(self, hidden=16):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden))

    def forward(self, x):
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * x * self.weight
