"""Snapshots of rewritten graphs, one small module per family (expecttest: run with
EXPECTTEST_ACCEPT=1 to update after an intended change)."""

import torch
from expecttest import TestCase

import hubcompile
from small_modules import GemmaRMSNorm, LlamaRMSNorm, Phi3MLP, ResidualNorm, SwiGLU


def rewritten(module, *inputs, dtype=torch.float32):
    torch._dynamo.reset()
    hubcompile.RECORDS.clear()
    torch.manual_seed(0)
    module = module.to(dtype)
    with torch.no_grad():
        torch.compile(module, backend="hubkernels")(*[i.to(dtype) for i in inputs])
    (record,) = hubcompile.RECORDS
    return record.code_after


class TestRewrittenGraphs(TestCase):
    def test_llama_rmsnorm_bf16(self):
        code = rewritten(LlamaRMSNorm(16), torch.randn(2, 5, 16), dtype=torch.bfloat16)
        self.assertExpectedInline(code, """\
def forward(self, arg0_1, arg1_1):
    rms_norm_default = torch.ops.hubcompile.rms_norm.default(arg0_1, arg1_1, 1e-06, 0.0, True, None, 'bundled:rmsnorm', 'bundled:rmsnorm')
    getitem = rms_norm_default[0]
    return (getitem,)""")

    def test_gemma_rmsnorm(self):
        code = rewritten(GemmaRMSNorm(16), torch.randn(2, 5, 16), dtype=torch.bfloat16)
        self.assertExpectedInline(code, """\
def forward(self, arg0_1, arg1_1):
    rms_norm_default = torch.ops.hubcompile.rms_norm.default(arg0_1, arg1_1, 1e-06, 1.0, False, None, 'bundled:rmsnorm', 'bundled:rmsnorm')
    getitem = rms_norm_default[0]
    return (getitem,)""")

    def test_residual_add_rmsnorm(self):
        code = rewritten(ResidualNorm(), torch.randn(2, 5, 16), torch.randn(2, 5, 16))
        self.assertExpectedInline(code, """\
def forward(self, arg0_1, arg1_1, arg2_1):
    add_rms_norm_default = torch.ops.hubcompile.add_rms_norm.default(arg0_1, arg1_1, arg2_1, 1e-05, 0.0, True, None, 'bundled:rmsnorm', 'bundled:rmsnorm')
    getitem = add_rms_norm_default[0]
    getitem_1 = add_rms_norm_default[1]
    return (getitem, getitem_1)""")

    def test_silu_gate(self):
        code = rewritten(SwiGLU(16, 24), torch.randn(2, 5, 16))
        self.assertExpectedInline(code, """\
def forward(self, arg0_1, arg1_1, arg2_1, arg3_1):
    permute = torch.ops.aten.permute.default(arg0_1, [1, 0])
    view = torch.ops.aten.view.default(arg1_1, [10, 16])
    mm = torch.ops.aten.mm.default(view, permute)
    view_1 = torch.ops.aten.view.default(mm, [2, 5, 24])
    permute_1 = torch.ops.aten.permute.default(arg2_1, [1, 0])
    view_2 = torch.ops.aten.view.default(arg1_1, [10, 16])
    mm_1 = torch.ops.aten.mm.default(view_2, permute_1)
    view_3 = torch.ops.aten.view.default(mm_1, [2, 5, 24])
    gated_activation_default = torch.ops.hubcompile.gated_activation.default(view_1, view_3, 'silu', 'bundled:activation', 'bundled:activation')
    permute_2 = torch.ops.aten.permute.default(arg3_1, [1, 0])
    view_4 = torch.ops.aten.view.default(gated_activation_default, [10, 24])
    mm_2 = torch.ops.aten.mm.default(view_4, permute_2)
    view_5 = torch.ops.aten.view.default(mm_2, [2, 5, 16])
    return (view_5,)""")

    def test_silu_gate_fused_projection(self):
        code = rewritten(Phi3MLP(), torch.randn(2, 5, 16))
        self.assertExpectedInline(code, """\
def forward(self, arg0_1, arg1_1, arg2_1):
    permute = torch.ops.aten.permute.default(arg0_1, [1, 0])
    view = torch.ops.aten.view.default(arg1_1, [10, 16])
    mm = torch.ops.aten.mm.default(view, permute)
    view_1 = torch.ops.aten.view.default(mm, [2, 5, 24])
    gated_activation_fused_default = torch.ops.hubcompile.gated_activation_fused.default(view_1, 'silu', 'bundled:activation', 'bundled:activation')
    permute_1 = torch.ops.aten.permute.default(arg2_1, [1, 0])
    view_2 = torch.ops.aten.view.default(gated_activation_fused_default, [10, 12])
    mm_1 = torch.ops.aten.mm.default(view_2, permute_1)
    view_3 = torch.ops.aten.view.default(mm_1, [2, 5, 16])
    return (view_3,)""")

    def test_gelu_tanh_gate(self):
        code = rewritten(SwiGLU(16, 24, act="gelu_tanh"), torch.randn(2, 5, 16), dtype=torch.bfloat16)
        self.assertExpectedInline(code, """\
def forward(self, arg0_1, arg1_1, arg2_1, arg3_1):
    permute = torch.ops.aten.permute.default(arg0_1, [1, 0])
    view = torch.ops.aten.view.default(arg1_1, [10, 16])
    mm = torch.ops.aten.mm.default(view, permute)
    view_1 = torch.ops.aten.view.default(mm, [2, 5, 24])
    permute_1 = torch.ops.aten.permute.default(arg2_1, [1, 0])
    view_2 = torch.ops.aten.view.default(arg1_1, [10, 16])
    mm_1 = torch.ops.aten.mm.default(view_2, permute_1)
    view_3 = torch.ops.aten.view.default(mm_1, [2, 5, 24])
    gated_activation_default = torch.ops.hubcompile.gated_activation.default(view_1, view_3, 'gelu_tanh', 'bundled:activation', 'bundled:activation')
    permute_2 = torch.ops.aten.permute.default(arg3_1, [1, 0])
    view_4 = torch.ops.aten.view.default(gated_activation_default, [10, 24])
    mm_2 = torch.ops.aten.mm.default(view_4, permute_2)
    view_5 = torch.ops.aten.view.default(mm_2, [2, 5, 16])
    return (view_5,)""")
