"""The layers of kernels-community/liger-kernels (v3), as that repo's ``layers.py`` defines
them (FIELD_NOTES 3b and 6), over the liger-kernel package from PyPI: the same liger
autograd Functions and Triton kernels, with the Hub layer conventions (no ``__init__``,
state read from the module the layer replaces, ``has_backward`` / ``can_torch_compile``).

``liger_repo.build`` turns this file into a repo in the Hub layout at test time; the GPU
benchmark (bench/kernel_mapping.py) builds the same repo.
"""

import torch
from liger_kernel.ops.rms_norm import LigerRMSNormFunction
from liger_kernel.ops.rope import LigerRopeFunction
from liger_kernel.ops.swiglu import LigerSiLUMulFunction
from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss
from torch import nn


class LigerRMSNorm(nn.Module):
    """Llama's RMSNorm (``self.weight``, ``self.variance_epsilon``): offset 0, the "llama"
    casting mode, and liger's default in-place backward."""

    def forward(self, hidden_states):
        return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", True, None)


class LigerSwiGLUMLP(nn.Module):
    """A SwiGLU MLP reading ``gate_proj``, ``up_proj`` and ``down_proj``."""

    def forward(self, x):
        return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


class liger_rotary_pos_emb_layer(nn.Module):  # noqa: N801 - the repo's name, a function made a layer
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``."""

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return LigerRopeFunction.apply(q, k, cos, sin, None, unsqueeze_dim)


class LigerForCausalLMLossLayer(nn.Module):
    """transformers' ``ForCausalLMLoss`` taking the hidden states and the LM head's weight
    instead of the logits (fused linear cross-entropy); opaque to torch.compile."""

    @torch.compiler.disable
    def forward(self, logits=None, labels=None, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                shift_labels=None, hidden_states=None, lm_head_weight=None, lm_head_bias=None, hidden_size=None,
                **kwargs):
        return LigerForCausalLMLoss(hidden_states, lm_head_weight, labels, hidden_size, num_items_in_batch,
                                    ignore_index, shift_labels, bias=lm_head_bias, **kwargs)
