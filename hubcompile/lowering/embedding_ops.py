"""``hubcompile::embedding_dense_backward``: ATen's embedding backward behind an op, so
that Inductor does not decompose it into an fp32 copy of the embedding
(passes/embedding_backward.py puts it in the graph)."""

from __future__ import annotations

import torch

aten = torch.ops.aten


@torch.library.custom_op("hubcompile::embedding_dense_backward", mutates_args=())
def embedding_dense_backward(grad_output: torch.Tensor, indices: torch.Tensor, num_weights: int) -> torch.Tensor:
    """ATen's embedding backward (rows of ``grad_output`` summed into [num_weights, H])."""
    return aten.embedding_dense_backward.default(grad_output, indices, num_weights, -1, False)


@embedding_dense_backward.register_fake
def _(grad_output, indices, num_weights):
    return grad_output.new_empty((num_weights, grad_output.shape[-1]))
