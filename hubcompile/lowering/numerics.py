"""The accuracy rule every replacement must meet (FIELD_NOTES section 2, after
``torch._dynamo.utils.same``): measured against a float64 reference, the kernel's error
may be at most ``k`` times the error of the code it replaces, plus a small floor
relative to the reference's magnitude. Comparing kernel against original directly
would punish a kernel for being more accurate than the original."""

from __future__ import annotations

import dataclasses

import torch
from torch.overrides import TorchFunctionMode

# Per dtype: (k, floor). fp32 kernels may round differently but not much worse; half
# types legitimately differ by about one rounding of the output (~1e-3 relative).
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2.0, 1e-6),
    torch.float64: (2.0, 1e-12),
    torch.bfloat16: (3.0, 1e-3),
    torch.float16: (3.0, 1e-3),
}
DTYPE_NAMES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
               "float16": torch.float16}


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).pow(2).mean().sqrt().item() if a.numel() else 0.0


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One output (or gradient) of a kernel against the original and float64."""

    what: str  # "out", "out[1]", "grad x", ...
    error: float  # rmse(kernel, float64 reference)
    original_error: float  # rmse(original code, float64 reference)
    bound: float  # k * original_error + floor * rms(reference)
    nonfinite: bool = False  # NaN/Inf where the reference is finite

    @property
    def ok(self) -> bool:
        return not self.nonfinite and self.error <= self.bound

    def __str__(self) -> str:
        if self.nonfinite:
            return f"{self.what}: NaN/Inf where the float64 reference is finite"
        op = "<=" if self.ok else ">"
        return f"{self.what}: rmse {self.error:.3g} {op} bound {self.bound:.3g} (original {self.original_error:.3g})"


def compare(what: str, new: torch.Tensor, original: torch.Tensor, ref64: torch.Tensor,
            tolerance: tuple[float, float]) -> Comparison:
    """Apply the rule to ``new`` (the kernel's result) with ``tolerance = (k, floor)``."""
    k, floor = tolerance
    ref64 = ref64.double()
    if new.shape != ref64.shape:
        return Comparison(f"{what} (shape {tuple(new.shape)} != {tuple(ref64.shape)})", float("inf"), 0.0, 0.0)
    finite = torch.isfinite(ref64)
    nonfinite = bool((~torch.isfinite(new.double()) & finite).any())
    # Compare where the reference is finite (masks may hold -inf on purpose).
    new, original, ref64 = new.double()[finite], original.double()[finite], ref64[finite]
    scale = ref64.pow(2).mean().sqrt().item() if ref64.numel() else 0.0
    err, err_orig = rmse(new, ref64), rmse(original, ref64)
    return Comparison(what, err, err_orig, k * err_orig + floor * (scale or 1.0), nonfinite)


def tolerance_for(dtype: torch.dtype, overrides: dict | None = None) -> tuple[float, float]:
    """(k, floor) for ``dtype``, ``overrides`` ({dtype: (k, floor)}) first."""
    if overrides and dtype in overrides:
        return overrides[dtype]
    return DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])


class KeepFloat64(TorchFunctionMode):
    """Runs model code in float64 throughout: casts of a float64 tensor to a lower
    precision (``.float()``, ``.to(torch.float32)``, ``.type_as(x)``, ``softmax(...,
    dtype=torch.float32)``) keep it in float64, so the result is a true float64
    reference of the code as written."""

    _CASTS = {torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.type_as,
              torch.Tensor.type}
    _LOW = {torch.float32, torch.float16, torch.bfloat16}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("dtype") in self._LOW:
            kwargs["dtype"] = torch.float64
        out = func(*args, **kwargs)
        if (func in self._CASTS and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float64
                and isinstance(out, torch.Tensor) and out.dtype in self._LOW):
            return args[0]
        return out
