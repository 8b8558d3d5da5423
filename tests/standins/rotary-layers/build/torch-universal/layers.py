from collections import Counter

import torch
from torch import nn

CALLS: Counter = Counter()


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class apply_rotary_transformers(nn.Module):  # noqa: N801 - the real layer's name
    has_backward = False

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        CALLS["apply_rotary_transformers"] += 1
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
