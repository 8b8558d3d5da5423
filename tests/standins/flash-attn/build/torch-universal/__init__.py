"""Stand-in for kernels-community/flash-attn2 (tests only): ``flash_attn_func`` with its
calling convention ([B, S, H, D] tensors, a causal flag, fewer k/v heads for grouped-query
attention), computed with PyTorch's SDPA. ``CALLS`` counts calls by their causal flag."""

from collections import Counter

import torch
import torch.nn.functional as F

CALLS: Counter = Counter()

__all__ = ["flash_attn_func"]


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    CALLS["causal" if causal else "full"] += 1
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale,
                                         is_causal=causal, enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)
