"""Tests for the bundled ``hubcompile-rmsnorm`` kernel repository.

Both build variants are loaded from their directories with ``kernels.get_local_kernel``:
``build/torch-cuda`` (Triton; without a GPU it runs on CPU tensors under
TRITON_INTERPRET=1, set by conftest.py) and ``build/torch-cpu`` (plain torch ops).
Every result is compared with a float64 reference written here: the kernel passes when
``err(kernel, ref64) <= k * err(eager in the input dtype, ref64) + floor`` for both the
RMS and the max-abs error. Backward references are torch.autograd through the float64
reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = "rmsnorm"
VARIANTS = ["torch-cuda", "torch-cpu"]
DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-6
# (layout, hidden size): odd hidden sizes, one above a power of two.
CASES = [("contiguous", 129), ("row_strided", 37), ("transposed", 37), ("batched_slice", 37)]
# (cast_before_scale, weight_offset): the Llama form and the Gemma form.
FORMS = [pytest.param(True, 0.0, id="llama"), pytest.param(False, 1.0, id="gemma")]

K = {torch.float32: 2.0, torch.bfloat16: 3.0, torch.float16: 3.0}
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3}


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(params=VARIANTS)
def variant(request) -> str:
    return request.param


@pytest.fixture
def rms(variant, load_kernel):
    return load_kernel(REPO, variant)


def make(layout: str, n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A random [..., n] tensor with the given memory layout."""
    if layout == "contiguous":  # 7 rows
        t = torch.randn(7, n, dtype=dtype, device=device)
    elif layout == "row_strided":  # 7 rows one stride (n + 11) apart, storage offset 3
        t = torch.randn(7, n + 11, dtype=dtype, device=device)[:, 3 : 3 + n]
    elif layout == "transposed":  # [3, 5, n]: rows are not one stride apart
        t = torch.randn(5, 3, n, dtype=dtype, device=device).transpose(0, 1)
    elif layout == "batched_slice":  # [2, 4, n], the second half of [2, 4, 2n]
        t = torch.randn(2, 4, 2 * n, dtype=dtype, device=device)[..., n:]
    else:
        raise AssertionError(layout)
    assert t.is_contiguous() == (layout == "contiguous")
    return t


def make_weight(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return 1.0 + 0.5 * torch.randn(n, dtype=dtype, device=device)


def eager_forward(x, weight, eps, offset, cast_before_scale, residual=None):
    """Model-code spelling, run in the inputs' dtypes. Returns (y, rstd, h)."""
    h = x + residual if residual is not None else x
    hf = h.float()
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_scale:
        w = weight if offset == 0.0 else weight + offset
        y = w * (hf * rstd).to(h.dtype)
    else:
        y = ((hf * rstd) * (offset + weight.float())).to(h.dtype)
    return y, rstd.squeeze(-1), h


def ref64_forward(x, weight, eps, offset, residual=None):
    """Exact RMSNorm in float64 (no intermediate rounding). Returns (y, rstd, h)."""
    h = x.double() + residual.double() if residual is not None else x.double()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = h * rstd * (weight.double() + offset)
    return y, rstd.squeeze(-1), h


def _grads(fn, dy, h, weight, dh_extra, dtype=None):
    h_ = h.detach().to(dtype or h.dtype).requires_grad_()
    w_ = weight.detach().to(dtype or weight.dtype).requires_grad_()
    y = fn(h_, w_)
    dh, dw = torch.autograd.grad(y, (h_, w_), dy.to(dtype or y.dtype))
    if dh_extra is not None:
        dh = dh + dh_extra.to(dh.dtype)
    return dh, dw


def assert_accurate(name, got, eager, ref, dtype):
    """err(got, ref) <= k * err(eager, ref) + floor, for the RMS and the max-abs error."""
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    got, eager, ref = got.double().cpu(), eager.double().cpu(), ref.double().cpu()
    assert torch.isfinite(got).all(), name
    k, floor = K[dtype], FLOOR[dtype]
    d_got, d_eager = got - ref, eager - ref
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    bound = k * rms(d_eager) + floor * rms(ref)
    assert rms(d_got) <= bound, f"{name}: rms err {rms(d_got):.3e} > {bound:.3e}"
    bound = k * d_eager.abs().max().item() + floor * ref.abs().max().item()
    err = d_got.abs().max().item()
    assert err <= bound, f"{name}: max err {err:.3e} > {bound:.3e}"


# ------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("cast_before_scale, offset", FORMS)
@pytest.mark.parametrize("layout, n", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward(rms, device, dtype, layout, n, cast_before_scale, offset, with_residual):
    x = make(layout, n, dtype, device)
    residual = make(layout, n, dtype, device) if with_residual else None
    weight = make_weight(n, dtype, device)

    y, rstd, h = rms.rms_norm_forward(x, weight, EPS, offset, cast_before_scale, residual=residual)

    assert y.shape == x.shape and y.dtype == dtype
    assert rstd.shape == x.shape[:-1] and rstd.dtype == torch.float32
    assert h.shape == x.shape and h.dtype == dtype
    if residual is None:
        assert h is x
    y_e, rstd_e, h_e = eager_forward(x, weight, EPS, offset, cast_before_scale, residual)
    y_r, rstd_r, h_r = ref64_forward(x, weight, EPS, offset, residual)
    assert_accurate("y", y, y_e, y_r, dtype)
    assert_accurate("rstd", rstd, rstd_e, rstd_r, torch.float32)
    if residual is not None:
        assert_accurate("h", h, h_e, h_r, dtype)


@pytest.mark.parametrize("cast_before_scale", [True, False], ids=["llama", "gemma"])
def test_forward_fp32_weight_bf16_input(rms, device, cast_before_scale):
    """Mixed dtypes: the Llama form promotes (bf16 * fp32 -> fp32), the Gemma form
    returns the input dtype. A non-zero offset exercises the Llama-form weight + offset."""
    n, offset = 37, 0.5
    x = make("row_strided", n, torch.bfloat16, device)
    residual = make("contiguous", n, torch.bfloat16, device)
    weight = make_weight(n, torch.float32, device)

    y, rstd, h = rms.rms_norm_forward(x, weight, EPS, offset, cast_before_scale, residual=residual)

    assert y.dtype == (torch.float32 if cast_before_scale else torch.bfloat16)
    assert h.dtype == torch.bfloat16 and rstd.dtype == torch.float32
    y_e, rstd_e, h_e = eager_forward(x, weight, EPS, offset, cast_before_scale, residual)
    assert y_e.dtype == y.dtype
    y_r, rstd_r, h_r = ref64_forward(x, weight, EPS, offset, residual)
    assert_accurate("y", y, y_e, y_r, torch.bfloat16)
    assert_accurate("rstd", rstd, rstd_e, rstd_r, torch.float32)
    assert_accurate("h", h, h_e, h_r, torch.bfloat16)


def test_forward_fp16(rms, device):
    n = 37
    x = make("row_strided", n, torch.float16, device)
    weight = make_weight(n, torch.float16, device)
    for cast_before_scale, offset in [(True, 0.0), (False, 1.0)]:
        y, rstd, _ = rms.rms_norm_forward(x, weight, EPS, offset, cast_before_scale)
        assert y.dtype == torch.float16
        y_e, rstd_e, _ = eager_forward(x, weight, EPS, offset, cast_before_scale)
        y_r, rstd_r, _ = ref64_forward(x, weight, EPS, offset)
        assert_accurate("y", y, y_e, y_r, torch.float16)
        assert_accurate("rstd", rstd, rstd_e, rstd_r, torch.float32)


# ----------------------------------------------------------------------------- backward


@pytest.mark.parametrize("with_dh_extra", [False, True], ids=["plain", "dh_extra"])
@pytest.mark.parametrize("cast_before_scale, offset", FORMS)
@pytest.mark.parametrize("layout, n", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(rms, device, dtype, layout, n, cast_before_scale, offset, with_dh_extra):
    h = make(layout, n, dtype, device)
    weight = make_weight(n, dtype, device)
    dy = make(layout, n, dtype, device)
    dh_extra = make(layout, n, dtype, device) if with_dh_extra else None
    _, rstd, _ = rms.rms_norm_forward(h, weight, EPS, offset, cast_before_scale)

    dh, dw = rms.rms_norm_backward(
        dy, h, weight, rstd, offset, cast_before_scale, dh_extra=dh_extra
    )

    assert dh.shape == h.shape and dh.dtype == dtype
    assert dw.shape == weight.shape and dw.dtype == dtype
    eager = lambda h_, w_: eager_forward(h_, w_, EPS, offset, cast_before_scale)[0]  # noqa: E731
    ref = lambda h_, w_: ref64_forward(h_, w_, EPS, offset)[0]  # noqa: E731
    dh_e, dw_e = _grads(eager, dy, h, weight, dh_extra)
    dh_r, dw_r = _grads(ref, dy, h, weight, dh_extra, dtype=torch.float64)
    assert_accurate("dh", dh, dh_e, dh_r, dtype)
    assert_accurate("dweight", dw, dw_e, dw_r, dtype)


def test_backward_fp32_weight_bf16_input(rms, device):
    n, offset = 37, 0.5
    h = make("transposed", n, torch.bfloat16, device)
    weight = make_weight(n, torch.float32, device)
    dy = torch.randn(3, 5, n, dtype=torch.float32, device=device)  # y is fp32 here
    _, rstd, _ = rms.rms_norm_forward(h, weight, EPS, offset, True)

    dh, dw = rms.rms_norm_backward(dy, h, weight, rstd, offset, True)

    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.float32
    eager = lambda h_, w_: eager_forward(h_, w_, EPS, offset, True)[0]  # noqa: E731
    ref = lambda h_, w_: ref64_forward(h_, w_, EPS, offset)[0]  # noqa: E731
    dh_e, dw_e = _grads(eager, dy, h, weight, None)
    dh_r, dw_r = _grads(ref, dy, h, weight, None, dtype=torch.float64)
    assert_accurate("dh", dh, dh_e, dh_r, torch.bfloat16)
    # The weight is fp32 but its gradient sums bf16-derived products: bf16 tolerance.
    assert_accurate("dweight", dw, dw_e, dw_r, torch.bfloat16)


# ------------------------------------------------------------ long rows (looping kernels)


@pytest.mark.parametrize("cast_before_scale, offset", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_long_row_path(load_kernel, device, monkeypatch, dtype, cast_before_scale, offset):
    """Shrink the Triton variant's block limits so that hidden 37 takes the looping kernels
    (3 blocks of 16, the last one partial) used for very large hidden sizes."""
    rms = load_kernel(REPO, "torch-cuda")
    monkeypatch.setattr(rms._rmsnorm_triton, "MAX_FUSED_BLOCK", 32)
    monkeypatch.setattr(rms._rmsnorm_triton, "LOOP_BLOCK", 16)
    n = 37
    x = make("row_strided", n, dtype, device)
    residual = make("batched_slice", n, dtype, device).reshape(8, n)[:7]
    weight = make_weight(n, dtype, device)

    y, rstd, h = rms.rms_norm_forward(x, weight, EPS, offset, cast_before_scale, residual=residual)

    y_e, rstd_e, h_e = eager_forward(x, weight, EPS, offset, cast_before_scale, residual)
    y_r, rstd_r, h_r = ref64_forward(x, weight, EPS, offset, residual)
    assert y.dtype == dtype and h.dtype == dtype
    assert_accurate("y", y, y_e, y_r, dtype)
    assert_accurate("rstd", rstd, rstd_e, rstd_r, torch.float32)
    assert_accurate("h", h, h_e, h_r, dtype)

    dy = make("row_strided", n, dtype, device)
    dh_extra = make("contiguous", n, dtype, device)
    dh, dw = rms.rms_norm_backward(
        dy, h, weight, rstd, offset, cast_before_scale, dh_extra=dh_extra
    )

    eager = lambda h_, w_: eager_forward(h_, w_, EPS, offset, cast_before_scale)[0]  # noqa: E731
    ref = lambda h_, w_: ref64_forward(h_, w_, EPS, offset)[0]  # noqa: E731
    dh_e, dw_e = _grads(eager, dy, h, weight, dh_extra)
    dh_r, dw_r = _grads(ref, dy, h, weight, dh_extra, dtype=torch.float64)
    assert dh.dtype == dtype and dw.dtype == dtype
    assert_accurate("dh", dh, dh_e, dh_r, dtype)
    assert_accurate("dweight", dw, dw_e, dw_r, dtype)


# ----------------------------------------------------------------------- edge cases, API


def test_empty_rows(rms, device):
    x = torch.randn(0, 37, device=device)
    weight = make_weight(37, torch.float32, device)
    y, rstd, h = rms.rms_norm_forward(x, weight, EPS, 0.0, True, residual=torch.randn_like(x))
    assert y.shape == (0, 37) and rstd.shape == (0,) and h.shape == (0, 37)
    dh, dw = rms.rms_norm_backward(torch.randn_like(x), x, weight, rstd, 0.0, True)
    assert dh.shape == (0, 37)
    assert dw.shape == (37,) and dw.dtype == weight.dtype and not dw.any()


def test_repo_root_loads_host_variant(load_kernel):
    """The repo root (not a variant directory) loads the variant ``kernels`` selects for
    this machine's torch build: torch-cpu on a CPU-only build."""
    module = load_kernel(REPO)
    expected = "torch-cuda" if torch.version.cuda is not None else "torch-cpu"
    assert Path(module.__file__).parent.name == expected
    assert module.__name__ == "_hubcompile_rmsnorm_" + expected.removeprefix("torch-")
    x = torch.randn(7, 37)
    weight = make_weight(37, torch.float32, "cpu")
    if expected == "torch-cpu":
        y, rstd, h = module.rms_norm_forward(x, weight, EPS, 0.0, True)
        y_e, rstd_e, _ = eager_forward(x, weight, EPS, 0.0, True)
        assert_accurate("y", y, y_e, ref64_forward(x, weight, EPS, 0.0)[0], torch.float32)
    else:
        assert callable(module.rms_norm_forward) and callable(module.rms_norm_backward)


def test_triton_variant_rejects_cpu_tensors_unless_interpreted(load_kernel):
    rms = load_kernel(REPO, "torch-cuda")
    x, weight = torch.randn(3, 8), torch.randn(8)
    if rms._rmsnorm_triton._interpreted():
        assert rms.rms_norm_forward(x, weight, EPS, 0.0, True)[0].shape == (3, 8)
    else:
        with pytest.raises(RuntimeError, match="torch-cpu variant"):
            rms.rms_norm_forward(x, weight, EPS, 0.0, True)
