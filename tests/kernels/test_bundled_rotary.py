"""Tests for the bundled ``hubcompile-rotary`` kernel repository.

Both build variants are exercised: ``build/torch-cuda`` (Triton; on a CPU-only machine it
runs on CPU tensors under ``TRITON_INTERPRET=1``) and ``build/torch-cpu`` (plain torch).
Results are compared against a float64 reference written the way model code spells it;
the kernel must be within ``k * err(eager in the input dtype) + floor`` of it.
"""

import os

import torch

if not torch.cuda.is_available():
    # Must happen before the Triton kernel module is imported (triton.jit reads it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools
from pathlib import Path

import pytest
from kernels import get_local_kernel

REPO_ROOT = Path(__file__).resolve().parents[2] / "hubcompile" / "lowering" / "bundled" / "rotary"
VARIANT_DIRS = {
    "triton": REPO_ROOT / "build" / "torch-cuda",
    "torch": REPO_ROOT / "build" / "torch-cpu",
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

B, H, S = 2, 3, 13


@functools.lru_cache(maxsize=None)
def _load(variant: str):
    return get_local_kernel(VARIANT_DIRS[variant])


# ----------------------------------------------------------------------------- references


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary_model(x, cos, sin, interleaved):
    """Model-code spelling, partial rotary via slice + cat; runs in whatever dtypes it is given."""
    R = cos.shape[-1]
    x_rot, x_pass = x[..., :R], x[..., R:]
    rot = rotate_every_two if interleaved else rotate_half
    y = x_rot * cos + rot(x_rot) * sin
    return torch.cat((y, x_pass), dim=-1)


# ----------------------------------------------------------------------------- helpers

DTYPE_CASES = {
    # name: (x dtype, cos/sin dtype)
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16_x_fp32_cos": (torch.bfloat16, torch.float32),
}

# (D, R): partial rotary with head dim 24 / rotary dim 8; full rotary with an odd half (5)
DIMS = [(24, 8), (10, 10)]

LAYOUTS = ["bhsd", "bshd_transposed", "bshd"]


def make_inputs(layout, D, R, x_dtype, cs_dtype, seed):
    torch.manual_seed(seed)
    if layout == "bhsd":
        # x [B, H, S, D] contiguous; cos [B, S, R].unsqueeze(1)
        x = torch.randn(B, H, S, D, device=DEVICE)
        cos = torch.randn(B, S, R, device=DEVICE).unsqueeze(1)
        sin = torch.randn(B, S, R, device=DEVICE).unsqueeze(1)
    elif layout == "bshd_transposed":
        # q [B, S, H, D] viewed as [B, H, S, D] by transpose; cos [1, S, R].unsqueeze(1)
        q = torch.randn(B, S, H, D, device=DEVICE)
        x = q.transpose(1, 2)
        cos = torch.randn(1, S, R, device=DEVICE).unsqueeze(1)
        sin = torch.randn(1, S, R, device=DEVICE).unsqueeze(1)
    elif layout == "bshd":
        # x [B, S, H, D] contiguous; cos [B, S, R].unsqueeze(2)
        x = torch.randn(B, S, H, D, device=DEVICE)
        cos = torch.randn(B, S, R, device=DEVICE).unsqueeze(2)
        sin = torch.randn(B, S, R, device=DEVICE).unsqueeze(2)
    else:
        raise AssertionError(layout)
    if layout == "bshd_transposed":
        x = x.transpose(1, 2).to(x_dtype).transpose(1, 2)  # keep it a non-contiguous view
        assert not x.is_contiguous()
    else:
        x = x.to(x_dtype)
    return x, cos.to(cs_dtype), sin.to(cs_dtype)


def _errs(a, ref):
    d = (a.double() - ref).abs()
    return d.max().item(), d.pow(2).mean().sqrt().item()


def assert_within_eager(got, ref64, eager, expected_dtype, what):
    assert got.dtype == expected_dtype, f"{what}: dtype {got.dtype} != {expected_dtype}"
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all()
    low = expected_dtype in (torch.bfloat16, torch.float16)
    k = 3.0 if low else 2.0
    scale = max(ref64.abs().max().item(), 1.0)
    floor = (1e-3 if low else 1e-6) * scale
    g_max, g_rms = _errs(got, ref64)
    e_max, e_rms = _errs(eager, ref64)
    assert g_max <= k * e_max + floor, f"{what}: max err {g_max:.3e} vs eager {e_max:.3e}"
    assert g_rms <= k * e_rms + floor, f"{what}: rms err {g_rms:.3e} vs eager {e_rms:.3e}"


def _layout_of_result(x) -> tuple:
    """The strides the kernels give their result: x's layout as torch.empty_like gives it
    (a transposed q stays transposed), contiguous when x's last dim is not innermost."""
    return (torch.empty_like(x) if x.stride(-1) == 1 else torch.empty(x.shape)).stride()


def _seed(*parts) -> int:
    return sum((i + 1) * (sum(map(ord, str(p))) + 7) for i, p in enumerate(parts)) % 100_003


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("variant", ["triton", "torch"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"D{d[0]}R{d[1]}")
@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
def test_rotary_forward(variant, interleaved, layout, dims, dtype_case):
    mod = _load(variant)
    D, R = dims
    x_dtype, cs_dtype = DTYPE_CASES[dtype_case]
    x, cos, sin = make_inputs(layout, D, R, x_dtype, cs_dtype, _seed("fwd", variant, interleaved, layout, dims, dtype_case))

    out = mod.rotary_forward(x, cos, sin, interleaved)

    ref = apply_rotary_model(x.double(), cos.double(), sin.double(), interleaved)
    eager = apply_rotary_model(x, cos, sin, interleaved)
    assert out.stride() == _layout_of_result(x)
    assert_within_eager(out, ref, eager, eager.dtype, "rotary_forward")
    # partial rotary: the pass-through columns are copied exactly
    torch.testing.assert_close(out[..., R:], x[..., R:].to(out.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["triton", "torch"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"D{d[0]}R{d[1]}")
@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
def test_rotary_backward(variant, interleaved, layout, dims, dtype_case):
    mod = _load(variant)
    D, R = dims
    x_dtype, cs_dtype = DTYPE_CASES[dtype_case]
    x, cos, sin = make_inputs(layout, D, R, x_dtype, cs_dtype, _seed("bwd", variant, interleaved, layout, dims, dtype_case))
    out_dtype = torch.promote_types(x_dtype, cs_dtype)
    torch.manual_seed(_seed("dout", variant, interleaved, layout, dims, dtype_case))
    # laid out like x, as the gradient of a transposed q is
    dout = torch.empty_like(x, dtype=out_dtype).copy_(torch.randn(x.shape, device=DEVICE))

    # float64 reference gradient through torch.autograd
    x64 = x.detach().double().requires_grad_(True)
    apply_rotary_model(x64, cos.double(), sin.double(), interleaved).backward(dout.double())
    ref = x64.grad

    # eager autograd in the input dtypes
    xe = x.detach().clone().requires_grad_(True)
    apply_rotary_model(xe, cos, sin, interleaved).backward(dout)
    eager = xe.grad

    dx = mod.rotary_backward(dout, cos, sin, interleaved, dx_dtype=x.dtype)
    assert dx.stride() == _layout_of_result(dout)
    assert_within_eager(dx, ref, eager, x.dtype, "rotary_backward")

    # default result dtype is dout's; the dx_dtype path is the same values rounded once
    dx_default = mod.rotary_backward(dout, cos, sin, interleaved)
    assert dx_default.dtype == dout.dtype
    torch.testing.assert_close(dx_default.to(x.dtype), dx, rtol=0, atol=0)
    torch.testing.assert_close(dx_default[..., R:], dout[..., R:], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["triton", "torch"])
def test_result_layout_follows_the_input(variant):
    """x's layout is kept where its last dim is innermost (a transposed q, and the
    gradient laid out like it), and the result is contiguous where it is not."""
    mod = _load(variant)
    cos, sin = (torch.randn(1, 1, 5, 8, device=DEVICE) for _ in range(2))
    transposed = torch.randn(2, 5, 3, 8, device=DEVICE).transpose(1, 2)
    every_other = torch.randn(2, 3, 5, 16, device=DEVICE)[..., ::2]
    for x in (transposed, every_other):
        out = mod.rotary_forward(x, cos, sin, False)
        dx = mod.rotary_backward(x, cos, sin, False)
        assert out.stride() == dx.stride() == _layout_of_result(x)
        torch.testing.assert_close(out, apply_rotary_model(x, cos, sin, False))
    assert _layout_of_result(transposed) == transposed.stride()
    assert _layout_of_result(every_other) == every_other.contiguous().stride()


@pytest.mark.parametrize("interleaved", [False, True])
def test_triton_matches_torch_variant_many_rows(interleaved):
    """More rows than one Triton program handles, pass-through width > rotary width."""
    torch.manual_seed(11)
    x = torch.randn(3, 5, 29, 140, device=DEVICE).transpose(1, 2)  # [3, 29, 5, 140] view
    cos = torch.randn(3, 29, 1, 6, device=DEVICE)
    sin = torch.randn(3, 29, 1, 6, device=DEVICE)
    tri, ref_mod = _load("triton"), _load("torch")
    for fn in ("rotary_forward", "rotary_backward"):
        a = getattr(tri, fn)(x, cos, sin, interleaved)
        b = getattr(ref_mod, fn)(x, cos, sin, interleaved)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["triton", "torch"])
@pytest.mark.parametrize(
    "cos_shape",
    [(1, 1, 13, 7), (1, 1, 13, 26), (1, 2, 13, 8)],
    ids=["odd_R", "R_gt_D", "not_broadcastable"],
)
def test_rotary_bad_cos_raises(variant, cos_shape):
    mod = _load(variant)
    x = torch.randn(2, 3, 13, 24, device=DEVICE)
    cos = torch.randn(cos_shape, device=DEVICE)
    with pytest.raises(ValueError, match="rotary"):
        mod.rotary_forward(x, cos, cos, False)


def test_repo_root_loads_for_this_machine():
    mod = get_local_kernel(REPO_ROOT)
    expected = "torch-cuda" if torch.cuda.is_available() else "torch-cpu"
    assert Path(mod.__file__).resolve().parent.name == expected
    torch.manual_seed(5)
    x = torch.randn(2, 13, 3, 24, device=DEVICE)
    cos = torch.randn(2, 13, 1, 8, device=DEVICE)
    sin = torch.randn(2, 13, 1, 8, device=DEVICE)
    ref = apply_rotary_model(x.double(), cos.double(), sin.double(), False)
    torch.testing.assert_close(mod.rotary_forward(x, cos, sin, False).double(), ref, rtol=1e-5, atol=1e-5)
