"""The causal depthwise conv1d family: the op against float64 with each kernel, snapshots
of rewritten graphs, refusals, and real Mamba/Mamba2 models."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from expecttest import TestCase
from torch import nn

import hubcompile
from hubcompile.lowering import causal_conv1d_ops
from hubcompile.lowering.kernels import BUNDLED_ROOT
from numerics import assert_close_to_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = ["reference", "bundled:causal-conv1d", f"local:{Path(BUNDLED_ROOT) / 'causal-conv1d' / 'build' / 'torch-cuda'}"]
op = torch.ops.hubcompile.causal_conv1d


def _inputs(dtype, width, bias, strided):
    x = torch.randn(2, 13, 7, device=DEVICE, dtype=dtype).transpose(1, 2) if strided else \
        torch.randn(2, 7, 13, device=DEVICE, dtype=dtype)
    w = torch.randn(7, width, device=DEVICE, dtype=dtype)
    b = torch.randn(7, device=DEVICE, dtype=dtype) if bias else None
    return [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]


@pytest.mark.parametrize("kernel", KERNELS, ids=["reference", "bundled", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width,bias,silu,strided", [(4, True, True, False), (3, False, True, True),
                                                     (2, True, False, True), (4, False, False, False)])
def test_op_against_float64(kernel, dtype, width, bias, silu, strided):
    x, w, b = _inputs(dtype, width, bias, strided)
    torch.library.opcheck(op, (x, w, b, silu, kernel, kernel))
    out = op(x, w, b, silu, kernel, kernel)
    eager = causal_conv1d_ops.reference(x, w, b, silu)
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    ref = causal_conv1d_ops.reference(*leaves64, silu)
    assert out.shape == eager.shape and out.dtype == eager.dtype
    assert_close_to_reference(out, eager, ref, dtype, "output")
    cot = torch.randn_like(ref)
    tensors = [t for t in (x, w, b) if t is not None]
    new_grads = torch.autograd.grad(out, tensors, cot.to(dtype))
    eager_grads = torch.autograd.grad(eager, tensors, cot.to(dtype))
    ref_grads = torch.autograd.grad(ref, [t for t in leaves64 if t is not None], cot)
    for name, g_new, g_eager, g_ref in zip("xwb", new_grads, eager_grads, ref_grads):
        assert_close_to_reference(g_new, g_eager, g_ref, dtype, f"grad {name}")


class MambaConv(nn.Module):
    """The Mamba mixer's spelling: a padded depthwise Conv1d sliced back, then SiLU."""

    def __init__(self, channels=12, width=4, bias=True, groups=None):
        super().__init__()
        self.conv1d = nn.Conv1d(channels, channels, width, groups=groups or channels, padding=width - 1, bias=bias)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.conv1d(x)[..., : x.shape[-1]])


class LeftPadConv(nn.Module):
    def __init__(self, channels=12, width=3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, 1, width))

    def forward(self, x):
        return F.conv1d(F.pad(x, (self.weight.shape[-1] - 1, 0)), self.weight, groups=x.shape[1])


def _compile(module, x):
    torch._dynamo.reset()
    hubcompile.RECORDS.clear()
    with torch.no_grad():
        out = torch.compile(module, backend="hubkernels")(x)
        torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-5)
    return hubcompile.RECORDS[-1]


class TestRewrittenGraphs(TestCase):
    def test_conv_slice_bias_silu(self):
        torch.manual_seed(0)
        record = _compile(MambaConv(), torch.randn(2, 12, 9))
        self.assertExpectedInline(record.code_after, """\
def forward(self, arg0_1, arg1_1, arg2_1):
    squeeze_dim = torch.ops.aten.squeeze.dim(arg0_1, 1)
    causal_conv1d_default = torch.ops.hubcompile.causal_conv1d.default(arg2_1, squeeze_dim, arg1_1, True, 'bundled:causal-conv1d', 'bundled:causal-conv1d')
    return (causal_conv1d_default,)""")

    def test_left_pad_no_bias(self):
        torch.manual_seed(0)
        record = _compile(LeftPadConv(), torch.randn(2, 12, 9))
        self.assertExpectedInline(record.code_after, """\
def forward(self, arg0_1, arg1_1):
    squeeze_dim = torch.ops.aten.squeeze.dim(arg0_1, 1)
    causal_conv1d_default = torch.ops.hubcompile.causal_conv1d.default(arg1_1, squeeze_dim, None, False, 'bundled:causal-conv1d', 'bundled:causal-conv1d')
    return (causal_conv1d_default,)""")


@pytest.mark.parametrize("module, reason", [
    (MambaConv(width=5), "kernel width 5 > 4"),
])
def test_refused_with_reason(fresh, module, reason):
    record = _compile(module, torch.randn(2, 12, 9))
    assert record.replaced["causal_conv1d"] == 0
    assert any(reason in r for _, r in record.refused["causal_conv1d"])


def test_grouped_not_depthwise_is_not_matched(fresh):
    record = _compile(MambaConv(groups=3), torch.randn(2, 12, 9))
    assert record.replaced["causal_conv1d"] == 0


# Mamba's slow path unrolls its scan over the sequence: Inductor's CPU code grows with it,
# and a sequence just longer than the conv kernel (4) exercises the conv's padding and body.
SEQ = 6

MAMBA = {
    "mamba": (T.MambaConfig, T.MambaForCausalLM, {}),
    "mamba2": (T.Mamba2Config, T.Mamba2ForCausalLM, dict(num_heads=4, head_dim=16, n_groups=1, chunk_size=8)),
}


def _mamba(name, dtype, layers=2):
    config_cls, model_cls, extra = MAMBA[name]
    torch.manual_seed(0)
    config = config_cls(hidden_size=32, state_size=8, num_hidden_layers=layers, vocab_size=64, conv_kernel=4, expand=2,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    return model_cls(config).to(dtype)


def _convs(records):
    return sum(r.replaced.get("causal_conv1d", 0) for r in records)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", MAMBA)
def test_mamba_inference(fresh, name, dtype):
    model = _mamba(name, dtype).eval()
    ids = torch.randint(3, 64, (2, SEQ))
    with torch.no_grad():
        out = torch.compile(model, backend="hubkernels")(ids, use_cache=False).logits
        eager = model(ids, use_cache=False).logits
        ref = copy.deepcopy(model).double()(ids, use_cache=False).logits
    assert _convs(fresh) == 2, "one causal conv1d per layer"
    assert_close_to_reference(out, eager, ref, dtype, f"{name} logits")


@pytest.mark.parametrize("name", MAMBA)
def test_mamba_training(fresh, name):
    # One layer: Inductor's bf16 CPU code for this graph takes most of a minute per layer
    # to generate, and inference already counts one conv per layer.
    model = _mamba(name, torch.bfloat16, layers=1).train()
    ref_model = copy.deepcopy(model).double()
    ids = torch.randint(3, 64, (2, SEQ))

    def step(m, run):
        m.zero_grad(set_to_none=True)
        loss = run(ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = step(model, model)
    ref_loss, ref_grads = step(ref_model, ref_model)
    loss, grads = step(model, torch.compile(model, backend="hubkernels"))
    assert _convs(fresh) == 1
    assert_close_to_reference(loss, eager_loss, ref_loss, torch.bfloat16, "loss")
    for pname in ("backbone.layers.0.mixer.conv1d.weight", "backbone.layers.0.mixer.conv1d.bias"):
        assert_close_to_reference(grads[pname], eager_grads[pname], ref_grads[pname], torch.bfloat16, pname)
