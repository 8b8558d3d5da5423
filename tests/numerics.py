"""Accuracy rule shared by the tests: the one the guards apply
(hubcompile/lowering/numerics.py), as an assertion."""

import torch

from hubcompile.lowering.numerics import compare, tolerance_for


def assert_close_to_reference(new, original, ref64, dtype, what=""):
    """new's error vs ref64 is at most k * original's error + floor (relative to ref scale)."""
    result = compare(what, new, original, ref64, tolerance_for(dtype))
    assert torch.isfinite(new).all(), f"{what}: non-finite values"
    assert result.ok, str(result)
