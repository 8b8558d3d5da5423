"""hubcompile-attention: attention through PyTorch's fused scaled_dot_product_attention
(flash, cuDNN or memory-efficient kernels, chosen by PyTorch for the device), with
grouped-query attention done by the kernel (``enable_gqa``) so k/v are never repeated.

q: [B, H, S, D]; k, v: [B, KV, S, D] with H % KV == 0; mask: additive, broadcastable to
[B, H, S, S], or None.
"""

import torch
import torch.nn.functional as F


def _rows_that_see_nothing(q, mask):
    """(q, mask) with the query rows whose every key is masked by the dtype's minimum (left
    padding) made to attend every key with equal weight, as eager attention does for them
    (min + score rounds to min): their mask and q are zeroed. SDPA's fused backward gets
    those rows wrong otherwise: their log-sum-exp loses log(S) next to -3.4e38."""
    blocked = (mask <= torch.finfo(mask.dtype).min / 2) & (mask > float("-inf"))
    dead = blocked.all(-1, keepdim=True)
    return q.masked_fill(dead, 0), mask.masked_fill(dead, 0)


def attention_forward(q, k, v, mask, scale: float, is_causal: bool = False):
    if mask is not None and mask.dtype != torch.bool:
        q, mask = _rows_that_see_nothing(q, mask)
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


def attention_backward(dout, q, k, v, mask, scale: float, is_causal: bool = False):
    """(dq, dk, dv): the fused backward on a recomputed forward. torch.func.vjp, not
    autograd.grad: a custom op's implementation runs below autograd, where autograd
    records nothing."""
    _, vjp = torch.func.vjp(lambda q_, k_, v_: attention_forward(q_, k_, v_, mask, scale, is_causal), q, k, v)
    return vjp(dout)


# Written in differentiable torch ops: traced into the compiled graph in place of the op,
# with its autograd in training (hubcompile/passes/traced_attention.py), so the backward
# reads the forward's saved log-sum-exp instead of running the forward again.
JOINT_TRACEABLE = ("attention_forward",)
