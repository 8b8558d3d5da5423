"""The eager-attention family: the op against float64, and real models whose eager
attention (grouped-query or not, causal mask built in the graph) becomes one fused op."""

import pytest
import torch

from hubcompile.lowering import attention_ops
from numerics import assert_close_to_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
op = torch.ops.hubcompile.attention


def _causal_mask(s, dtype):
    mask = torch.full((s, s), torch.finfo(dtype).min, dtype=dtype, device=DEVICE).triu(1)
    return mask[None, None]


@pytest.mark.parametrize("kernel", ["reference", "bundled:attention"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,kv_heads,masked", [(4, 2, True), (4, 4, True), (6, 2, False)])
def test_op_against_float64(kernel, dtype, heads, kv_heads, masked):
    torch.manual_seed(0)
    q = torch.randn(2, heads, 9, 16, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(2, kv_heads, 9, 16, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(2, kv_heads, 9, 16, device=DEVICE, dtype=dtype, requires_grad=True)
    mask = _causal_mask(9, dtype) if masked else None
    scale = 16 ** -0.5
    torch.library.opcheck(op, (q, k, v, mask, scale, kernel, kernel))
    out = op(q, k, v, mask, scale, kernel, kernel)
    eager = attention_ops.reference(q, k, v, mask, scale)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_ops.reference(*leaves64, mask.double() if masked else None, scale)
    assert_close_to_reference(out, eager, ref, dtype, "output")
    cot = torch.randn_like(ref)
    for name, g_new, g_eager, g_ref in zip("qkv", torch.autograd.grad(out, (q, k, v), cot.to(dtype)),
                                           torch.autograd.grad(eager, (q, k, v), cot.to(dtype)),
                                           torch.autograd.grad(ref, leaves64, cot)):
        assert g_new.shape == g_ref.shape
        assert_close_to_reference(g_new, g_eager, g_ref, dtype, f"grad {name}")
