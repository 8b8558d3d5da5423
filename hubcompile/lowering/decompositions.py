"""The decomposition table hubcompile hands to Inductor: Inductor's own, less the
decompositions that cost a large-vocabulary training step its memory.

``aten.embedding_dense_backward``: Inductor decomposes it into an fp32 zeros tensor of
the embedding's full size, an index_put_ and a cast. With a 128256 x 2048 embedding
that is a 1 GiB fp32 buffer plus its 0.5 GiB bf16 cast, live at the end of the
backward next to the LM head's weight gradient (tied weights add the two); it set the
peak of the training step once the fused linear cross-entropy had removed the logits.
ATen's kernel accumulates in fp32 per row and writes the gradient in the weight's
dtype: the same numbers, a third of the memory. It is kept only where CUDA graphs are
off: the CUDA kernel sorts the indices and may synchronize, which a graph capture
forbids.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

aten = torch.ops.aten


@torch.library.custom_op("hubcompile::embedding_dense_backward", mutates_args=())
def embedding_dense_backward(grad_output: torch.Tensor, indices: torch.Tensor, num_weights: int, padding_idx: int,
                             scale_grad_by_freq: bool) -> torch.Tensor:
    """ATen's embedding backward behind an op Inductor cannot decompose (a plain fallback
    of the ATen op clashes with Inductor's registered decomposition on torch 2.11)."""
    return aten.embedding_dense_backward.default(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq)


@embedding_dense_backward.register_fake
def _(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    return grad_output.new_empty((num_weights, grad_output.shape[-1]))


def _embedding_dense_backward(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    return torch.ops.hubcompile.embedding_dense_backward(grad_output, indices, num_weights, padding_idx,
                                                         scale_grad_by_freq)


# ATen op -> (what runs it instead of Inductor's decomposition, why)
REPLACED = {
    aten.embedding_dense_backward.default: (
        _embedding_dense_backward, "its decomposition holds an fp32 copy of the embedding's gradient"),
}


def inductor_decompositions(cfg, cudagraphs: bool) -> dict | None:
    """The table for ``compile_fx(decompositions=...)``, or None for Inductor's default.
    Only with the linear_cross_entropy family on: it is part of large-vocabulary training."""
    if cudagraphs or not cfg.enabled("linear_cross_entropy"):
        return None
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    for op, (fn, why) in REPLACED.items():
        table[op] = fn
        log.debug("hubcompile: %s runs as ATen's kernel (%s)", op, why)
    return table
