"""Tests for the bundled ``hubcompile-layer-norm`` kernel repository.

Both build variants load from their directories with ``kernels.get_local_kernel``
(``build/torch-cuda`` is Triton: on CPU it runs under TRITON_INTERPRET=1, set by
conftest.py). Every result is compared with float64: the kernel passes when
``rmse(kernel, ref64) <= k * rmse(eager in the input dtype, ref64) + floor``, forward and
backward, where eager is ``F.layer_norm`` (after ``x + residual``) in the input dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hubcompile.lowering.numerics import compare, tolerance_for

REPO = "layer-norm"
VARIANTS = ["torch-cuda", "torch-cpu"]
DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-5
# weight and bias present or not (nn.LayerNorm, bias=False, elementwise_affine=False)
AFFINE = [pytest.param(True, True, id="affine"), pytest.param(True, False, id="no_bias"),
          pytest.param(False, False, id="no_affine")]


def assert_accurate(what, new, eager, ref64, dtype):
    result = compare(what, new, eager, ref64, tolerance_for(dtype))
    assert torch.isfinite(new).all(), f"{what}: non-finite values"
    assert result.ok, str(result)


def strided(rows: int, n: int, dtype, device) -> torch.Tensor:
    """[rows, n] rows one stride (n + 5) apart, at storage offset 2."""
    t = torch.randn(rows, n + 5, dtype=dtype, device=device)[:, 2:2 + n]
    assert not t.is_contiguous()
    return t


def params(n, dtype, device, weight: bool, bias: bool, param_dtype=None):
    dtype = param_dtype or dtype
    w = (1 + 0.5 * torch.randn(n, dtype=torch.float32, device=device)).to(dtype) if weight else None
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    return w, b


def run(ln, x, w, b, residual=None):
    """Forward and backward of the kernel, eager in the input dtype and float64: {name:
    (kernel, eager, float64)} for y, h, mean, rstd and the gradients."""
    leaves = [t for t in (x, residual, w, b) if t is not None]
    y, mean, rstd, h = ln.layer_norm_forward(x, w, b, EPS, residual=residual)
    dy = torch.randn(y.shape, dtype=torch.float64, device=y.device)
    dh_extra = torch.randn(y.shape, dtype=torch.float64, device=y.device) if residual is not None else None
    dh, dw, db = ln.layer_norm_backward(dy.to(y.dtype), h, w, b, mean, rstd,
                                        dh_extra.to(h.dtype) if dh_extra is not None else None)

    def eager(x, residual, w, b, double):
        xs = [t.detach().double() if double and t is not None else (t.detach() if t is not None else None)
              for t in (x, residual, w, b)]
        xs = [t.requires_grad_(True) if t is not None else None for t in xs]
        hh = xs[0] if xs[1] is None else xs[0] + xs[1]
        mixed = any(t is not None and t.dtype != hh.dtype for t in xs[2:])
        # fp32 parameters beside bf16 activations: eager as the models write it, upcast
        # around the norm (CUDA's layer_norm takes no mixed dtypes; only CPU's does)
        yy = F.layer_norm(hh.float() if mixed else hh, (hh.shape[-1],), xs[2], xs[3], EPS).to(hh.dtype)
        outs, cots = [yy], [dy.to(yy.dtype)]
        if residual is not None:
            outs.append(hh)
            cots.append(dh_extra.to(hh.dtype))
        grads = torch.autograd.grad(outs, [t for t in xs if t is not None], cots)
        return yy.detach(), hh.detach(), grads

    e_y, e_h, e_grads = eager(x, residual, w, b, False)
    r_y, r_h, r_grads = eager(x, residual, w, b, True)
    # The statistics are those of h as rounded to its dtype (eager's h), in float64.
    var, r_mu = torch.var_mean(e_h.double(), dim=-1, correction=0)
    r_rstd = torch.rsqrt(var + EPS)
    e_mu, e_rstd = r_mu.float(), r_rstd.float()
    # dh is the gradient of both x and residual in the fused add
    kernel_grads = [dh] + ([dh] if residual is not None else []) + [g for g in (dw, db) if g is not None]
    out = {"y": (y, e_y, r_y), "mean": (mean, e_mu, r_mu), "rstd": (rstd, e_rstd, r_rstd)}
    if residual is not None:
        out["h"] = (h, e_h, r_h)
    names = ["dx"] + (["dresidual"] if residual is not None else []) + (["dweight"] if w is not None else []) \
        + (["dbias"] if b is not None else [])
    assert len(kernel_grads) == len(e_grads) == len(leaves)
    for name, k, e, r in zip(names, kernel_grads, e_grads, r_grads):
        out[name] = (k, e, r)
    return out


def check(results, dtype):
    for name, (new, eager, ref) in results.items():
        if name in ("mean", "rstd"):  # fp32 statistics, whatever the input dtype
            assert new.dtype == torch.float32 and new.shape == ref.shape
            assert_accurate(name, new, eager, ref, torch.float32)
            continue
        assert new.dtype == eager.dtype and new.shape == eager.shape, name
        assert_accurate(name, new, eager, ref, dtype)


@pytest.mark.parametrize("weight, bias", AFFINE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_against_float64(load_kernel, device, variant, dtype, weight, bias):
    """Odd hidden size, a strided input, with and without weight and bias."""
    ln = load_kernel(REPO, variant)
    x = strided(7, 37, dtype, device)
    w, b = params(37, dtype, device, weight, bias)
    check(run(ln, x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_residual_add(load_kernel, device, variant, dtype):
    """h = x + residual is returned rounded as eager rounds it, and both get dh (+ the
    sum's own gradient)."""
    ln = load_kernel(REPO, variant)
    x = torch.randn(3, 5, 129, dtype=dtype, device=device)
    residual = torch.randn(5, 3, 129, dtype=dtype, device=device).transpose(0, 1)
    w, b = params(129, dtype, device, True, True)
    check(run(ln, x, w, b, residual), dtype)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_activations_with_fp32_parameters(load_kernel, device, variant):
    """Models that upcast around the norm: bf16 input, fp32 weight and bias; y in bf16."""
    ln = load_kernel(REPO, variant)
    x = torch.randn(9, 65, dtype=torch.bfloat16, device=device)
    w, b = params(65, torch.bfloat16, device, True, True, param_dtype=torch.float32)
    results = run(ln, x, w, b)
    assert results["y"][0].dtype == torch.bfloat16 and results["dweight"][0].dtype == torch.float32
    check(results, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_long_row_path(load_kernel, device, monkeypatch, dtype):
    """Shrink the block limits so that hidden 37 takes the looping kernels (3 blocks of 16,
    the last one partial) used for very large hidden sizes, forward and backward."""
    ln = load_kernel(REPO, "torch-cuda")
    monkeypatch.setattr(ln._layer_norm_triton, "MAX_FUSED_BLOCK", 32)
    monkeypatch.setattr(ln._layer_norm_triton, "LOOP_BLOCK", 16)
    x = strided(7, 37, dtype, device)
    residual = torch.randn(7, 37, dtype=dtype, device=device)
    w, b = params(37, dtype, device, True, True)
    check(run(ln, x + 3.0, w, b, residual), dtype)  # a mean far from 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_rows(load_kernel, device, variant):
    ln = load_kernel(REPO, variant)
    x = torch.randn(0, 16, device=device)
    w, b = params(16, torch.float32, device, True, True)
    y, mean, rstd, h = ln.layer_norm_forward(x, w, b, EPS)
    dh, dw, db = ln.layer_norm_backward(y, h, w, b, mean, rstd)
    assert y.shape == dh.shape == (0, 16) and mean.shape == (0,)
    assert torch.equal(dw, torch.zeros(16, device=device)) and torch.equal(db, torch.zeros(16, device=device))
