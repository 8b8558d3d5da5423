"""Tests for the bundled ``hubcompile-activation`` kernel repository (gated activations:
SwiGLU ``silu(gate) * up`` and GeGLU ``gelu_tanh(gate) * up``).

Both build variants are loaded from their directories with ``kernels.get_local_kernel``:
``build/torch-cuda`` (Triton; without a GPU it runs on CPU tensors under
TRITON_INTERPRET=1, set by conftest.py) and ``build/torch-cpu`` (plain torch ops).
Every result is compared with a float64 reference written here: the kernel passes when
``err(kernel, ref64) <= k * err(eager in the input dtype, ref64) + floor`` for both the
RMS and the max-abs error. Backward references are torch.autograd through the float64
reference.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = "activation"
VARIANTS = ["torch-cuda", "torch-cpu"]
DTYPES = [torch.float32, torch.bfloat16]
ACTIVATIONS = ["silu", "gelu_tanh"]
GATED_LAYOUTS = ["separate", "fused_halves", "transposed"]
FUSED_LAYOUTS = ["contiguous", "row_strided", "transposed"]

K = {torch.float32: 2.0, torch.bfloat16: 3.0, torch.float16: 3.0}
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3}


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(params=VARIANTS)
def variant(request) -> str:
    return request.param


@pytest.fixture
def mod(variant, load_kernel):
    return load_kernel(REPO, variant)


def make_gate_up(layout: str, dtype: torch.dtype, device: str):
    """Random (gate, up) pairs with the same shape and various memory layouts."""
    if layout == "separate":  # contiguous [7, 129]
        gate = torch.randn(7, 129, dtype=dtype, device=device)
        up = torch.randn(7, 129, dtype=dtype, device=device)
    elif layout == "fused_halves":  # the two halves of one [2, 5, 2 * 37] tensor
        gate, up = torch.randn(2, 5, 2 * 37, dtype=dtype, device=device).chunk(2, dim=-1)
    elif layout == "transposed":
        # gate: [3, 5, 37] whose rows are not one stride apart; up: unit stride broken
        gate = torch.randn(5, 3, 37, dtype=dtype, device=device).transpose(0, 1)
        up = torch.randn(3, 5, 2 * 37, dtype=dtype, device=device)[..., ::2]
    else:
        raise AssertionError(layout)
    assert gate.shape == up.shape
    assert (gate.is_contiguous() and up.is_contiguous()) == (layout == "separate")
    return gate, up


def make_fused(layout: str, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A random [..., 2d] tensor (odd d) with the given memory layout."""
    if layout == "contiguous":  # [3, 5, 2 * 65]
        x = torch.randn(3, 5, 2 * 65, dtype=dtype, device=device)
    elif layout == "row_strided":  # [7, 2 * 37], rows 80 apart
        x = torch.randn(7, 2 * 37 + 6, dtype=dtype, device=device)[:, 3 : 3 + 2 * 37]
    elif layout == "transposed":  # [3, 5, 2 * 37], rows not one stride apart
        x = torch.randn(5, 3, 2 * 37, dtype=dtype, device=device).transpose(0, 1)
    else:
        raise AssertionError(layout)
    assert x.is_contiguous() == (layout == "contiguous")
    return x


def eager_gated(gate, up, activation):
    """Model-code spelling, run in the inputs' dtypes."""
    act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    return act * up


def ref64_gated(gate, up, activation):
    """Exact gated activation in float64."""
    g, u = gate.double(), up.double()
    if activation == "silu":
        act = g * torch.sigmoid(g)
    else:
        act = 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3)))
    return act * u


def split(x):
    d = x.shape[-1] // 2
    return x[..., :d], x[..., d:]


def _grads(fn, dout, inputs, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, dout.to(dtype or out.dtype))


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


# ---------------------------------------------------------------------- gate, up inputs


@pytest.mark.parametrize("layout", GATED_LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_forward(mod, device, dtype, activation, layout):
    gate, up = make_gate_up(layout, dtype, device)

    out = mod.gated_act_forward(gate, up, activation)

    assert out.shape == gate.shape and out.dtype == dtype
    assert_accurate(
        "out", out, eager_gated(gate, up, activation), ref64_gated(gate, up, activation), dtype
    )


@pytest.mark.parametrize("layout", GATED_LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_backward(mod, device, dtype, activation, layout):
    gate, up = make_gate_up(layout, dtype, device)
    # an upstream gradient with a strided layout too
    dout = torch.randn(*gate.shape[:-1], gate.shape[-1] + 3, dtype=dtype, device=device)[..., 3:]

    dgate, dup = mod.gated_act_backward(dout, gate, up, activation)

    assert dgate.shape == gate.shape and dgate.dtype == dtype
    assert dup.shape == up.shape and dup.dtype == dtype
    eager = _grads(lambda g, u: eager_gated(g, u, activation), dout, (gate, up))
    ref = _grads(lambda g, u: ref64_gated(g, u, activation), dout, (gate, up), torch.float64)
    assert_accurate("dgate", dgate, eager[0], ref[0], dtype)
    assert_accurate("dup", dup, eager[1], ref[1], dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_fp16_and_mixed_dtypes(mod, device, activation):
    gate, up = make_gate_up("fused_halves", torch.float16, device)
    out = mod.gated_act_forward(gate, up, activation)
    assert out.dtype == torch.float16
    assert_accurate(
        "fp16", out, eager_gated(gate, up, activation), ref64_gated(gate, up, activation),
        torch.float16,
    )
    # bf16 gate, fp32 up -> fp32 result (eager promotion); act(gate) is rounded to bf16
    gate = torch.randn(7, 37, dtype=torch.bfloat16, device=device)
    up = torch.randn(7, 37, dtype=torch.float32, device=device)
    out = mod.gated_act_forward(gate, up, activation)
    assert out.dtype == torch.float32
    assert_accurate(
        "mixed", out, eager_gated(gate, up, activation), ref64_gated(gate, up, activation),
        torch.bfloat16,
    )
    dgate, dup = mod.gated_act_backward(torch.randn_like(out), gate, up, activation)
    assert dgate.dtype == torch.bfloat16 and dup.dtype == torch.float32


def test_gated_broadcast(mod, device):
    """gate [3, 1, d] with up [1, 4, d]: output [3, 4, d]; gradients are reduced back to
    the inputs' shapes."""
    gate = torch.randn(3, 1, 37, device=device)
    up = torch.randn(1, 4, 37, device=device)
    out = mod.gated_act_forward(gate, up, "silu")
    assert out.shape == (3, 4, 37)
    assert_accurate(
        "out", out, eager_gated(gate, up, "silu"), ref64_gated(gate, up, "silu"), torch.float32
    )
    dout = torch.randn(3, 4, 37, device=device)
    dgate, dup = mod.gated_act_backward(dout, gate, up, "silu")
    assert dgate.shape == gate.shape and dup.shape == up.shape
    eager = _grads(lambda g, u: eager_gated(g, u, "silu"), dout, (gate, up))
    ref = _grads(lambda g, u: ref64_gated(g, u, "silu"), dout, (gate, up), torch.float64)
    assert_accurate("dgate", dgate, eager[0], ref[0], torch.float32)
    assert_accurate("dup", dup, eager[1], ref[1], torch.float32)


def test_gated_extreme_inputs(mod, device):
    """Large |gate| must not overflow (exp) into inf/nan: silu(-100) ~ 0, gelu(100) = 100."""
    gate = torch.tensor([[-100.0, -30.0, -5.0, 0.0, 5.0, 30.0, 100.0]], device=device)
    up = torch.ones_like(gate) + 0.5 * torch.randn_like(gate)
    dout = torch.randn_like(gate)
    for activation in ACTIVATIONS:
        out = mod.gated_act_forward(gate, up, activation)
        dgate, dup = mod.gated_act_backward(dout, gate, up, activation)
        ref_out = ref64_gated(gate, up, activation)
        ref = _grads(lambda g, u: ref64_gated(g, u, activation), dout, (gate, up), torch.float64)
        for name, got, r in [("out", out, ref_out), ("dgate", dgate, ref[0]), ("dup", dup, ref[1])]:
            assert torch.isfinite(got).all(), (activation, name, got)
            torch.testing.assert_close(got.double(), r, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ fused [..., 2d]


@pytest.mark.parametrize("layout", FUSED_LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_forward(mod, device, dtype, activation, layout):
    x = make_fused(layout, dtype, device)

    out = mod.gated_act_fused_forward(x, activation)

    assert out.shape == (*x.shape[:-1], x.shape[-1] // 2) and out.dtype == dtype
    assert_accurate(
        "out", out, eager_gated(*split(x), activation), ref64_gated(*split(x), activation), dtype
    )


@pytest.mark.parametrize("layout", FUSED_LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_backward(mod, device, dtype, activation, layout):
    x = make_fused(layout, dtype, device)
    dout = torch.randn(*x.shape[:-1], x.shape[-1] // 2, dtype=dtype, device=device)

    dx = mod.gated_act_fused_backward(dout, x, activation)

    assert dx.shape == x.shape and dx.dtype == dtype
    (dx_e,) = _grads(lambda x_: eager_gated(*split(x_), activation), dout, (x,))
    (dx_r,) = _grads(lambda x_: ref64_gated(*split(x_), activation), dout, (x,), torch.float64)
    assert_accurate("dx", dx, dx_e, dx_r, dtype)


def test_fused_matches_split_inputs(mod, device):
    """The fused entry points agree with the two-tensor ones on the halves of x."""
    x = make_fused("row_strided", torch.bfloat16, device)
    gate, up = split(x)
    dout = torch.randn(*gate.shape, dtype=torch.bfloat16, device=device)
    for activation in ACTIVATIONS:
        torch.testing.assert_close(
            mod.gated_act_fused_forward(x, activation),
            mod.gated_act_forward(gate, up, activation),
            rtol=0, atol=0,
        )
        dgate, dup = mod.gated_act_backward(dout, gate, up, activation)
        torch.testing.assert_close(
            mod.gated_act_fused_backward(dout, x, activation),
            torch.cat([dgate, dup], dim=-1),
            rtol=0, atol=0,
        )


# ------------------------------------------------------------------------ errors and API


def test_unknown_activation_raises(mod, device):
    gate, up = make_gate_up("separate", torch.float32, device)
    x = torch.cat([gate, up], dim=-1)
    calls = [
        lambda a: mod.gated_act_forward(gate, up, a),
        lambda a: mod.gated_act_backward(torch.randn_like(gate), gate, up, a),
        lambda a: mod.gated_act_fused_forward(x, a),
        lambda a: mod.gated_act_fused_backward(torch.randn_like(gate), x, a),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"'relu'.*silu.*gelu_tanh"):
            call("relu")


def test_fused_odd_last_dim_raises(mod, device):
    x = torch.randn(4, 37, device=device)
    with pytest.raises(ValueError, match="even"):
        mod.gated_act_fused_forward(x, "silu")
    with pytest.raises(ValueError, match="even"):
        mod.gated_act_fused_backward(torch.randn(4, 18, device=device), x, "silu")


def test_empty_inputs(mod, device):
    x = torch.randn(0, 5, 2 * 37, device=device)
    out = mod.gated_act_fused_forward(x, "silu")
    assert out.shape == (0, 5, 37)
    dx = mod.gated_act_fused_backward(torch.randn(0, 5, 37, device=device), x, "gelu_tanh")
    assert dx.shape == x.shape


def test_repo_root_loads_host_variant(load_kernel):
    """The repo root (not a variant directory) loads the variant ``kernels`` selects for
    this machine's torch build: torch-cpu on a CPU-only build."""
    module = load_kernel(REPO)
    expected = "torch-cuda" if torch.version.cuda is not None else "torch-cpu"
    assert Path(module.__file__).parent.name == expected
    assert module.__name__ == "_hubcompile_activation_" + expected.removeprefix("torch-")
    if expected == "torch-cpu":
        gate, up = make_gate_up("fused_halves", torch.float32, "cpu")
        out = module.gated_act_forward(gate, up, "silu")
        assert_accurate(
            "out", out, eager_gated(gate, up, "silu"), ref64_gated(gate, up, "silu"),
            torch.float32,
        )
    else:
        assert callable(module.gated_act_fused_forward)
