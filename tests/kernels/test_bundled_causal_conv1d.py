"""Tests for the bundled ``hubcompile-causal-conv1d`` kernel repository.

Both build variants are exercised: ``build/torch-cuda`` (Triton; on a CPU-only machine it
runs on CPU tensors under ``TRITON_INTERPRET=1``) and ``build/torch-cpu`` (plain torch).
Results are compared against a float64 reference written the way model code spells it
(``F.conv1d`` with padding, then a slice); the kernel must be within
``k * err(eager in the input dtype) + floor`` of it.
"""

import os

import torch

if not torch.cuda.is_available():
    # Must happen before the Triton kernel module is imported (triton.jit reads it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools
from pathlib import Path

import pytest
import torch.nn.functional as F
from kernels import get_local_kernel

REPO_ROOT = Path(__file__).resolve().parents[2] / "hubcompile" / "lowering" / "bundled" / "causal-conv1d"
VARIANT_DIRS = {
    "triton": REPO_ROOT / "build" / "torch-cuda",
    "torch": REPO_ROOT / "build" / "torch-cpu",
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

B, D, L = 2, 37, 13


@functools.lru_cache(maxsize=None)
def _load(variant: str):
    return get_local_kernel(VARIANT_DIRS[variant])


def conv_model(x, weight, bias, activation):
    """Model-code spelling (Mamba-style): depthwise conv1d, left padding via padding + slice."""
    seqlen = x.shape[-1]
    W = weight.shape[-1]
    y = F.conv1d(x, weight[:, None, :], bias, padding=W - 1, groups=x.shape[1])[..., :seqlen]
    if activation == "silu":
        y = F.silu(y)
    return y


# name: (x dtype, weight/bias dtype, x layout)
CASES = {
    "fp32-contig": (torch.float32, torch.float32, "contig"),
    "fp32-transposed": (torch.float32, torch.float32, "transposed"),
    "bf16-transposed": (torch.bfloat16, torch.bfloat16, "transposed"),
    "bf16x-fp32w-contig": (torch.bfloat16, torch.float32, "contig"),
}


def _seed(*parts) -> int:
    return sum((i + 1) * (sum(map(ord, str(p))) + 7) for i, p in enumerate(parts)) % 100_003


def make_inputs(case, W, has_bias, seed, seqlen=L):
    x_dtype, w_dtype, layout = CASES[case]
    torch.manual_seed(seed)
    if layout == "transposed":
        # hidden_states [B, L, D] -> x [B, D, L] view (stride 1 along D)
        x = torch.randn(B, seqlen, D, device=DEVICE).to(x_dtype).transpose(1, 2)
        assert not x.is_contiguous()
    else:
        x = torch.randn(B, D, seqlen, device=DEVICE).to(x_dtype)
    weight = (torch.randn(D, W, device=DEVICE) / W**0.5).to(w_dtype)
    bias = torch.randn(D, device=DEVICE).to(w_dtype) if has_bias else None
    return x, weight, bias


def _errs(a, ref):
    d = (a.double() - ref).abs()
    return d.max().item(), d.pow(2).mean().sqrt().item()


def assert_within_eager(got, ref64, eager, expected_dtype, what):
    assert got.dtype == expected_dtype, f"{what}: dtype {got.dtype} != {expected_dtype}"
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all()
    low = eager.dtype in (torch.bfloat16, torch.float16) or expected_dtype in (torch.bfloat16, torch.float16)
    k = 3.0 if low else 2.0
    scale = max(ref64.abs().max().item(), 1.0)
    floor = (1e-3 if low else 1e-6) * scale
    g_max, g_rms = _errs(got, ref64)
    e_max, e_rms = _errs(eager, ref64)
    assert g_max <= k * e_max + floor, f"{what}: max err {g_max:.3e} vs eager {e_max:.3e}"
    assert g_rms <= k * e_rms + floor, f"{what}: rms err {g_rms:.3e} vs eager {e_rms:.3e}"


def _f64(t):
    return None if t is None else t.detach().double()


@pytest.mark.parametrize("variant", ["triton", "torch"])
@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", [None, "silu"], ids=["noact", "silu"])
@pytest.mark.parametrize("case", list(CASES))
def test_causal_conv1d_forward(variant, W, has_bias, activation, case):
    mod = _load(variant)
    x, weight, bias = make_inputs(case, W, has_bias, _seed("fwd", variant, W, has_bias, activation, case))

    out = mod.causal_conv1d_forward(x, weight, bias, activation)

    ref = conv_model(x.double(), weight.double(), _f64(bias), activation)
    # eager in the input dtype (F.conv1d needs one dtype: weight/bias cast to x's)
    eager = conv_model(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), activation)
    assert out.is_contiguous()
    assert_within_eager(out, ref, eager, x.dtype, "causal_conv1d_forward")


@pytest.mark.parametrize("variant", ["triton", "torch"])
@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", [None, "silu"], ids=["noact", "silu"])
@pytest.mark.parametrize("case", list(CASES))
def test_causal_conv1d_backward(variant, W, has_bias, activation, case):
    mod = _load(variant)
    x, weight, bias = make_inputs(case, W, has_bias, _seed("bwd", variant, W, has_bias, activation, case))
    torch.manual_seed(_seed("dout", variant, W, has_bias, activation, case))
    dout = torch.randn(B, D, L, device=DEVICE).to(x.dtype)

    # float64 reference through torch.autograd
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    b64 = bias.detach().double().requires_grad_(True) if bias is not None else None
    conv_model(x64, w64, b64, activation).backward(dout.double())

    # eager autograd in the input dtype
    xe = x.detach().clone().requires_grad_(True)
    we = weight.detach().to(x.dtype).requires_grad_(True)
    be = bias.detach().to(x.dtype).requires_grad_(True) if bias is not None else None
    conv_model(xe, we, be, activation).backward(dout)

    dx, dweight, dbias = mod.causal_conv1d_backward(dout, x, weight, bias, activation)

    assert_within_eager(dx, x64.grad, xe.grad, x.dtype, "dx")
    assert dweight.shape == weight.shape
    assert_within_eager(dweight, w64.grad, we.grad, weight.dtype, "dweight")
    if bias is None:
        assert dbias is None
    else:
        assert_within_eager(dbias, b64.grad, be.grad, bias.dtype, "dbias")


@pytest.mark.parametrize("variant", ["triton", "torch"])
@pytest.mark.parametrize("activation", [None, "silu"], ids=["noact", "silu"])
def test_causal_conv1d_width_one(variant, activation):
    """W = 1 is in the valid range (a per-channel scale)."""
    mod = _load(variant)
    x, weight, bias = make_inputs("fp32-transposed", 1, True, _seed("w1", variant, activation))
    torch.manual_seed(3)
    dout = torch.randn(B, D, L, device=DEVICE)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, weight, bias))
    ref = conv_model(x64, w64, b64, activation)
    ref.backward(dout.double())
    out = mod.causal_conv1d_forward(x, weight, bias, activation)
    dx, dweight, dbias = mod.causal_conv1d_backward(dout, x, weight, bias, activation)
    for got, want in ((out, ref), (dx, x64.grad), (dweight, w64.grad), (dbias, b64.grad)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", [None, "silu"], ids=["noact", "silu"])
def test_triton_backward_multi_block_reduction(monkeypatch, activation):
    """Longer sequence, one program looping over several time blocks (two-stage reduction path)."""
    mod = _load("triton")
    seqlen = 150  # 3 time blocks of 64
    monkeypatch.setattr(mod, "launch_bwd", functools.partial(mod.launch_bwd, target_programs=1))
    x, weight, bias = make_inputs("fp32-transposed", 4, True, _seed("long", activation), seqlen=seqlen)
    torch.manual_seed(7)
    dout = torch.randn(B, D, seqlen, device=DEVICE)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, weight, bias))
    ref = conv_model(x64, w64, b64, activation)
    ref.backward(dout.double())
    out = mod.causal_conv1d_forward(x, weight, bias, activation)
    dx, dweight, dbias = mod.causal_conv1d_backward(dout, x, weight, bias, activation)
    for got, want in ((out, ref), (dx, x64.grad), (dweight, w64.grad), (dbias, b64.grad)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("variant", ["triton", "torch"])
@pytest.mark.parametrize("W", [0, 5, 7])
def test_bad_width_raises(variant, W):
    mod = _load(variant)
    x = torch.randn(B, D, L, device=DEVICE)
    weight = torch.randn(D, W, device=DEVICE)
    with pytest.raises(ValueError, match=rf"W={W}.*1\.\.4"):
        mod.causal_conv1d_forward(x, weight)
    with pytest.raises(ValueError, match=rf"W={W}.*1\.\.4"):
        mod.causal_conv1d_backward(torch.randn_like(x), x, weight)


@pytest.mark.parametrize("variant", ["triton", "torch"])
@pytest.mark.parametrize("activation", ["relu", "swish", "SiLU"])
def test_bad_activation_raises(variant, activation):
    mod = _load(variant)
    x = torch.randn(B, D, L, device=DEVICE)
    weight = torch.randn(D, 4, device=DEVICE)
    with pytest.raises(ValueError, match=rf"'{activation}'.*silu"):
        mod.causal_conv1d_forward(x, weight, None, activation)
    with pytest.raises(ValueError, match=rf"'{activation}'.*silu"):
        mod.causal_conv1d_backward(torch.randn_like(x), x, weight, None, activation)


def test_repo_root_loads_for_this_machine():
    mod = get_local_kernel(REPO_ROOT)
    expected = "torch-cuda" if torch.cuda.is_available() else "torch-cpu"
    assert Path(mod.__file__).resolve().parent.name == expected
    x, weight, bias = make_inputs("fp32-transposed", 4, True, 123)
    ref = conv_model(x.double(), weight.double(), bias.double(), "silu")
    out = mod.causal_conv1d_forward(x, weight, bias, "silu")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
