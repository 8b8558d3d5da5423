"""The embedding's backward without an fp32 copy of the embedding.

Inductor decomposes ``aten.embedding_dense_backward`` into an fp32 zeros tensor of the
embedding's full size, an index_put_ that accumulates the gradient rows into it, and a
cast back to the weight's dtype. With a 128256 x 2048 bf16 embedding that is a 1 GiB fp32
buffer plus its 0.5 GiB cast, live at the end of the backward next to the LM head's
weight gradient (tied weights add the two): on an H200 it set the peak of a training
step once the fused linear cross-entropy had taken the logits out of the forward.

ATen's kernel accumulates in fp32 per row and writes the gradient in the weight's dtype:
the same numbers, a third of the memory. ``rewrite_embedding_backward`` finds the
decomposed form in the joint graph and puts ATen's kernel back, behind a hubcompile op
(Inductor would decompose the ATen op again; the op is in
lowering/embedding_ops.py). It is part of the linear_cross_entropy
family, and is skipped under CUDA graphs: the CUDA kernel sorts the indices and may
synchronize, which a graph capture forbids.

(Passing Inductor a decomposition table without this entry would be simpler, but a
custom table cannot be pickled into Inductor's cache key, and every compile would then
miss the FX graph cache.)
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

aten, prims = torch.ops.aten, torch.ops.prims
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _is(node, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target


def _match(put: torch.fx.Node):
    """(grad in its low-precision dtype, mask, indices, cast node) of the decomposed form
    ``cast(masked_index_put_accumulate(full([V, H], 0, fp32), mask, [indices],
    cast(grad, fp32)), grad.dtype)``, or None."""
    zeros, mask, index_list, values = put.args[:4]
    if not (_is(zeros, aten.full.default) and len(zeros.users) == 1 and zeros.args[1] == 0
            and zeros.kwargs.get("dtype") == torch.float32 and len(zeros.args[0]) == 2):
        return None
    if not (isinstance(index_list, (list, tuple)) and len(index_list) == 1 and _is(values, prims.convert_element_type.default)):
        return None
    grad = values.args[0]
    dtype = grad.meta.get("val").dtype if isinstance(grad, torch.fx.Node) and "val" in grad.meta else None
    users = list(put.users)
    if dtype not in _LOW_PRECISION or len(users) != 1:
        return None
    cast = users[0]
    if not (_is(cast, prims.convert_element_type.default) and cast.args[1] == dtype):
        return None
    return grad, mask, index_list[0], cast, zeros.args[0][0]


def rewrite_embedding_backward(graph: torch.fx.Graph) -> int:
    """Replace each decomposed low-precision embedding backward in ``graph``; returns how many."""
    from torch._inductor import config as inductor_config

    if inductor_config.triton.cudagraphs:
        return 0
    count = 0
    for put in list(graph.nodes):
        if not _is(put, aten._unsafe_masked_index_put_accumulate.default):
            continue
        found = _match(put)
        if found is None:
            continue
        grad, mask, indices, cast, num_weights = found
        with graph.inserting_before(cast):
            # rows masked out (padding_idx) contribute nothing, as in the decomposition
            masked = graph.call_function(aten.where.ScalarOther, (mask, grad, 0.0))
            new = graph.call_function(torch.ops.hubcompile.embedding_dense_backward.default,
                                      (masked, indices, num_weights))
        masked.meta["val"] = grad.meta["val"]
        new.meta["val"] = cast.meta.get("val")
        cast.replace_all_uses_with(new)
        count += 1
    if count:
        graph.eliminate_dead_code()
        log.debug("hubcompile: %d embedding backward(s) run as ATen's kernel, without an fp32 copy", count)
    return count
