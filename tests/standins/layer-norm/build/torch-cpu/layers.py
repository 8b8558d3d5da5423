"""kernels-community/layer-norm's LayerNorm layer: reads weight and variance_epsilon and,
like the real one, ignores a bias. Counts its calls."""
import torch
import torch.nn.functional as F
from torch import nn

CALLS = []


class LayerNorm(nn.Module):
    weight: torch.Tensor
    variance_epsilon: float

    def forward(self, hidden_states):
        CALLS.append(tuple(hidden_states.shape))
        n = hidden_states.shape[-1]
        return F.layer_norm(hidden_states.float(), (n,), self.weight.float(), None,
                            self.variance_epsilon).to(hidden_states.dtype)
