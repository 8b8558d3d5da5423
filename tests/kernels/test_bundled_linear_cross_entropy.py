"""The bundled ``hubcompile-linear-cross-entropy`` repo: its Triton row kernel (on CPU
tensors under TRITON_INTERPRET=1 here) and its torch rows, each against float64
autograd, and the chunked forward/backward driving the Triton rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

REPO = "linear-cross-entropy"
K = {torch.float32: 2.0, torch.bfloat16: 3.0}
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3}


@pytest.fixture(scope="module")
def lce(load_kernel):
    return load_kernel(REPO, "torch-cuda")


def rmse(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item() if a.numel() else 0.0


# Triton's interpreter converts fp32 to bf16 by truncation, not round-to-nearest (checked
# on triton 3.9): up to twice the rounding error of a GPU, so twice the slack there.
INTERPRETED = not torch.cuda.is_available()


def assert_accurate(new, eager, ref, dtype, what, truncated=False):
    scale = ref.double().pow(2).mean().sqrt().item() if ref.numel() else 0.0
    bound = K[dtype] * (2 if truncated else 1) * rmse(eager, ref) + FLOOR[dtype] * scale
    assert torch.isfinite(new).all(), what
    assert rmse(new, ref) <= bound, f"{what}: rmse {rmse(new, ref):.3g} > {bound:.3g}"


def reference_rows(x, target, scale, softcap, grad_scale, tangent):
    """(loss rows, lse, d/dx of sum(loss * grad_scale) + sum(z * tangent)) by autograd in x's dtype."""
    x = x.detach().requires_grad_()
    z = x * scale
    if softcap > 0:
        z = torch.tanh(z / softcap) * softcap
    loss = F.cross_entropy(z, target, ignore_index=-100, reduction="none")
    total = (loss * grad_scale.to(loss.dtype)).sum() + ((z * tangent.to(z.dtype)).sum() if tangent is not None else 0)
    (grad,) = torch.autograd.grad(total, x)
    return loss.detach(), torch.logsumexp(z.detach(), -1), grad


def make(c, vocab, dtype, device, layout):
    if layout == "row_strided":  # rows of a wider buffer
        x = (torch.randn(c, vocab + 9, device=device) * 3).to(dtype)[:, 2:2 + vocab]
    else:
        x = (torch.randn(c, vocab, device=device) * 3).to(dtype)
    target = torch.randint(0, vocab, (c,), device=device)
    target[::3] = -100
    return x, target


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("transform", [(1.0, 0.0), (0.37, 0.0), (1.0, 3.0), (0.5, 3.0)], ids=str)
@pytest.mark.parametrize("shape", [(5, 37), (4, 1001), (1, 37)], ids=str)
@pytest.mark.parametrize("grad", ["none", "separate", "in_place", "tangent"])
def test_rows_against_float64(lce, device, impl, dtype, transform, shape, grad):
    scale, softcap = transform
    c, vocab = shape
    x, target = make(c, vocab, dtype, device, "row_strided" if grad == "separate" else "dense")
    grad_scale = torch.tensor(0.3, device=device)
    tangent = (torch.randn(c, vocab, device=device) * 0.01).to(dtype) if grad == "tangent" else None
    x_in = x.clone()
    rows = (lambda *a, **k: lce._rows_triton(*a, block=16, **k)) if impl == "triton" else lce.cross_entropy_rows_torch
    grad_out = None if grad == "none" else (x_in if grad == "in_place" else torch.empty_like(x))
    loss, lse = rows(x_in, target, -100, scale, softcap, grad_scale=grad_scale if grad_out is not None else None,
                     tangent=tangent, grad_out=grad_out)
    e_loss, e_lse, e_grad = reference_rows(x, target, scale, softcap, grad_scale, tangent)
    r_loss, r_lse, r_grad = reference_rows(x.double(), target, scale, softcap, grad_scale.double(),
                                           tangent.double() if tangent is not None else None)
    assert loss.dtype == lse.dtype == torch.float32
    assert torch.equal(loss[target == -100], torch.zeros_like(loss[target == -100]))
    assert_accurate(loss, e_loss, r_loss, dtype, "loss")
    assert_accurate(lse, e_lse, r_lse, dtype, "lse")
    if grad_out is not None:
        assert grad_out.dtype == dtype
        assert_accurate(grad_out, e_grad, r_grad, dtype, "grad", truncated=impl == "triton" and INTERPRETED)


def test_rows_empty_and_all_ignored(lce, device):
    x = torch.randn(0, 37, device=device)
    loss, lse = lce._rows_triton(x, torch.empty(0, dtype=torch.int64, device=device), -100, 1.0, 0.0)
    assert loss.shape == lse.shape == (0,)
    x = torch.randn(3, 37, device=device)
    g = torch.full_like(x, 7.0)
    loss, _ = lce._rows_triton(x, torch.full((3,), -100, device=device), -100, 1.0, 0.0,
                               grad_scale=torch.tensor(1.0, device=device), grad_out=g)
    assert torch.equal(loss, torch.zeros(3, device=device)) and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("bad", ["x_1d", "target_dtype", "no_grad_scale", "tangent_shape"])
def test_rows_bad_input_errors_name_the_value(lce, device, bad):
    x, t = torch.randn(3, 37, device=device), torch.randint(0, 37, (3,), device=device)
    kwargs = {}
    if bad == "x_1d":
        x = x[0]
    elif bad == "target_dtype":
        t = t.int()
    elif bad == "no_grad_scale":
        kwargs = {"grad_out": torch.empty_like(x)}
    else:
        kwargs = {"tangent": torch.randn(3, 36, device=device)}
    with pytest.raises(ValueError, match="x must|target must|grad_scale|tangent must"):
        lce._rows_triton(x, t, -100, 1.0, 0.0, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_logits", [False, True])
def test_chunked_forward_backward_with_triton_rows(lce, device, dtype, with_logits, monkeypatch):
    """The chunk driver over the Triton rows, chunks of 3 rows of a 37-word vocab."""
    monkeypatch.setattr(lce, "_TRITON_ON_CPU", True)
    monkeypatch.setattr(lce, "MAX_CHUNK_BYTES", 3 * 37 * 4)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(10, 9, generator=g).to(dtype).to(device)
    w = torch.randn(37, 9, generator=g).to(dtype).to(device)
    b = torch.randn(37, generator=g).to(dtype).to(device)
    t = torch.randint(0, 37, (10,), generator=g).to(device)
    t[[1, 5]] = -100

    def reference(h, w, b, dtype_of_z):
        z = torch.tanh(F.linear(h, w, b).to(dtype_of_z) * 0.5 / 2.5) * 2.5
        return F.cross_entropy(z, t, ignore_index=-100)

    ins = [x.detach().requires_grad_() for x in (h, w, b)]
    e_loss = reference(*ins, torch.float32)
    e_grads = torch.autograd.grad(e_loss, ins)
    ins64 = [x.detach().double().requires_grad_() for x in (h, w, b)]
    r_loss = reference(*ins64, torch.float64)
    r_grads = torch.autograd.grad(r_loss, ins64)
    if with_logits:
        loss, logits = lce.linear_cross_entropy_logits_forward(h, w, b, t, -100, "mean", 0.5, 2.5, dtype)
        grads = lce.linear_cross_entropy_logits_backward(torch.tensor(1.0, device=device), None, h, w, b, t, logits,
                                                         -100, "mean", 0.5, 2.5)
    else:
        loss, *grads = lce.linear_cross_entropy_forward(h, w, b, t, -100, "mean", 0.5, 2.5, True)
    assert_accurate(loss.reshape(1), e_loss.reshape(1), r_loss.reshape(1), dtype, "loss")
    for name, new, e, r in zip(("h", "weight", "bias"), grads, e_grads, r_grads):
        assert new.dtype == dtype
        assert_accurate(new, e, r, dtype, f"grad {name}")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_rows_on_transformed_logits_match_rows_on_raw_ones(lce, device, impl):
    """transformed=True (x already soft-capped and scaled, as returned logits are): the same
    loss, and the same gradient with respect to the raw logits."""
    x, target = make(5, 37, torch.float32, device, "dense")
    z = torch.tanh(x * 0.5 / 2.5) * 2.5
    rows = (lambda *a, **k: lce._rows_triton(*a, block=16, **k)) if impl == "triton" else lce.cross_entropy_rows_torch
    gs = torch.tensor(0.7, device=device)
    g_raw, g_done = torch.empty_like(x), torch.empty_like(x)
    loss_raw, lse_raw = rows(x, target, -100, 0.5, 2.5, grad_scale=gs, grad_out=g_raw)
    loss_done, lse_done = rows(z, target, -100, 0.5, 2.5, grad_scale=gs, grad_out=g_done, transformed=True)
    torch.testing.assert_close(loss_done, loss_raw)
    torch.testing.assert_close(lse_done, lse_raw)
    torch.testing.assert_close(g_done, g_raw)
