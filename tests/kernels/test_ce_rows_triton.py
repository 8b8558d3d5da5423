"""Tests for the row-wise cross-entropy Triton kernel of the linear-cross-entropy repo.

``build/torch-universal/_ce_rows_triton.py`` is loaded straight from its path. Without a
GPU its kernel runs on CPU tensors under TRITON_INTERPRET=1 (set here and by conftest.py
before triton is imported). Every result is compared with a float64 reference written
here, whose gradient is torch.autograd's: the kernel passes when
``err(kernel, ref64) <= k * err(eager torch in the input dtype, ref64) + floor * scale(ref)``
for the RMS and the max-abs error.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

KERNEL_PATH = (
    Path(__file__).resolve().parents[2]
    / "hubcompile/lowering/bundled/linear-cross-entropy/build/torch-universal/_ce_rows_triton.py"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
K = {torch.float32: 2.0, torch.bfloat16: 3.0, torch.float16: 3.0}
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3}
DTYPES = [torch.float32, torch.bfloat16]
# (scale, softcap)
TRANSFORMS = [
    pytest.param(1.0, 0.0, id="plain"),
    pytest.param(0.37, 0.0, id="scale"),
    pytest.param(1.0, 3.0, id="softcap"),
    pytest.param(0.37, 3.0, id="scale_softcap"),
]
# (write the gradient, where to, with a tangent)
GRADS = [
    pytest.param(None, False, id="no_grad"),
    pytest.param("separate", False, id="grad"),
    pytest.param("separate", True, id="grad_tangent"),
    pytest.param("alias", False, id="grad_inplace"),
    pytest.param("alias", True, id="grad_inplace_tangent"),
]


def _load():
    spec = importlib.util.spec_from_file_location("_ce_rows_triton_under_test", KERNEL_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ce = _load()


# ------------------------------------------------------------------------------ helpers


def logits(c, V, dtype, row_pad=0):
    """Random non-zero logits (std 3, so the softcap bends them); with ``row_pad`` a
    row-strided view (columns 3 .. 3+V of rows V + row_pad wide) of a bigger buffer."""
    if row_pad:
        buf = (3 * torch.randn(c, V + row_pad, device=DEVICE)).to(dtype)
        x = buf[:, 3 : 3 + V]
        assert not x.is_contiguous() or c <= 1
        return x, buf
    return (3 * torch.randn(c, V, device=DEVICE)).to(dtype), None


def targets(c, V, ignored_rows=()):
    t = torch.randint(0, V, (c,), device=DEVICE)
    for r in ignored_rows:
        t[r] = IGNORE
    return t


def transform(x, scale, softcap):
    z = x * scale if scale != 1.0 else x
    return softcap * torch.tanh(z / softcap) if softcap > 0 else z


def forward_and_grad(x, target, ignore_index, scale, softcap, grad_scale, tangent, dtype):
    """(loss_rows, lse, d objective / dx), computed with torch ops in ``dtype``; the
    objective is ``sum(loss_rows * grad_scale) + sum(z * tangent)``. float64 is the
    reference (its own logsumexp and gather); lower dtypes are eager model code
    (F.cross_entropy)."""
    xd = x.detach().to(dtype).requires_grad_()
    z = transform(xd, scale, softcap)
    lse = torch.logsumexp(z, -1)
    if dtype == torch.float64:
        keep = target != ignore_index
        picked = z.gather(1, torch.where(keep, target, 0)[:, None]).squeeze(1)
        loss = torch.where(keep, lse - picked, torch.zeros_like(lse))
    else:
        loss = F.cross_entropy(z, target, ignore_index=ignore_index, reduction="none")
    obj = (loss * grad_scale.to(dtype)).sum()
    if tangent is not None:
        obj = obj + (z * tangent.to(dtype)).sum()
    (grad,) = torch.autograd.grad(obj, xd)
    return loss.detach(), lse.detach(), grad


def assert_accurate(name, got, eager, ref, dtype):
    """err(got, ref) <= k * err(eager, ref) + floor * size(ref), RMS and max-abs."""
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    got, eager, ref = got.double().cpu(), eager.double().cpu(), ref.double().cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if ref.numel() == 0:
        return
    k, floor = K[dtype], FLOOR[dtype]
    d_got, d_eager = got - ref, eager - ref
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    bound = k * rms(d_eager) + floor * rms(ref)
    assert rms(d_got) <= bound, f"{name}: rms err {rms(d_got):.3e} > {bound:.3e}"
    bound = k * d_eager.abs().max().item() + floor * ref.abs().max().item()
    err = d_got.abs().max().item()
    assert err <= bound, f"{name}: max err {err:.3e} > {bound:.3e}"


def run_and_check(x, target, scale, softcap, grad_mode, with_tangent, *, ignore_index=IGNORE,
                  tangent_dtype=None, block_v=None, grad_scale=None):
    """Run the kernel on ``x`` (overwritten when grad_mode == "alias") and compare the
    loss rows, lse and (when asked) the gradient with the references. Returns the
    kernel's (loss, lse, grad)."""
    dtype = x.dtype
    c, V = x.shape
    x0 = x.detach().clone()
    if grad_scale is None:
        grad_scale = torch.tensor(0.7, device=DEVICE)
    tangent = None
    if with_tangent:
        tangent = torch.randn(c, V, device=DEVICE).to(tangent_dtype or dtype)
    grad_out = None
    if grad_mode == "separate":
        grad_out = torch.full_like(x, float("nan"))
    elif grad_mode == "alias":
        grad_out = x

    loss, lse = ce.cross_entropy_rows(
        x, target, ignore_index, scale, softcap,
        grad_scale=grad_scale if grad_mode else None, tangent=tangent, grad_out=grad_out,
        block_v=block_v,
    )

    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    assert loss.shape == (c,) and lse.shape == (c,)
    if grad_mode is None:
        assert torch.equal(x, x0), "x must be left alone without grad_out"
    args = (x0, target, ignore_index, scale, softcap, grad_scale, tangent)
    loss_r, lse_r, grad_r = forward_and_grad(*args, torch.float64)
    loss_e, lse_e, grad_e = forward_and_grad(*args, dtype)
    assert_accurate("loss", loss, loss_e, loss_r, dtype)
    assert_accurate("lse", lse, lse_e, lse_r, dtype)
    ignored = target == ignore_index
    assert (loss[ignored] == 0).all(), "ignored rows have loss 0"
    if grad_mode is not None:
        assert grad_out.dtype == dtype and grad_out.shape == (c, V)
        assert_accurate("grad", grad_out, grad_e, grad_r, dtype)
        if tangent is None:
            assert (grad_out[ignored] == 0).all(), "ignored rows have gradient 0"
    return loss, lse, grad_out


# ---------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("grad_mode, with_tangent", GRADS)
@pytest.mark.parametrize("scale, softcap", TRANSFORMS)
@pytest.mark.parametrize("V", [37, 1001])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows(dtype, V, scale, softcap, grad_mode, with_tangent):
    """5 rows, row 1 ignored."""
    x, _ = logits(5, V, dtype)
    run_and_check(x, targets(5, V, ignored_rows=[1]), scale, softcap, grad_mode, with_tangent)


@pytest.mark.parametrize(
    "V, block_v",
    [(37, 16), (1001, 64), (4099, 1024), (ce.MAX_BLOCK_V + 3, None)],
    ids=["37x16", "1001x64", "4099x1024", "max_block_plus_3"],
)
@pytest.mark.parametrize("scale, softcap", TRANSFORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_block(dtype, V, block_v, scale, softcap):
    """Rows longer than one block (the last one partial): the online max/sum path and the
    block-by-block in-place gradient."""
    block = block_v or ce._default_block(V)
    assert V > block and V % block
    x, _ = logits(3, V, dtype)
    run_and_check(x, targets(3, V, ignored_rows=[2]), scale, softcap, "alias", True, block_v=block_v)


@pytest.mark.parametrize("grad_mode", ["separate", "alias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_strided(dtype, grad_mode):
    """x is a slice of a wider buffer; with grad_out = x, the gradient lands in the slice and
    the buffer's other columns stay as they were. The tangent and grad_out are strided too."""
    c, V, block = 5, 37, 16
    x, buf = logits(c, V, dtype, row_pad=11)
    buf0 = buf.clone()
    target = targets(c, V, ignored_rows=[0])
    if grad_mode == "separate":
        gbuf = torch.zeros(c, V + 5, dtype=dtype, device=DEVICE)
        grad_out = gbuf[:, 2 : 2 + V]
    else:
        grad_out = x
    tbuf = torch.randn(c, 2 * V, device=DEVICE).to(dtype)
    tangent = tbuf[:, V:]
    grad_scale = torch.tensor(1.0 / 3, device=DEVICE)
    x0 = x.clone()

    loss, lse = ce.cross_entropy_rows(
        x, target, IGNORE, 0.37, 3.0, grad_scale=grad_scale, tangent=tangent, grad_out=grad_out, block_v=block
    )

    args = (x0, target, IGNORE, 0.37, 3.0, grad_scale, tangent)
    loss_r, lse_r, grad_r = forward_and_grad(*args, torch.float64)
    loss_e, lse_e, grad_e = forward_and_grad(*args, dtype)
    assert_accurate("loss", loss, loss_e, loss_r, dtype)
    assert_accurate("lse", lse, lse_e, lse_r, dtype)
    assert_accurate("grad", grad_out, grad_e, grad_r, dtype)
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[:, 3 : 3 + V] = False
    if grad_mode == "alias":
        assert torch.equal(buf[outside], buf0[outside]), "columns outside the slice were written"
    else:
        assert torch.equal(buf, buf0), "x was written"
        assert not gbuf[:, :2].any() and not gbuf[:, 2 + V :].any(), "grad_out's buffer written outside the slice"


@pytest.mark.parametrize("grad_mode, with_tangent", GRADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_row(dtype, grad_mode, with_tangent):
    x, _ = logits(1, 1001, dtype)
    run_and_check(x, targets(1, 1001), 0.37, 3.0, grad_mode, with_tangent, block_v=256)


def test_fp16_and_fp32_tangent():
    """fp16 logits; a tangent in another dtype (fp32) than x."""
    x, _ = logits(5, 1001, torch.float16)
    run_and_check(x, targets(5, 1001, [3]), 1.0, 3.0, "alias", True, tangent_dtype=torch.float32)
    x, _ = logits(5, 37, torch.bfloat16)
    run_and_check(x, targets(5, 37, [3]), 0.37, 0.0, "separate", True, tangent_dtype=torch.float32)


# ------------------------------------------------------------------------ ignore_index


@pytest.mark.parametrize("with_tangent", [False, True], ids=["no_tangent", "tangent"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_rows_ignored(dtype, with_tangent):
    """Every row ignored: loss 0, and the gradient is 0 (or the tangent chained through
    the transform); lse is still each row's log-sum-exp."""
    x, _ = logits(4, 37, dtype)
    target = torch.full((4,), IGNORE, device=DEVICE)
    loss, lse, grad = run_and_check(x, target, 0.37, 3.0, "separate", with_tangent)
    assert (loss == 0).all()
    assert torch.isfinite(lse).all() and (lse != 0).all()
    if not with_tangent:
        assert (grad == 0).all()
    else:
        assert (grad != 0).any()


def test_ignore_index_inside_the_vocabulary():
    """ignore_index may be a valid class id (here 3): rows whose target is 3 are ignored."""
    V = 37
    x, _ = logits(6, V, torch.float32)
    target = torch.tensor([3, 0, 3, 36, 5, 3], device=DEVICE)
    loss, _, grad = run_and_check(x, target, 1.0, 0.0, "separate", False, ignore_index=3)
    assert (loss[target == 3] == 0).all() and (loss[target != 3] > 0).all()
    assert (grad[target == 3] == 0).all()


def test_grad_scale_zero_and_fp64():
    """grad_scale is read on the device in any float dtype; 0 zeroes the loss part."""
    x, _ = logits(3, 37, torch.float32)
    target = targets(3, 37)
    run_and_check(x, target, 1.0, 3.0, "separate", True, grad_scale=torch.tensor([0.25], dtype=torch.float64, device=DEVICE))
    x, _ = logits(3, 37, torch.float32)
    _, _, grad = run_and_check(x, target, 1.0, 0.0, "separate", False, grad_scale=torch.zeros((), device=DEVICE))
    assert (grad == 0).all()


# -------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("grad_mode, with_tangent", [(None, False), ("separate", True), ("alias", False)])
def test_no_rows(grad_mode, with_tangent):
    x = torch.randn(0, 37, device=DEVICE)
    loss, lse, _ = run_and_check(x, targets(0, 37), 0.37, 3.0, grad_mode, with_tangent)
    assert loss.shape == (0,) and lse.shape == (0,)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_masked_logits():
    """-inf logits (a padded vocabulary) take no probability; a row of -inf has lse -inf."""
    V = 37
    x, _ = logits(4, V, torch.float32)
    x[:, 30:] = float("-inf")
    x[0, :] = float("-inf")
    x[1, 0:5] = float("-inf")  # some -inf in the first block too
    target = torch.tensor([IGNORE, 7, 29, 12], device=DEVICE)
    grad = torch.empty_like(x)
    loss, lse = ce.cross_entropy_rows(
        x, target, IGNORE, 1.0, 0.0, grad_scale=torch.tensor(1.0, device=DEVICE), grad_out=grad, block_v=16
    )
    assert lse[0] == float("-inf") and loss[0] == 0 and (grad[0] == 0).all()
    args = (x[1:], target[1:], IGNORE, 1.0, 0.0, torch.tensor(1.0), None)
    loss_r, lse_r, grad_r = forward_and_grad(*args, torch.float64)
    loss_e, lse_e, grad_e = forward_and_grad(*args, torch.float32)
    assert_accurate("loss", loss[1:], loss_e, loss_r, torch.float32)
    assert_accurate("lse", lse[1:], lse_e, lse_r, torch.float32)
    assert_accurate("grad", grad[1:], grad_e, grad_r, torch.float32)
    assert (grad[1:, 30:] == 0).all() and (grad[1, 0:5] == 0).all()


def test_target_out_of_range_gives_nan():
    """A target outside [0, V) that is not ignore_index cannot raise on the device: its
    row's loss and gradient are nan; other rows are unaffected."""
    x, _ = logits(3, 37, torch.float32)
    target = torch.tensor([37, 4, -1], device=DEVICE)
    grad = torch.empty_like(x)
    loss, lse = ce.cross_entropy_rows(
        x, target, IGNORE, 1.0, 0.0, grad_scale=torch.tensor(1.0, device=DEVICE), grad_out=grad
    )
    assert torch.isnan(loss[0]) and torch.isnan(loss[2]) and torch.isfinite(loss[1])
    assert torch.isnan(grad[0]).all() and torch.isnan(grad[2]).all() and torch.isfinite(grad[1]).all()
    assert torch.isfinite(lse).all()


def test_default_block_and_warps():
    assert ce._default_block(37) == 64
    assert ce._default_block(4099) == ce.MAX_BLOCK_V or 4099 <= ce.MAX_BLOCK_V
    assert ce._default_block(262144) == ce.MAX_BLOCK_V
    assert ce.MAX_BLOCK_V & (ce.MAX_BLOCK_V - 1) == 0
    assert ce._num_warps(64) == 1 and ce._num_warps(ce.MAX_BLOCK_V) <= 16


def test_module_imports_only_torch_and_triton():
    import ast

    tree = ast.parse(KERNEL_PATH.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    assert names <= {"torch", "triton", "triton.language"}, names


# ---------------------------------------------------------------------------- validation


def _valid():
    x = torch.randn(3, 37, device=DEVICE)
    return dict(
        x=x, target=targets(3, 37), ignore_index=IGNORE, scale=1.0, softcap=0.0,
        grad_scale=torch.tensor(1.0, device=DEVICE), tangent=torch.randn_like(x), grad_out=torch.empty_like(x),
    )


def _bad_cases():
    x = torch.randn(3, 37, device=DEVICE)
    wide = torch.randn(3, 74, device=DEVICE)
    return [
        ("x_1d", dict(x=torch.randn(37, device=DEVICE)), "x must be 2-d"),
        ("x_int", dict(x=torch.ones(3, 37, dtype=torch.int32, device=DEVICE)), "x dtype must be one of"),
        ("x_fp64", dict(x=torch.randn(3, 37, dtype=torch.float64, device=DEVICE)), "x dtype must be one of"),
        ("x_col_strided", dict(x=wide[:, ::2], tangent=None, grad_out=None), "x must have last-dim stride 1"),
        ("x_no_columns", dict(x=torch.randn(3, 0, device=DEVICE), tangent=None, grad_out=None), "V >= 1"),
        ("x_not_tensor", dict(x=[[1.0]]), "x must be a torch.Tensor"),
        ("target_shape", dict(target=targets(4, 37)), r"target must have shape \(3,\)"),
        ("target_2d", dict(target=targets(3, 37)[:, None]), r"target must have shape \(3,\)"),
        ("target_int32", dict(target=targets(3, 37).int()), "target dtype must be torch.int64"),
        ("ignore_index_float", dict(ignore_index=-100.0), "ignore_index must be an int"),
        ("softcap_negative", dict(softcap=-1.0), "softcap must be 0"),
        ("softcap_inf", dict(softcap=float("inf")), "softcap must be 0"),
        ("scale_nan", dict(scale=float("nan")), "scale must be a finite number"),
        ("grad_scale_missing", dict(grad_scale=None), "grad_scale is required"),
        ("grad_scale_float", dict(grad_scale=0.5), "grad_scale must be a 1-element"),
        ("grad_scale_shape", dict(grad_scale=torch.ones(2, device=DEVICE)), "grad_scale must be a 1-element"),
        ("grad_scale_int", dict(grad_scale=torch.tensor(1, device=DEVICE)), "grad_scale must be a 1-element"),
        ("grad_out_shape", dict(grad_out=torch.empty(3, 36, device=DEVICE)), "grad_out must have x's shape"),
        ("grad_out_dtype", dict(grad_out=torch.empty(3, 37, dtype=torch.bfloat16, device=DEVICE)), "grad_out dtype"),
        ("grad_out_col_strided", dict(grad_out=wide[:, 1::2]), "grad_out must have last-dim stride 1"),
        ("grad_out_rows_overlap", dict(grad_out=torch.empty(1, 37, device=DEVICE).expand(3, 37)), "grad_out rows"),
        ("grad_out_shifted_x", dict(x=wide[:, :37], grad_out=wide[:, 1:38]), "grad_out overlaps x"),
        ("grad_out_shifted_tangent", dict(x=x, tangent=wide[:, :37], grad_out=wide[:, 5:42]), "grad_out overlaps tangent"),
        ("tangent_shape", dict(tangent=torch.randn(3, 38, device=DEVICE)), "tangent must have x's shape"),
        ("tangent_int", dict(tangent=torch.ones(3, 37, dtype=torch.int64, device=DEVICE)), "tangent dtype"),
        ("tangent_col_strided", dict(tangent=wide[:, ::2]), "tangent must have last-dim stride 1"),
        ("block_v_not_pow2", dict(block_v=48), "block_v must be a positive power of two"),
        ("block_v_zero", dict(block_v=0), "block_v must be a positive power of two"),
    ]


@pytest.mark.parametrize("bad, match", [pytest.param(b, m, id=i) for i, b, m in _bad_cases()])
def test_rejects(bad, match):
    kwargs = {**_valid(), **bad}
    with pytest.raises(ValueError, match=match):
        ce.cross_entropy_rows(**kwargs)


def test_x_as_its_own_tangent_and_grad_out():
    """Exact aliasing is allowed everywhere: x may be grad_out and the tangent at once."""
    x, _ = logits(3, 37, torch.float32)
    x0 = x.clone()
    target = targets(3, 37)
    gs = torch.tensor(0.5, device=DEVICE)
    ce.cross_entropy_rows(x, target, IGNORE, 1.0, 3.0, grad_scale=gs, tangent=x, grad_out=x, block_v=16)
    args = (x0, target, IGNORE, 1.0, 3.0, gs, x0)
    _, _, grad_r = forward_and_grad(*args, torch.float64)
    _, _, grad_e = forward_and_grad(*args, torch.float32)
    assert_accurate("grad", x, grad_e, grad_r, torch.float32)


@pytest.mark.skipif(DEVICE != "cpu", reason="only the interpreter takes CPU tensors")
def test_cpu_tensors_run_in_the_interpreter():
    assert ce._interpreted()
