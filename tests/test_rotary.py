"""The rotary embedding family: the op against float64 with each kernel, snapshots of
rewritten graphs per spelling, and GPT-OSS's rotation through transformers' own code
(its model, with mixture-of-experts layers, is costly to compile for a CPU test). The
other real models (Llama, GPT-NeoX with partial rotary, GPT-J interleaved) are in
test_models.py."""

from pathlib import Path

import pytest
import torch
from expecttest import TestCase
from torch import nn

import hubcompile
from hubcompile.lowering import rotary_ops
from hubcompile.lowering.kernels import BUNDLED_ROOT
from numerics import assert_close_to_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = ["reference", "bundled:rotary", f"local:{Path(BUNDLED_ROOT) / 'rotary' / 'build' / 'torch-cuda'}"]
op = torch.ops.hubcompile.rotary


# ------------------------------------------------------------------------------ the op


@pytest.mark.parametrize("kernel", KERNELS, ids=["reference", "bundled", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("rot_dim", [12, 6], ids=["full", "partial"])
def test_op_against_float64(kernel, dtype, interleaved, rot_dim):
    # q [B, H, S, D] with cos [B, 1, S, R] (Llama's unsqueeze(1)); a transposed q, as the
    # models' view(...).transpose(1, 2) gives.
    x = torch.randn(2, 5, 3, 12, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_()
    cos, sin = (torch.randn(2, 1, 5, rot_dim, device=DEVICE, dtype=dtype) for _ in range(2))
    torch.library.opcheck(op, (x, cos, sin, interleaved, kernel, kernel))
    out = op(x, cos, sin, interleaved, kernel, kernel)
    eager = rotary_ops.reference(x, cos, sin, interleaved)
    x64 = x.detach().double().requires_grad_()
    ref = rotary_ops.reference(x64, cos.double(), sin.double(), interleaved)
    # laid out like x, as eager's result is: SDPA then gives its output q's layout, and
    # the model's transpose back to [B, S, H * D] is a view
    assert out.shape == eager.shape and out.dtype == eager.dtype and out.stride() == x.stride()
    assert_close_to_reference(out, eager, ref, dtype, "output")
    # partial rotary passes the rest through exactly
    torch.testing.assert_close(out[..., rot_dim:], x[..., rot_dim:], rtol=0, atol=0)
    cot = torch.randn_like(ref)
    (dx,) = torch.autograd.grad(out, x, cot.to(dtype))
    (dx_eager,) = torch.autograd.grad(eager, x, cot.to(dtype))
    (dx_ref,) = torch.autograd.grad(ref, x64, cot)
    assert dx.dtype == x.dtype
    assert_close_to_reference(dx, dx_eager, dx_ref, dtype, "grad x")


def test_op_promotes_like_eager():
    x = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    out = op(x, cos, sin, False, "bundled:rotary", "bundled:rotary")
    assert out.dtype == torch.float32 == rotary_ops.reference(x, cos, sin, False).dtype
    (dx,) = torch.autograd.grad(out.sum(), x)
    assert dx.dtype == torch.bfloat16


def test_op_refuses_cos_gradients_and_bad_widths():
    x = torch.randn(1, 2, 3, 8, requires_grad=True)
    cos = torch.randn(1, 1, 3, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="cos and sin must not require grad"):
        op(x, cos, cos.detach(), False).sum().backward()
    with pytest.raises(RuntimeError, match="must be even"):
        op(x, torch.randn(1, 1, 3, 5), torch.randn(1, 1, 3, 5), False)


# ------------------------------------------------------------------ spellings, snapshots


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):  # GPT-J's spelling, indexing every dim
    x1 = x[:, :, :, ::2]
    x2 = x[:, :, :, 1::2]
    x = torch.stack((-x2, x1), dim=-1)
    return x.flatten(-2)


class LlamaRope(nn.Module):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)."""

    def __init__(self, unsqueeze_dim=1):
        super().__init__()
        self.unsqueeze_dim = unsqueeze_dim

    def forward(self, q, k, cos, sin):
        cos, sin = cos.unsqueeze(self.unsqueeze_dim), sin.unsqueeze(self.unsqueeze_dim)
        return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class NeoXRope(nn.Module):
    """GPT-NeoX / Phi / StableLM partial rotary."""

    def forward(self, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rotary_dim = cos.shape[-1]
        q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
        k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
        q_embed = (q_rot * cos) + (rotate_half(q_rot) * sin)
        k_embed = (k_rot * cos) + (rotate_half(k_rot) * sin)
        return torch.cat([q_embed, q_pass], dim=-1), torch.cat([k_embed, k_pass], dim=-1)


def gptj_apply(tensor, sin, cos):
    sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3)
    cos = torch.repeat_interleave(cos[:, :, None, :], 2, 3)
    return (tensor * cos) + (rotate_every_two(tensor) * sin)


class GPTJRope(nn.Module):
    """GPT-J: q/k as [B, S, H, D], sin/cos of R/2 repeated pairwise, optional rotary_dim."""

    def __init__(self, rotary_dim=None):
        super().__init__()
        self.rotary_dim = rotary_dim

    def forward(self, query, key, sincos):
        sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
        if self.rotary_dim is None:
            return gptj_apply(query, sin, cos), gptj_apply(key, sin, cos)
        q_rot, q_pass = query[:, :, :, : self.rotary_dim], query[:, :, :, self.rotary_dim :]
        k_rot, k_pass = key[:, :, :, : self.rotary_dim], key[:, :, :, self.rotary_dim :]
        return (torch.cat([gptj_apply(q_rot, sin, cos), q_pass], dim=-1),
                torch.cat([gptj_apply(k_rot, sin, cos), k_pass], dim=-1))


def rewritten(module, *inputs):
    torch._dynamo.reset()
    hubcompile.RECORDS.clear()
    with torch.no_grad():
        out = torch.compile(module, backend="hubkernels")(*inputs)
        for o, e in zip(out, module(*inputs)):
            torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)
    (record,) = hubcompile.RECORDS
    return record.code_after


def qk(*shape):
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


class TestRewrittenGraphs(TestCase):
    def tearDown(self):
        torch._dynamo.reset()

    def test_llama_unsqueeze_1(self):
        code = rewritten(LlamaRope(), *qk(2, 3, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8))
        self.assertExpectedInline(code, """\
def forward(self, arg0_1, arg1_1, arg2_1, arg3_1):
    unsqueeze = torch.ops.aten.unsqueeze.default(arg0_1, 1)
    unsqueeze_1 = torch.ops.aten.unsqueeze.default(arg1_1, 1)
    rotary_default_1 = torch.ops.hubcompile.rotary.default(arg2_1, unsqueeze, unsqueeze_1, False, 'bundled:rotary', 'bundled:rotary')
    rotary_default = torch.ops.hubcompile.rotary.default(arg3_1, unsqueeze, unsqueeze_1, False, 'bundled:rotary', 'bundled:rotary')
    return (rotary_default_1, rotary_default)""")

    def test_llama_unsqueeze_2(self):
        code = rewritten(LlamaRope(2), *qk(2, 5, 3, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8))
        self.assertExpectedInline(code, """\
def forward(self, arg0_1, arg1_1, arg2_1, arg3_1):
    unsqueeze = torch.ops.aten.unsqueeze.default(arg0_1, 2)
    unsqueeze_1 = torch.ops.aten.unsqueeze.default(arg1_1, 2)
    rotary_default_1 = torch.ops.hubcompile.rotary.default(arg2_1, unsqueeze, unsqueeze_1, False, 'bundled:rotary', 'bundled:rotary')
    rotary_default = torch.ops.hubcompile.rotary.default(arg3_1, unsqueeze, unsqueeze_1, False, 'bundled:rotary', 'bundled:rotary')
    return (rotary_default_1, rotary_default)""")

    def test_neox_partial(self):
        code = rewritten(NeoXRope(), *qk(2, 3, 5, 12), torch.randn(2, 5, 4), torch.randn(2, 5, 4))
        self.assertExpectedInline(code, """\
def forward(self, arg0_1, arg1_1, arg2_1, arg3_1):
    unsqueeze = torch.ops.aten.unsqueeze.default(arg0_1, 1)
    unsqueeze_1 = torch.ops.aten.unsqueeze.default(arg1_1, 1)
    rotary_default_1 = torch.ops.hubcompile.rotary.default(arg2_1, unsqueeze, unsqueeze_1, False, 'bundled:rotary', 'bundled:rotary')
    rotary_default = torch.ops.hubcompile.rotary.default(arg3_1, unsqueeze, unsqueeze_1, False, 'bundled:rotary', 'bundled:rotary')
    return (rotary_default_1, rotary_default)""")

    def test_gptj_interleaved(self):
        code = rewritten(GPTJRope(), *qk(2, 5, 3, 8), torch.randn(2, 5, 8))
        self.assertExpectedInline(code, """\
def forward(self, arg0_1, arg1_1, arg2_1):
    split = torch.ops.aten.split.Tensor(arg0_1, 4, -1)
    getitem = split[0]
    getitem_1 = split[1]
    unsqueeze = torch.ops.aten.unsqueeze.default(getitem, 2)
    unsqueeze_1 = torch.ops.aten.unsqueeze.default(unsqueeze, 4)
    expand = torch.ops.aten.expand.default(unsqueeze_1, [2, 5, 1, 4, 2])
    clone = torch.ops.aten.clone.default(expand, memory_format = torch.contiguous_format)
    view = torch.ops.aten.view.default(clone, [2, 5, 1, 8])
    unsqueeze_2 = torch.ops.aten.unsqueeze.default(getitem_1, 2)
    unsqueeze_3 = torch.ops.aten.unsqueeze.default(unsqueeze_2, 4)
    expand_1 = torch.ops.aten.expand.default(unsqueeze_3, [2, 5, 1, 4, 2])
    clone_1 = torch.ops.aten.clone.default(expand_1, memory_format = torch.contiguous_format)
    view_1 = torch.ops.aten.view.default(clone_1, [2, 5, 1, 8])
    rotary_default_1 = torch.ops.hubcompile.rotary.default(arg1_1, view_1, view, True, 'bundled:rotary', 'bundled:rotary')
    unsqueeze_6 = torch.ops.aten.unsqueeze.default(getitem, 2)
    unsqueeze_7 = torch.ops.aten.unsqueeze.default(unsqueeze_6, 4)
    expand_2 = torch.ops.aten.expand.default(unsqueeze_7, [2, 5, 1, 4, 2])
    clone_2 = torch.ops.aten.clone.default(expand_2, memory_format = torch.contiguous_format)
    view_3 = torch.ops.aten.view.default(clone_2, [2, 5, 1, 8])
    unsqueeze_8 = torch.ops.aten.unsqueeze.default(getitem_1, 2)
    unsqueeze_9 = torch.ops.aten.unsqueeze.default(unsqueeze_8, 4)
    expand_3 = torch.ops.aten.expand.default(unsqueeze_9, [2, 5, 1, 4, 2])
    clone_3 = torch.ops.aten.clone.default(expand_3, memory_format = torch.contiguous_format)
    view_4 = torch.ops.aten.view.default(clone_3, [2, 5, 1, 8])
    rotary_default = torch.ops.hubcompile.rotary.default(arg2_1, view_4, view_3, True, 'bundled:rotary', 'bundled:rotary')
    return (rotary_default_1, rotary_default)""")

    def test_gptj_interleaved_partial(self):
        code = rewritten(GPTJRope(4), *qk(2, 5, 3, 12), torch.randn(2, 5, 4))
        self.assertExpectedInline(code, """\
def forward(self, arg0_1, arg1_1, arg2_1):
    split = torch.ops.aten.split.Tensor(arg0_1, 2, -1)
    getitem = split[0]
    getitem_1 = split[1]
    unsqueeze = torch.ops.aten.unsqueeze.default(getitem, 2)
    unsqueeze_1 = torch.ops.aten.unsqueeze.default(unsqueeze, 4)
    expand = torch.ops.aten.expand.default(unsqueeze_1, [2, 5, 1, 2, 2])
    clone = torch.ops.aten.clone.default(expand, memory_format = torch.contiguous_format)
    view = torch.ops.aten.view.default(clone, [2, 5, 1, 4])
    unsqueeze_2 = torch.ops.aten.unsqueeze.default(getitem_1, 2)
    unsqueeze_3 = torch.ops.aten.unsqueeze.default(unsqueeze_2, 4)
    expand_1 = torch.ops.aten.expand.default(unsqueeze_3, [2, 5, 1, 2, 2])
    clone_1 = torch.ops.aten.clone.default(expand_1, memory_format = torch.contiguous_format)
    view_1 = torch.ops.aten.view.default(clone_1, [2, 5, 1, 4])
    rotary_default_1 = torch.ops.hubcompile.rotary.default(arg1_1, view_1, view, True, 'bundled:rotary', 'bundled:rotary')
    unsqueeze_6 = torch.ops.aten.unsqueeze.default(getitem, 2)
    unsqueeze_7 = torch.ops.aten.unsqueeze.default(unsqueeze_6, 4)
    expand_2 = torch.ops.aten.expand.default(unsqueeze_7, [2, 5, 1, 2, 2])
    clone_2 = torch.ops.aten.clone.default(expand_2, memory_format = torch.contiguous_format)
    view_3 = torch.ops.aten.view.default(clone_2, [2, 5, 1, 4])
    unsqueeze_8 = torch.ops.aten.unsqueeze.default(getitem_1, 2)
    unsqueeze_9 = torch.ops.aten.unsqueeze.default(unsqueeze_8, 4)
    expand_3 = torch.ops.aten.expand.default(unsqueeze_9, [2, 5, 1, 2, 2])
    clone_3 = torch.ops.aten.clone.default(expand_3, memory_format = torch.contiguous_format)
    view_4 = torch.ops.aten.view.default(clone_3, [2, 5, 1, 4])
    rotary_default = torch.ops.hubcompile.rotary.default(arg2_1, view_4, view_3, True, 'bundled:rotary', 'bundled:rotary')
    return (rotary_default_1, rotary_default)""")


# ------------------------------------------------------------- GPT-OSS, as transformers writes it


class GptOssRope(nn.Module):
    """GPT-OSS's rotary embedding and apply_rotary_pos_emb, from transformers: cos/sin
    of half the head dim, q and k cut with ``chunk``."""

    def __init__(self, head_dim=12):
        super().__init__()
        from transformers import GptOssConfig
        from transformers.models.gpt_oss import modeling_gpt_oss

        config = GptOssConfig(hidden_size=48, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=64)
        self.rope, self.rotate = modeling_gpt_oss.GptOssRotaryEmbedding(config), modeling_gpt_oss.apply_rotary_pos_emb

    def forward(self, q, k):
        positions = torch.arange(q.shape[2], device=q.device)[None].expand(q.shape[0], -1)
        cos, sin = self.rope(q, positions)
        return self.rotate(q, k, cos, sin)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpt_oss_rotary_forward_and_backward(fresh, dtype, dynamic):
    """Both rotations replaced, in inference and in a training graph (forward-only
    pattern, Inductor's backward), outputs and gradients against float64."""
    torch.manual_seed(0)
    module = GptOssRope()
    q = torch.randn(2, 4, 7, 12, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 7, 12, dtype=dtype, requires_grad=True)
    cot = [torch.randn(t.shape, dtype=torch.float64) for t in (q, k)]

    def run(fn, q, k):
        outs = fn(q, k)
        return outs, torch.autograd.grad(outs, (q, k), [c.to(o.dtype) for c, o in zip(cot, outs)])

    eager, eager_grads = run(module, q, k)
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    ref, ref_grads = run(module, q64, k64)
    if dynamic:  # batch and sequence, as in a model, where the head dim is a constant of the code
        for t in (q, k):
            torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(t, 2)
    out, grads = run(torch.compile(module, backend="hubkernels"), q, k)
    assert sum(r.replaced.get("rotary", 0) for r in fresh) == 2
    assert {s for r in fresh for s, _ in r.spellings["rotary"]} == {"half_chunked"}
    for name, o, e, r in zip(("q", "k", "dq", "dk"), (*out, *grads), (*eager, *eager_grads), (*ref, *ref_grads)):
        assert_close_to_reference(o, e, r, dtype, name)
