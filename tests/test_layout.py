"""Result layouts that follow the input's (hubcompile/lowering/layout.py): the rules, the
rotary and attention ops keeping a transposed q's layout through fake and kernel alike,
and what it buys in a compiled training step."""

import pytest
import torch
import transformers as T

from hubcompile.lowering import attention_ops
from hubcompile.lowering.layout import empty_following, following
from numerics import assert_close_to_reference

# q as models make it: the projection's [B, S, H, D] viewed as [B, H, S, D]
TRANSPOSED = torch.randn(2, 7, 4, 16).transpose(1, 2)


def test_empty_following_lays_dims_out_in_the_inputs_order():
    assert empty_following(TRANSPOSED).stride() == TRANSPOSED.stride()
    # another last dim (attention's value width): the same dim order
    assert empty_following(TRANSPOSED, (2, 4, 7, 8)).stride() == torch.empty(2, 7, 4, 8).transpose(1, 2).stride()
    assert empty_following(TRANSPOSED, dtype=torch.bfloat16).dtype == torch.bfloat16
    # a last dim that is not innermost: contiguous
    every_other = torch.randn(2, 4, 7, 32)[..., ::2]
    assert empty_following(every_other).is_contiguous()


def test_following_copies_only_a_result_in_another_layout():
    kept = torch.randn(2, 7, 4, 16).transpose(1, 2)
    assert following(TRANSPOSED, kept) is kept
    contiguous = torch.randn(2, 4, 7, 16)
    moved = following(TRANSPOSED, contiguous)
    assert moved.stride() == TRANSPOSED.stride() and torch.equal(moved, contiguous)


@pytest.mark.parametrize("kernel", ["reference", "bundled:attention"])
def test_attention_op_keeps_q_layout_forward_and_backward(kernel):
    torch.manual_seed(0)
    q = torch.randn(2, 9, 4, 16).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 9, 2, 16).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 9, 2, 16).transpose(1, 2).requires_grad_()
    op = torch.ops.hubcompile.attention
    torch.library.opcheck(op, (q, k, v, None, 0.25, kernel, kernel, True))
    out = op(q, k, v, None, 0.25, kernel, kernel, True)
    assert out.stride() == q.stride()
    dout = torch.randn(out.shape)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert [g.stride() for g in grads] == [q.stride(), k.stride(), v.stride()]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_ops.reference(*leaves, None, 0.25, True)
    eager = attention_ops.reference(q, k, v, None, 0.25, True)
    assert_close_to_reference(out, eager, ref, torch.float32, "out")


def _saved_bytes(attn: str) -> int:
    """Bytes of the activations a compiled training step of a tiny Llama saves for its
    backward (weights left out)."""
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = attn
    model = T.LlamaForCausalLM(config).to(torch.bfloat16).train()
    ids = torch.randint(3, 96, (2, 33))
    step = torch.compile(lambda ids: model(ids, labels=ids).loss, backend="hubkernels")
    step(ids).backward()
    storages = {}

    def pack(t):
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step(ids)
    loss.backward()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in weights)


def test_eager_attention_training_saves_what_sdpa_saves(fresh):
    """Eager attention's `out.transpose(1, 2).contiguous()` copied SDPA's output once it
    was traced in, and the step saved both for the backward: one more [B, S, hidden]
    tensor per layer than the same model with sdpa attention."""
    sdpa, eager = _saved_bytes("sdpa"), _saved_bytes("eager")
    assert eager == sdpa, (eager, sdpa)
