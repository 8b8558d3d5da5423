"""Spellings real models use beyond Llama's: RMSNorm without a weight inside Mamba mixers
(FalconMamba), replaced with outputs and gradients as accurate as eager's against float64;
a weighted norm whose kernel the guard refuses stays whole, although a weightless
spelling fits its inner part; and torch's own nn.RMSNorm / F.rms_norm. (NanoChat and Llama 4, in tiny_models.MODELS, cover norms
without a weight after a rotation, and attention without rotary.)"""

import copy

import pytest
import torch
import transformers as T
from torch import nn

from hubcompile.guards import numerical as guards
from hubcompile.lowering import kernels
from numerics import assert_close_to_reference
from test_guards import make_repo
from tiny_models import FALCON_MAMBA, input_ids

DTYPES = [torch.float32, torch.bfloat16]


def _falcon_mamba(dtype, layers=2):
    torch.manual_seed(0)
    return T.FalconMambaForCausalLM(T.FalconMambaConfig(**{**FALCON_MAMBA, "num_hidden_layers": layers})).to(dtype)


def _rmsnorms(records):
    return sum(r.replaced.get("rmsnorm", 0) for r in records)


def _spellings(records):
    return [s for r in records for s, _ in r.spellings.get("rmsnorm", [])]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_falcon_mamba_weightless_norms_inference(fresh, dtype):
    # One layer, a short sequence: the mixer's scan is unrolled over the sequence, and
    # Inductor's CPU code with it.
    model = _falcon_mamba(dtype, layers=1).eval()
    ref_model = copy.deepcopy(model).double()
    ids = input_ids(seq=6)
    with torch.no_grad():
        eager, ref = model(ids).logits, ref_model(ids).logits
        compiled = torch.compile(model, backend="hubkernels")(ids).logits
    # 3 weightless mixer norms, the block's norm and the final norm
    assert _rmsnorms(fresh) == 5
    assert sum(s.startswith("weightless") for s in _spellings(fresh)) == 3, _spellings(fresh)
    assert_close_to_reference(compiled, eager, ref, dtype, "logits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_falcon_mamba_weightless_norms_training(fresh, dtype):
    model = _falcon_mamba(dtype, layers=1).train()
    ref_model = copy.deepcopy(model).double()
    ids = input_ids(seq=6)

    def step(m, run):
        m.zero_grad(set_to_none=True)
        loss = run(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = step(model, model)
    ref_loss, ref_grads = step(ref_model, ref_model)
    loss, grads = step(model, torch.compile(model, backend="hubkernels"))
    assert sum(s.startswith("weightless") for s in _spellings(fresh)) == 3, _spellings(fresh)
    assert_close_to_reference(loss, eager_loss, ref_loss, dtype, "loss")
    for name, ref_grad in ref_grads.items():
        assert_close_to_reference(grads[name], eager_grads[name], ref_grad, dtype, f"grad {name}")


# Right for a norm without a weight, wrong for one with a weight (it drops it): the guard
# must refuse the weighted norm, and its inner x * rsqrt(...), which the weightless spelling
# fits and this kernel gets right, must not then be replaced on its own.
DROPS_WEIGHT = ("w = weight if weight is None else torch.ones_like(weight)\n"
                "return _ok.rms_norm_forward(x, w, eps, weight_offset, cast_before_scale, residual)")


class Norms(nn.Module):
    """A Llama-form and a Gemma-form RMSNorm, the weight applied after the norm in each."""

    def __init__(self, hidden=24):
        super().__init__()
        self.w = nn.Parameter(torch.randn(hidden))
        self.g = nn.Parameter(torch.randn(hidden) * 0.5)

    def forward(self, x):
        h = x.float()
        y = self.w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        h = y.float()
        return ((h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)) * (1.0 + self.g.float())).type_as(x)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_refused_weighted_norm_stays_whole(fresh, tmp_path, dtype, train):
    kernels.clear_cache()
    guards.clear_cache(disk=True)
    spec = make_repo(tmp_path, "drops_weight", DROPS_WEIGHT)
    torch.manual_seed(0)
    model = Norms().to(dtype)
    ref_model = copy.deepcopy(model).double()
    x = torch.randn(2, 5, 24, dtype=dtype, requires_grad=train)
    x64 = x.detach().double().requires_grad_(train)
    compiled = torch.compile(model, backend="hubkernels", options={"kernels": {"rmsnorm": spec}})
    with torch.set_grad_enabled(train):
        out, eager, ref = compiled(x), model(x), ref_model(x64)
    assert _rmsnorms(fresh) == 0, _spellings(fresh)
    refused = [(s, why) for r in fresh for s, why in r.refused.get("rmsnorm", [])]
    # both norms refused by the guard, as weighted spellings only (in fp32 the Gemma form is
    # also Llama's w_last with w = 1 + g, so it is refused under both names)
    assert {"llama_pow_w_first", "gemma_pow"} <= {s for s, _ in refused}, refused
    assert all(why.startswith(f"guard failed for {spec}") for _, why in refused), refused
    assert not any(s.startswith("weightless") for s, _ in refused), refused
    # the original code ran: as accurate as eager, and so are the gradients
    assert_close_to_reference(out, eager, ref, dtype, "output")
    if train:
        cot = torch.randn_like(ref)
        grads = torch.autograd.grad(out, [x, *model.parameters()], cot.to(dtype))
        eager_grads = torch.autograd.grad(eager, [x, *model.parameters()], cot.to(dtype))
        ref_grads = torch.autograd.grad(ref, [x64, *ref_model.parameters()], cot)
        for name, g, e, r in zip(["x", "w", "g"], grads, eager_grads, ref_grads):
            assert_close_to_reference(g, e, r, dtype, f"grad {name}")
    kernels.clear_cache()
    guards.clear_cache(disk=True)


class TorchRMSNorms(nn.Module):
    """torch's own RMSNorm: nn.RMSNorm after a residual add (the sum used again), without a
    weight, and F.rms_norm on the upcast input with eps left to its default, rounded back."""

    def __init__(self, n=33):
        super().__init__()
        self.norm, self.plain = nn.RMSNorm(n, eps=1e-6), nn.RMSNorm(n, elementwise_affine=False)
        self.proj = nn.Linear(n, n)

    def forward(self, x, residual):
        h = x + residual
        y = self.proj(self.norm(h))
        z = nn.functional.rms_norm(h.float(), (h.shape[-1],)).type_as(h)
        return self.plain(y) * z + h


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_rms_norm_forward_and_backward(fresh, dtype, dynamic):
    """nn.RMSNorm / F.rms_norm (torch's own, not a spelling of model code) replaced on
    Dynamo's graph, fused with the residual add where it reads one; outputs and gradients
    against float64, at static and dynamic batch and sequence."""
    torch.manual_seed(0)
    module = TorchRMSNorms().to(dtype)
    ref_module = copy.deepcopy(module).double()
    x = torch.randn(2, 5, 33, dtype=dtype, requires_grad=True)
    residual = torch.randn(2, 5, 33, dtype=dtype)
    cot = torch.randn(2, 5, 33, dtype=torch.float64)

    def run(fn, m, x, residual):
        out = fn(x, residual)
        return out, torch.autograd.grad(out, [x, *m.parameters()], cot.to(out.dtype))

    eager, eager_grads = run(module, module, x, residual)
    ref, ref_grads = run(ref_module, ref_module, x.detach().double().requires_grad_(), residual.double())
    if dynamic:
        for t in (x, residual):
            torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(t, 1)
    out, grads = run(torch.compile(module, backend="hubkernels"), module, x, residual)
    upcast = "upcast_rms_norm_no_weight" if dtype == torch.bfloat16 else "rms_norm_no_weight"  # fp32: no cast
    assert sorted(s for s, _ in fresh[0].spellings["rmsnorm"]) == sorted(["add_rms_norm", upcast,
                                                                          "rms_norm_no_weight"])
    assert "".join(r.code_after for r in fresh).count("hubcompile.rms_norm_backward") == 3
    assert_close_to_reference(out, eager, ref, dtype, "out")
    for name, g, e, r in zip(["x", "norm.weight", "proj.weight", "proj.bias"], grads, eager_grads, ref_grads):
        assert_close_to_reference(g, e, r, dtype, f"grad {name}")
