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


class UserAttention(torch.nn.Module):
    """Attention as people write it by hand: divided by sqrt(d) with an additive mask,
    or multiplied by a scale with a bool mask applied by masked_fill."""

    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(2, 3))
        if self.form == "div_add":
            w = scores / (q.shape[-1] ** 0.5) + mask
        else:
            w = (scores * q.shape[-1] ** -0.5).masked_fill(mask, float("-inf"))
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", ["div_add", "mul_fill"])
def test_user_written_forms(fresh, form, dtype):
    torch.manual_seed(0)
    s = 7
    # as models lay them out: projected to [B, S, H, D], transposed to [B, H, S, D]
    q, k, v = (torch.randn(2, s, 3, 8, dtype=dtype).transpose(1, 2) for _ in range(3))
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]  # True: not allowed
    mask = causal if form == "mul_fill" else torch.zeros(1, 1, s, s, dtype=dtype).masked_fill(causal, -1e4)
    model = UserAttention(form)
    with torch.no_grad():
        out = torch.compile(model, backend="hubkernels")(q, k, v, mask)
        eager = model(q, k, v, mask)
        ref = model(q.double(), k.double(), v.double(), mask if form == "mul_fill" else mask.double())
    assert sum(r.replaced.get("attention", 0) for r in fresh) == 1, fresh[-1].refused
    assert_close_to_reference(out, eager, ref, dtype, form)


class SoftmaxInDtype(torch.nn.Module):
    """Llama 4's eager attention: the softmax in q's dtype, no dtype=float32."""

    def forward(self, q, k, v, mask):
        b, kv, s, d = k.shape
        n_rep = q.shape[1] // kv
        if n_rep > 1:  # transformers' repeat_kv
            k, v = (t[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d) for t in (k, v))
        w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + mask
        return torch.matmul(torch.softmax(w, dim=-1), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)])
def test_softmax_in_dtype_training(fresh, dtype, heads, kv_heads):
    # In bf16 its backward differs from the fp32 softmax's: a training graph is its own spelling.
    torch.manual_seed(0)
    s = 7
    q = torch.randn(2, s, heads, 8, dtype=dtype).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(2, s, kv_heads, 8, dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(2))
    mask = _causal_mask(s, dtype).cpu()
    model = SoftmaxInDtype()
    out, eager = torch.compile(model, backend="hubkernels")(q, k, v, mask), model(q, k, v, mask)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = model(*leaves64, mask.double())
    assert sum(r.replaced.get("attention", 0) for r in fresh) == 1, fresh[-1].refused
    assert_close_to_reference(out, eager, ref, dtype, "output")
    cot = torch.randn_like(ref)
    for name, g_new, g_eager, g_ref in zip("qkv", torch.autograd.grad(out, (q, k, v), cot.to(dtype)),
                                           torch.autograd.grad(eager, (q, k, v), cot.to(dtype)),
                                           torch.autograd.grad(ref, leaves64, cot)):
        assert_close_to_reference(g_new, g_eager, g_ref, dtype, f"grad {name}")
