"""hubcompile's custom ops: schema, fake, autograd and dynamic-shape dispatch
(torch.library.opcheck), and forward/backward accuracy against float64 references,
with each kernel an op can run."""

from pathlib import Path

import pytest
import torch

from hubcompile.lowering import reference
from hubcompile.lowering.kernels import BUNDLED_ROOT
from numerics import assert_close_to_reference

ops = torch.ops.hubcompile
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]

# The kernels the ops run in these tests: the reference, the bundled repo as resolved
# for this machine (torch-cpu here, Triton on a GPU), and the bundled Triton variant
# loaded directly (on CPU it runs under TRITON_INTERPRET=1).
KERNELS = {
    "reference": lambda repo: "reference",
    "bundled": lambda repo: f"bundled:{repo}",
    "triton": lambda repo: f"local:{Path(BUNDLED_ROOT) / repo / 'build' / 'torch-cuda'}",
}


def randn(*shape, dtype, grad=True):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)


def _norm_cases(dtype):
    """(name, op, op args before the kernels, reference, reference args)."""
    x, w, r = randn(3, 7, 37, dtype=dtype), randn(37, dtype=dtype), randn(3, 7, 37, dtype=dtype)
    w32 = randn(37, dtype=torch.float32)
    eps_t = torch.tensor(1e-5)
    xt = randn(3, 5, 7, 37, dtype=dtype, grad=False).transpose(1, 2).requires_grad_(True)
    return [
        ("llama", ops.rms_norm, (x, w, 1e-6, 0.0, True, None), reference.rms_norm, (x, w, 1e-6, 0.0, True)),
        ("gemma", ops.rms_norm, (x, w, 1e-6, 1.0, False, None), reference.rms_norm, (x, w, 1e-6, 1.0, False)),
        ("gemma_fp32_weight", ops.rms_norm, (x, w32, 1e-6, 1.0, False, None), reference.rms_norm,
         (x, w32, 1e-6, 1.0, False)),
        ("eps_tensor", ops.rms_norm, (x, w, 0.0, 0.0, True, eps_t), reference.rms_norm, (x, w, 1e-5, 0.0, True)),
        ("add_llama", ops.add_rms_norm, (x, r, w, 1e-5, 0.0, True, None), reference.add_rms_norm,
         (x, r, w, 1e-5, 0.0, True)),
        ("add_gemma", ops.add_rms_norm, (x, r, w, 1e-5, 1.0, False, None), reference.add_rms_norm,
         (x, r, w, 1e-5, 1.0, False)),
        # no weight (FalconMamba's mixer norms, NanoChat); on a rotation's layout
        # ([B, S, H, D] under [B, H, S, D]), which the result keeps
        ("weightless", ops.rms_norm, (x, None, 1e-6, 0.0, True, None), reference.rms_norm, (x, None, 1e-6, 0.0, True)),
        ("weightless_transposed", ops.rms_norm, (xt, None, 1e-6, 0.0, True, None), reference.rms_norm,
         (xt, None, 1e-6, 0.0, True)),
        ("add_weightless", ops.add_rms_norm, (x, r, None, 1e-5, 0.0, True, None), reference.add_rms_norm,
         (x, r, None, 1e-5, 0.0, True)),
    ]


def _gated_cases(dtype):
    g, u = randn(5, 3, 19, dtype=dtype), randn(5, 3, 19, dtype=dtype)
    fused = randn(5, 3, 38, dtype=dtype)
    strided = randn(5, 19, 3, dtype=dtype).transpose(1, 2)
    cases = []
    for act in ("silu", "gelu_tanh"):
        cases += [
            (act, ops.gated_activation, (g, u, act), reference.gated_activation, (g, u, act)),
            (f"fused_{act}", ops.gated_activation_fused, (fused, act), reference.gated_activation_fused, (fused, act)),
        ]
    cases.append(("silu_strided", ops.gated_activation, (strided, u, "silu"), reference.gated_activation,
                  (strided, u, "silu")))
    return cases


def _cases():
    for dtype in DTYPES:
        for repo, cases in (("rmsnorm", _norm_cases(dtype)), ("activation", _gated_cases(dtype))):
            for name, op, args, ref, ref_args in cases:
                for kname, spec in KERNELS.items():
                    kernel = spec(repo)
                    yield pytest.param(op, (*args, kernel, kernel), ref, ref_args, dtype,
                                       id=f"{name}-{str(dtype)[6:]}-{kname}")


def _fresh(args):
    return [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]


def _to64(args):
    return [a.detach().double().requires_grad_(a.requires_grad)
            if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("op,args,ref,ref_args,dtype", _cases())
def test_opcheck(op, args, ref, ref_args, dtype):
    # How the op is registered (autograd, AOT dispatch) does not depend on the dtype; what
    # the kernel returns does. The Triton kernels run interpreted here (slowly): in bf16
    # they are checked against the op's fake implementation only.
    interpreted = isinstance(args[-1], str) and args[-1].startswith("local:")
    if dtype == torch.bfloat16 and interpreted and not torch.cuda.is_available():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    else:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("op,args,ref,ref_args,dtype", _cases())
def test_forward_backward_against_float64(op, args, ref, ref_args, dtype):
    args, ref_args = _fresh(args), _fresh(ref_args)
    out = _outputs(op(*args))
    eager = _outputs(ref(*ref_args))
    args64 = _to64(ref_args)
    ref64 = _outputs(ref(*args64))
    assert len(out) == len(eager) == len(ref64)
    for i, (o, e, r) in enumerate(zip(out, eager, ref64)):
        assert o.shape == e.shape and o.dtype == e.dtype, f"output {i}"
        # a norm's result keeps its input's layout (a q/k norm after a rotation, ops._memory_order)
        if i == 0 and op in (ops.rms_norm, ops.add_rms_norm):
            assert o.stride() == e.stride(), f"output {i} strides {o.stride()}, eager {e.stride()}"
        assert_close_to_reference(o, e, r, dtype, f"output {i}")

    # Backward, with the same random cotangents for the op, eager and float64, through
    # the differentiable outputs (rstd is not one).
    cot = [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in out]
    diff = [i for i, o in enumerate(out) if o.requires_grad]
    assert diff, "no differentiable output"

    def grads(outs, inputs):
        tensors = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        return torch.autograd.grad([outs[i] for i in diff], tensors, [cot[i].to(outs[i].dtype) for i in diff])

    for g_new, g_eager, g_ref, inp in zip(grads(out, args), grads(eager, ref_args), grads(ref64, args64),
                                          [t for t in ref_args if isinstance(t, torch.Tensor) and t.requires_grad]):
        assert g_new.shape == inp.shape and g_new.dtype == inp.dtype
        assert_close_to_reference(g_new, g_eager, g_ref, dtype, "gradient")


def test_unknown_activation_is_a_clear_error():
    x = torch.randn(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"'relu'.*valid choices: silu, gelu_tanh"):
        ops.gated_activation(x, x, "relu")
