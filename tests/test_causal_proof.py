"""causal_proof: an attention mask proven causal from how the graph builds it, for every
sequence length, on hand-written masks. Each mask is checked on Dynamo's graph (the SDPA
call, as causal_mask sees it before AOTAutograd) and on the ATen graph (as the attention
op sees it in Inductor's joint graph), with symbolic sizes; a proven mask is evaluated
eagerly at several lengths to be sure it is causal there."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from hubcompile.fx_utils import meta_val
from hubcompile.patterns.causal_mask import is_causal, verdict
from hubcompile.patterns.causal_proof import Unproven, prove

def _idx(s, offset=0):
    return torch.arange(s) + offset


def tril_bool(q):
    s = q.shape[-2]
    return torch.ones(s, s, dtype=torch.bool).tril()


def arange_le(q):
    s = q.shape[-2]
    return _idx(s)[None, :] <= _idx(s)[:, None]


def triu_neg_inf(q):
    s = q.shape[-2]
    return torch.full((s, s), float("-inf")).triu(1)


def masked_fill_min_bf16(q):
    s = q.shape[-2]
    keep = torch.ones(s, s, dtype=torch.bool).tril()
    return torch.zeros(s, s, dtype=torch.bfloat16).masked_fill(~keep, torch.finfo(torch.bfloat16).min)


def transformers_packed(q):
    """transformers' sdpa_mask under torch.compile without a cache: causal, and the same
    packed segment (from positions it made itself), [B, 1, S, S], to an additive mask."""
    b, s = q.shape[0], q.shape[-2]
    pos = _idx(s).unsqueeze(0).expand(b, -1)
    diff = torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1)
    segment = (diff != 1).cumsum(-1)
    bi, qi, ki = torch.arange(b)[:, None, None, None], _idx(s)[None, None, :, None], _idx(s)[None, None, None, :]
    allowed = qi.new_ones((), dtype=torch.bool) & (ki <= qi) & (segment[bi, qi] == segment[bi, ki])
    return torch.where(allowed.expand(b, -1, s, s), torch.zeros(()), torch.finfo(torch.float32).min)


def pytorch_docs_inplace(q):
    """The reference code of F.scaled_dot_product_attention's documentation."""
    s = q.shape[-2]
    bias = torch.zeros(s, s, dtype=q.dtype)
    keep = torch.ones(s, s, dtype=torch.bool).tril(diagonal=0)
    bias.masked_fill_(keep.logical_not(), float("-inf"))
    return bias


def cache_position_legacy(q):
    """transformers 4.4x's _prepare_4d_causal_attention_mask_with_cache_position, with no
    cache (past length 0)."""
    b, s = q.shape[0], q.shape[-2]
    past = 0
    cache_position = torch.arange(past, past + s)
    mask = torch.full((s, s), torch.finfo(torch.float32).min).triu(1)
    mask *= torch.arange(s) > cache_position.reshape(-1, 1)
    return mask[None, None, :, :].expand(b, 1, -1, -1)


def symbolic_offsets_cancel(q):
    s = q.shape[-2]
    return _idx(s, s)[None, :] <= _idx(s, s)[:, None]  # both offset by the length


POSITIVE = [tril_bool, arange_le, triu_neg_inf, masked_fill_min_bf16, transformers_packed, pytorch_docs_inplace,
            cache_position_legacy, symbolic_offsets_cancel]


def sliding_window(q):
    s = q.shape[-2]
    qi, ki = _idx(s)[:, None], _idx(s)[None, :]
    return (ki <= qi) & (qi - ki < 3)


def offset_one(q):
    s = q.shape[-2]
    return _idx(s)[None, :] <= _idx(s)[:, None] + 1


def diagonal_excluded(q):
    s = q.shape[-2]
    return torch.ones(s, s, dtype=torch.bool).tril(-1)


def diagonal_blocked(q):
    s = q.shape[-2]
    return torch.full((s, s), float("-inf")).triu(0)


def bias(q):
    s = q.shape[-2]
    return torch.full((s, s), float("-inf")).triu(1) + 1.0


def batch_dependent(q):
    b, s = q.shape[0], q.shape[-2]
    causal = (_idx(s)[None, :] <= _idx(s)[:, None])[None, None]
    return causal | (torch.arange(b)[:, None, None, None] == 0)


def chunked(q):
    s = q.shape[-2]
    qi, ki = _idx(s)[:, None], _idx(s)[None, :]
    return (ki <= qi) & (ki // 4 == qi // 4)


def float_positions(q):
    s = q.shape[-2]
    return torch.arange(s).float()[None, :] <= torch.arange(s).float()[:, None]


def written_through_view(q):
    s = q.shape[-2]
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    mask[0].fill_(True)
    return mask


# (builder, what the reason says on Dynamo's graph under dynamic=True)
NEGATIVE = [
    (sliding_window, "a query sees the keys where (-q + k + 2 >= 0 and q - k >= 0)"),
    (offset_one, "a query sees the keys where (q - k + 1 >= 0)"),
    (diagonal_excluded, "a query sees the keys where (q - k - 1 >= 0)"),
    (diagonal_blocked, "a query sees the keys where (q - k - 1 >= 0)"),
    (bias, "a bias, not a mask"),
    (batch_dependent, "a query sees the keys where"),
    (chunked, "the proof does not cover floordiv"),
    (written_through_view, "the mask is written through a view"),
]


def _dtype(builder):
    return torch.bfloat16 if builder is masked_fill_min_bf16 else torch.float32


def dynamo_verdicts(builder, dynamic, seq=7, keys=None, extra=None):
    """causal_mask's verdict on each SDPA call of ``builder``'s mask, as Dynamo captures it."""
    found = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.target is torch._C._nn.scaled_dot_product_attention:
                found.append(verdict(node.kwargs["attn_mask"], node, meta_val(node.args[0]), meta_val(node.args[1])))
        return gm.forward

    def attend(q, k, *rest):
        return F.scaled_dot_product_attention(q, k, k, attn_mask=builder(q, *rest))

    torch._dynamo.reset()
    dtype = _dtype(builder)
    q = torch.randn(2, 3, seq, 8, dtype=dtype)
    k = torch.randn(2, 3, keys or seq, 8, dtype=dtype)
    torch.compile(attend, backend=backend, dynamic=dynamic)(q, k, *([extra] if extra is not None else []))
    torch._dynamo.reset()
    return found


def aten_proof(builder, seq=7):
    """None, or why the proof stops, on ``builder``'s ATen graph with symbolic sizes."""
    q = torch.randn(2, 3, seq, 8, dtype=_dtype(builder))
    gm = make_fx(builder, tracing_mode="symbolic", decomposition_table=select_decomp_table())(q)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    fake_q = meta_val(next(n for n in gm.graph.nodes if n.op == "placeholder"))
    try:
        return prove(output.args[0], output, fake_q, fake_q)
    except Unproven as e:
        return e.reason


def causal_at(builder, lengths=range(2, 9)) -> bool:
    """Whether the eager mask is exactly causal at each length."""
    for s in lengths:
        q = torch.zeros(2, 3, s, 8, dtype=_dtype(builder))
        if is_causal(builder(q), 2, s, s) is not None:
            return False
    return True


@pytest.mark.parametrize("builder", POSITIVE, ids=lambda f: f.__name__)
def test_causal_masks_are_proven(builder):
    assert causal_at(builder)
    assert dynamo_verdicts(builder, dynamic=True) == [None]
    assert aten_proof(builder) is None
    assert dynamo_verdicts(builder, dynamic=False) == [None]  # static shapes: proven, not evaluated


@pytest.mark.parametrize("builder,why", NEGATIVE, ids=lambda x: getattr(x, "__name__", ""))
def test_other_masks_are_never_proven(builder, why):
    assert not causal_at(builder)
    (reason,) = dynamo_verdicts(builder, dynamic=True)
    assert reason is not None and why in reason, reason
    assert aten_proof(builder) is not None
    # static shapes: what the proof leaves is evaluated, and found not causal
    (static,) = dynamo_verdicts(builder, dynamic=False)
    assert static is not None


MIN32 = torch.finfo(torch.float32).min  # a global float: Dynamo makes it an input under dynamic=True


def lifted_fill(q):
    s = q.shape[-2]
    return torch.full((s, s), MIN32).triu(1)


@pytest.mark.parametrize("builder,why", [
    # causal up to 2**24 keys, not beyond: float32 rounds the positions
    (float_positions, "an index held in torch.float32"),
    # the fill value is read at each call: another value would not mask
    (lifted_fill, "the graph input g_min32_ (a Python float Dynamo made an input"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_causal_here_but_not_provably(builder, why):
    """Causal at these lengths and these values, but not for every call the graph takes."""
    assert causal_at(builder)
    (reason,) = dynamo_verdicts(builder, dynamic=True)
    assert reason is not None and why in reason, reason


def padding_from_input(q, padding):
    s = q.shape[-2]
    causal = _idx(s)[None, None, None, :] <= _idx(s)[None, None, :, None]
    return causal & padding[:, None, None, :]


def positions_from_input(q, position_ids):
    """A packed-sequence check whose positions the caller passed in."""
    diff = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1)
    segment = (diff != 1).cumsum(-1)
    s = q.shape[-2]
    qi, ki = _idx(s)[None, :, None], _idx(s)[None, None, :]
    return ((ki <= qi) & (segment[:, :, None] == segment[:, None, :]))[:, None]


@pytest.mark.parametrize("builder,extra", [
    (padding_from_input, torch.ones(2, 7, dtype=torch.bool)),
    (positions_from_input, torch.arange(7).expand(2, 7)),
], ids=["padding", "position_ids"])
def test_masks_from_inputs_are_kept(builder, extra):
    """All ones and plain positions here, but another call may pass anything."""
    for dynamic in (True, False):
        (reason,) = dynamo_verdicts(builder, dynamic, extra=extra)
        assert reason is not None and "computed from the graph input" in reason, reason


def test_queries_over_more_keys_are_kept():
    """A cache of 2 before 7 queries: query i sees keys 0..i+2, which SDPA's causal mode
    (aligned top-left) would not give."""

    def with_cache(q):
        s = q.shape[-2]
        return _idx(s + 2)[None, :] <= _idx(s, 2)[:, None]

    (reason,) = dynamo_verdicts(with_cache, dynamic=True, keys=9)
    assert "7 queries over 9 keys" in reason or "queries over" in reason, reason


def test_a_write_after_the_read_does_not_count():
    """Dynamo's graph reads a tensor by node: the first SDPA reads the mask before it is
    written, the second after."""
    found = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.target is torch._C._nn.scaled_dot_product_attention:
                found.append(verdict(node.kwargs["attn_mask"], node, meta_val(node.args[0]), meta_val(node.args[1])))
        return gm.forward

    def attend_twice(q):
        s = q.shape[-2]
        mask = torch.ones(s, s, dtype=torch.bool).tril()
        first = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        mask.fill_(True)
        return first + F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    torch._dynamo.reset()
    torch.compile(attend_twice, backend=backend, dynamic=True)(torch.randn(2, 3, 7, 8))
    torch._dynamo.reset()
    assert found[0] is None and found[1] is not None, found


def _random_mask(rng: random.Random):
    """A mask from a small grammar: comparisons of key and query indices with offsets in
    {-1, 0, 1}, combined with &, |, ~, as a bool mask or an additive one."""
    ops = ["<=", "<", ">=", ">"]

    def atom():
        op, d = rng.choice(ops), rng.choice([-1, 0, 1])
        return lambda ki, qi: {"<=": ki <= qi + d, "<": ki < qi + d, ">=": ki >= qi + d, ">": ki > qi + d}[op]

    def expr(depth):
        if depth == 0 or rng.random() < 0.4:
            return atom()
        kind = rng.choice(["and", "or", "not"])
        a, b = expr(depth - 1), expr(depth - 1)
        if kind == "not":
            return lambda ki, qi: ~a(ki, qi)
        return (lambda ki, qi: a(ki, qi) & b(ki, qi)) if kind == "and" else (lambda ki, qi: a(ki, qi) | b(ki, qi))

    body, additive = expr(2), rng.random() < 0.5

    def build(q):
        s = q.shape[-2]
        allowed = body(_idx(s)[None, :], _idx(s)[:, None])
        return torch.zeros(s, s).masked_fill(~allowed, float("-inf")) if additive else allowed

    return build


def test_random_masks_are_proven_only_when_causal():
    """Never a proof for a mask that is not causal; and the causal ones of these spellings
    (one comparison after simplification) are proven."""
    rng = random.Random(0)
    proven = 0
    for _ in range(40):
        build = _random_mask(rng)
        if aten_proof(build) is None:
            proven += 1
            assert causal_at(build, range(2, 10))
    assert proven >= 2, proven
