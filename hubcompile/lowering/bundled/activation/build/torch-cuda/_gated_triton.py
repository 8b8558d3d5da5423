"""Triton gated activations ``act(gate) * up`` (SwiGLU with act = silu, GeGLU with
act = gelu_tanh): forward and backward, for separate gate/up tensors and for one fused
``[..., 2d]`` tensor (gate = first half, up = second half).

Functional API: every function returns new tensors and records no autograd graph.

Numerics (all arithmetic in fp32), matching eager ``F.silu(gate) * up``:
  a   = act(gate) rounded to gate.dtype
  out = a * up rounded once to promote(gate.dtype, up.dtype)
Backward: dgate = dout * up * act'(gate) (rounded once to gate.dtype), dup = dout * a
(rounded once to up.dtype), with a the rounded activation the forward multiplied by.
gelu_tanh(x) = 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi), is evaluated as the
identical x * sigmoid(2 k (x + 0.044715 x^3)), with a sigmoid that never overflows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATIONS = ("silu", "gelu_tanh")
_ACT_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}

# Columns per program (power of two); a module attribute so tests can shrink it.
MAX_BLOCK = 1024


# --------------------------------------------------------------------------- kernels


@triton.jit
def _rne_bits(x):
    # fp32 -> the fp32 bit pattern of the nearest bf16 value (ties to even); NaN stays NaN.
    bits = x.to(tl.int32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return tl.where(x != x, x.to(tl.int32, bitcast=True), bits)


@triton.jit
def _rne(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to the nearest ``DTYPE`` value (ties to even), returned as fp32.

    bf16 is rounded by hand: Triton's interpreter truncates fp32 -> bf16 casts (GPUs
    round to nearest even), so this gives the GPU's result on both."""
    if DTYPE == tl.bfloat16:
        return _rne_bits(x).to(tl.float32, bitcast=True)
    elif DTYPE == tl.float32:
        return x
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _cast(x, DTYPE: tl.constexpr):
    """fp32 ``x`` -> ``DTYPE``, rounding to nearest even (see ``_rne``)."""
    if DTYPE == tl.bfloat16:
        return (_rne_bits(x) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _sigmoid_pair(z):
    # (sigmoid(z), 1 - sigmoid(z)) without overflow or cancellation.
    e = tl.exp(-tl.abs(z))
    inv = 1.0 / (1.0 + e)
    pos = z >= 0
    return tl.where(pos, inv, e * inv), tl.where(pos, e * inv, inv)


@triton.jit
def _act_and_grad(x, ACT: tl.constexpr):
    # ACT 0: silu, 1: gelu_tanh. Returns (act(x), act'(x)) in fp32.
    if ACT == 0:
        s, one_minus_s = _sigmoid_pair(x)
        return x * s, s * (1.0 + x * one_minus_s)
    else:
        # 0.5 x (1 + tanh(u)) == x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
        x2 = x * x
        u2 = 1.5957691216057308 * x * (1.0 + 0.044715 * x2)  # 2u
        s, one_minus_s = _sigmoid_pair(u2)
        du2 = 1.5957691216057308 * (1.0 + 0.134145 * x2)  # d(2u)/dx
        return x * s, s + x * s * one_minus_s * du2


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:
        s, _ = _sigmoid_pair(x)
    else:
        s, _ = _sigmoid_pair(1.5957691216057308 * x * (1.0 + 0.044715 * x * x))
    return x * s


@triton.jit
def _gated_fwd_kernel(
    G,
    U,
    O,
    stride_g,
    stride_u,
    stride_o,
    D,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Grid (rows, column blocks); every tensor is [M, D] with unit column stride.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    a = _rne(_act(g, ACT), G.dtype.element_ty)
    tl.store(O + row * stride_o + cols, _cast(a * u, O.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    DO,
    G,
    U,
    DG,
    DU,
    stride_do,
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    D,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    do = tl.load(DO + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    a = _rne(a, G.dtype.element_ty)
    tl.store(DG + row * stride_dg + cols, _cast(do * u * da, DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, _cast(do * a, DU.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- helpers


def _interpreted() -> bool:
    return type(_gated_fwd_kernel).__name__ == "InterpretedFunction"


def _launch(kernel, grid, *args, **meta) -> None:
    """Launch ``kernel`` on ``grid``. While hubcompile traces this module into Inductor's
    graph (a proxy mode is active), through ``torch.library.wrap_triton``: Inductor then
    launches the kernel from its own generated code, without this module's Python on
    every call. Inductor compiles user kernels with fp fusion on (its default), so there
    an fp32 multiply-add may round once instead of twice."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if get_proxy_mode() is not None:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta, enable_fp_fusion=False)


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type == "cpu" and not _interpreted():
            raise RuntimeError(
                "hubcompile-activation (torch-cuda variant): Triton kernels need GPU tensors, got "
                "a CPU tensor; use the torch-cpu variant, or set TRITON_INTERPRET=1 before this "
                "module is imported to run the kernels in Triton's interpreter"
            )


def _act_id(activation: str) -> int:
    try:
        return _ACT_IDS[activation]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown gated activation {activation!r}; valid choices: {', '.join(ACTIVATIONS)}"
        ) from None


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A [M, D] view of ``t`` whose last dim is contiguous and whose rows are one stride
    apart; copies only when no such view exists."""
    d = t.shape[-1]
    if d > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, d)
    except RuntimeError:
        return t.contiguous().view(-1, d)


def _launch_cfg(d: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(d, 1)), MAX_BLOCK)
    return block, max(1, min(8, block // 256))


def _fwd(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, act: int) -> None:
    # gate, up, out: [M, D] with unit column stride.
    m, d = out.shape
    if m == 0 or d == 0:
        return
    block, warps = _launch_cfg(d)
    _launch(_gated_fwd_kernel, (m, triton.cdiv(d, block)),
        gate, up, out, gate.stride(0), up.stride(0), out.stride(0), d,
        ACT=act, BLOCK=block, num_warps=warps,
    )


def _bwd(dout, gate, up, dgate, dup, act: int) -> None:
    m, d = dgate.shape
    if m == 0 or d == 0:
        return
    block, warps = _launch_cfg(d)
    _launch(_gated_bwd_kernel, (m, triton.cdiv(d, block)),
        dout, gate, up, dgate, dup,
        dout.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0), d,
        ACT=act, BLOCK=block, num_warps=warps,
    )


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"the last dim of x must be even ([..., 2d]), got shape {list(x.shape)}")
    d = x.shape[-1] // 2
    if x.numel() == 0:
        return x[..., :d], x[..., d:], d
    x2 = _as_rows(x)
    # narrow, not indexing: the same views, and traceable for fake CUDA tensors on any build
    return x2.narrow(1, 0, d), x2.narrow(1, d, d), d


# --------------------------------------------------------------------------- API


def gated_act_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, in dtype promote(gate.dtype, up.dtype), with the broadcast shape."""
    act = _act_id(activation)
    _check_device(gate, up)
    shape = torch.broadcast_shapes(gate.shape, up.shape)
    out = torch.empty(shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if out.numel():
        _fwd(_as_rows(gate.expand(shape)), _as_rows(up.expand(shape)), out.view(-1, shape[-1]), act)
    return out


def gated_act_backward(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dgate, dup) with gate's and up's shapes and dtypes."""
    act = _act_id(activation)
    _check_device(dout, gate, up)
    shape = torch.broadcast_shapes(gate.shape, up.shape)
    if dout.shape != shape:
        raise ValueError(f"dout has shape {list(dout.shape)}, expected {list(shape)}")
    broadcast = gate.shape != shape or up.shape != shape
    # Broadcast inputs: compute per-element grads in fp32, then reduce to the input shapes.
    dg_dtype = torch.float32 if broadcast else gate.dtype
    du_dtype = torch.float32 if broadcast else up.dtype
    dgate = torch.empty(shape, dtype=dg_dtype, device=gate.device)
    dup = torch.empty(shape, dtype=du_dtype, device=gate.device)
    if dgate.numel():
        d = shape[-1]
        _bwd(
            _as_rows(dout), _as_rows(gate.expand(shape)), _as_rows(up.expand(shape)),
            dgate.view(-1, d), dup.view(-1, d), act,
        )
    if broadcast:
        dgate = dgate.sum_to_size(gate.shape).to(gate.dtype)
        dup = dup.sum_to_size(up.shape).to(up.dtype)
    return dgate, dup


def gated_act_fused_forward(x: torch.Tensor, activation: str) -> torch.Tensor:
    """x is [..., 2d] (gate = x[..., :d], up = x[..., d:]); returns act(gate) * up, [..., d]."""
    act = _act_id(activation)
    _check_device(x)
    gate, up, d = _split(x)
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if out.numel():
        _fwd(gate, up, out.view(-1, d), act)
    return out


def gated_act_fused_backward(dout: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    """Returns dx of shape [..., 2d]: dgate in the first half, dup in the second."""
    act = _act_id(activation)
    _check_device(dout, x)
    gate, up, d = _split(x)
    if dout.shape != (*x.shape[:-1], d):
        raise ValueError(f"dout has shape {list(dout.shape)}, expected {[*x.shape[:-1], d]}")
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if dx.numel():
        dx2 = dx.view(-1, 2 * d)
        _bwd(_as_rows(dout), gate, up, dx2.narrow(1, 0, d), dx2.narrow(1, d, d), act)
    return dx
