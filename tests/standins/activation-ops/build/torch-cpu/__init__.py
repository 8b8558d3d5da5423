"""Stand-in for a compiled kernels-community repo (tests only): like
kernels-community/activation, its functions are ``torch.library`` ops of the repo's own
namespace that write into ``out`` and have no fake implementation; ``silu_and_mul(out, x)``
is the Python wrapper the repo exports."""
import torch
import torch.nn.functional as F

_NS = "_standin_activation_ops"


def _silu_and_mul(out, x):
    d = x.shape[-1] // 2
    out.copy_(F.silu(x[..., :d]) * x[..., d:])


def _gelu_tanh_and_mul(out, x):
    d = x.shape[-1] // 2
    out.copy_(F.gelu(x[..., :d], approximate="tanh") * x[..., d:])


# Loaded again after kernels.clear_cache() (a new module object): the ops stay defined once.
if not hasattr(getattr(torch.ops, _NS), "silu_and_mul"):
    _lib = torch.library.Library(_NS, "DEF")  # noqa: TOR901 - the repo's ops
    _lib.define("silu_and_mul(Tensor(a!) out, Tensor x) -> ()")
    _lib.define("gelu_tanh_and_mul(Tensor(a!) out, Tensor x) -> ()")
    _lib.impl("silu_and_mul", _silu_and_mul, "CPU")
    _lib.impl("gelu_tanh_and_mul", _gelu_tanh_and_mul, "CPU")
    torch.library._standin_activation_ops_lib = _lib  # kept alive: the ops die with their Library
ops = getattr(torch.ops, _NS)


def silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> None:
    ops.silu_and_mul(out, x)


def gelu_tanh_and_mul(out: torch.Tensor, x: torch.Tensor) -> None:
    ops.gelu_tanh_and_mul(out, x)
