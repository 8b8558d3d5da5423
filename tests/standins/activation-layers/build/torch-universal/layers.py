from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

CALLS: Counter = Counter()


class Silu(nn.Module):
    can_torch_compile = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS["Silu"] += 1
        return F.silu(x)


class GeluTanh(nn.Module):
    can_torch_compile = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS["GeluTanh"] += 1
        return F.gelu(x, approximate="tanh")


class SiluAndMul(nn.Module):
    """Forward only, as the community kernel: used in inference, not in training."""

    has_backward = False
    can_torch_compile = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS["SiluAndMul"] += 1
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
