"""Accuracy rule shared by the tests: compare against a float64 reference, never eager
against fused directly (FIELD_NOTES section 2, torch._dynamo.utils.same)."""

import torch

K = {torch.float32: 2.0, torch.bfloat16: 3.0, torch.float16: 3.0}
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def rmse(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def assert_close_to_reference(new, original, ref64, dtype, what=""):
    """new's error vs ref64 is at most k * original's error + floor (relative to ref scale)."""
    scale = ref64.double().pow(2).mean().sqrt().item() or 1.0
    err_new, err_orig = rmse(new, ref64), rmse(original, ref64)
    bound = K[dtype] * err_orig + FLOOR[dtype] * scale
    assert torch.isfinite(new).all(), f"{what}: non-finite values"
    assert err_new <= bound, f"{what}: rmse {err_new:.3g} > bound {bound:.3g} (original {err_orig:.3g})"
