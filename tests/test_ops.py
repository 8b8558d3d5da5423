"""hubcompile's custom ops: schema, fake, autograd and dynamic-shape dispatch
(torch.library.opcheck), and forward/backward accuracy against float64 references."""

import pytest
import torch

from hubcompile.lowering import reference
from numerics import assert_close_to_reference

ops = torch.ops.hubcompile
DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape, dtype, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


# (op, args builder, reference computing the same outputs, differentiable outputs)
def _norm_cases(dtype):
    x, w = randn(3, 7, 37, dtype=dtype), randn(37, dtype=dtype)
    w_f32 = randn(37, dtype=torch.float32)
    r = randn(3, 7, 37, dtype=dtype)
    eps_t = torch.tensor(1e-5, dtype=torch.float32)
    return [
        ("llama", ops.rms_norm, (x, w, 1e-6, 0.0, True), reference.rms_norm),
        ("gemma", ops.rms_norm, (x, w, 1e-6, 1.0, False), reference.rms_norm),
        ("gemma_fp32_weight", ops.rms_norm, (x, w_f32, 1e-6, 1.0, False), reference.rms_norm),
        ("eps_tensor", ops.rms_norm, (x, w, 0.0, 0.0, True, eps_t),
         lambda x, w, _e, o, c, t: reference.rms_norm(x, w, t.item(), o, c)),
        ("add_llama", ops.add_rms_norm, (x, r, w, 1e-5, 0.0, True), reference.add_rms_norm),
        ("add_gemma", ops.add_rms_norm, (x, r, w, 1e-5, 1.0, False), reference.add_rms_norm),
    ]


def _gated_cases(dtype):
    g, u = randn(5, 3, 19, dtype=dtype), randn(5, 3, 19, dtype=dtype)
    fused = randn(5, 3, 38, dtype=dtype)
    strided = randn(5, 19, 3, dtype=dtype).transpose(1, 2)
    return [
        ("silu", ops.gated_activation, (g, u, "silu"), reference.gated_activation),
        ("gelu_tanh", ops.gated_activation, (g, u, "gelu_tanh"), reference.gated_activation),
        ("silu_strided", ops.gated_activation, (strided, u, "silu"), reference.gated_activation),
        ("fused_silu", ops.gated_activation_fused, (fused, "silu"), reference.gated_activation_fused),
        ("fused_gelu", ops.gated_activation_fused, (fused, "gelu_tanh"), reference.gated_activation_fused),
    ]


def _cases():
    for dtype in DTYPES:
        for name, op, args, ref in _norm_cases(dtype) + _gated_cases(dtype):
            yield pytest.param(op, args, ref, dtype, id=f"{name}-{str(dtype)[6:]}")


def _to64(args):
    return [a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("op,args,ref,dtype", _cases())
def test_opcheck(op, args, ref, dtype):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("op,args,ref,dtype", _cases())
def test_forward_backward_against_float64(op, args, ref, dtype):
    args = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    out = _outputs(op(*args))
    eager = _outputs(ref(*args))
    args64 = _to64(args)
    ref64 = _outputs(ref(*args64))
    assert len(out) == len(eager) == len(ref64)
    for i, (o, e, r) in enumerate(zip(out, eager, ref64)):
        assert o.shape == e.shape and o.dtype == e.dtype, f"output {i}"
        assert_close_to_reference(o, e, r, dtype, f"output {i}")

    # Backward with the same random cotangents for all three (only float outputs that
    # take gradients: the first, and the residual sum of add_rms_norm).
    grads_out = [torch.randn_like(o, dtype=torch.float64) for o in out]
    diff = [i for i, o in enumerate(out) if o.requires_grad]
    inputs = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def grads(outs, inps):
        outs = [outs[i] for i in diff]
        cot = [grads_out[i].to(o.dtype) for i, o in zip(diff, outs)]
        return torch.autograd.grad(outs, [inps[i] for i in inputs], cot)

    for i, g_new, g_eager, g_ref in zip(inputs, grads(out, args), grads(eager, args), grads(ref64, args64)):
        assert g_new.shape == args[i].shape and g_new.dtype == args[i].dtype, f"grad {i}"
        assert_close_to_reference(g_new, g_eager, g_ref, dtype, f"grad of input {i}")


def test_unknown_activation_is_a_clear_error():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"'relu'.*valid choices: silu, gelu_tanh"):
        ops.gated_activation(x, x, "relu")
