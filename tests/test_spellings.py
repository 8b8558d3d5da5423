"""Spellings real models use beyond Llama's: RMSNorm without a weight inside Mamba mixers
(FalconMamba), replaced with outputs and gradients as accurate as eager's against float64.
(NanoChat, in tiny_models.MODELS, covers norms without a weight after a rotation.)"""

import copy

import pytest
import torch
import transformers as T

from numerics import assert_close_to_reference
from tiny_models import FALCON_MAMBA, input_ids

DTYPES = [torch.float32, torch.bfloat16]


def _falcon_mamba(dtype):
    torch.manual_seed(0)
    return T.FalconMambaForCausalLM(T.FalconMambaConfig(**FALCON_MAMBA)).to(dtype)


def _rmsnorms(records):
    return sum(r.replaced.get("rmsnorm", 0) for r in records)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_falcon_mamba_weightless_norms_inference(fresh, dtype):
    model = _falcon_mamba(dtype).eval()
    ref_model = copy.deepcopy(model).double()
    ids = input_ids()
    with torch.no_grad():
        eager, ref = model(ids).logits, ref_model(ids).logits
        compiled = torch.compile(model, backend="hubkernels")(ids).logits
    # 3 weightless mixer norms a layer, 2 block norms and the final norm
    assert _rmsnorms(fresh) == 9
    spellings = [s for r in fresh for s, _ in r.spellings.get("rmsnorm", [])]
    assert sum(s.startswith("weightless") for s in spellings) == 6, spellings
    assert_close_to_reference(compiled, eager, ref, dtype, "logits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_falcon_mamba_weightless_norms_training(fresh, dtype):
    model = _falcon_mamba(dtype).train()
    ref_model = copy.deepcopy(model).double()
    ids = input_ids()

    def step(m, run):
        m.zero_grad(set_to_none=True)
        loss = run(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = step(model, model)
    ref_loss, ref_grads = step(ref_model, ref_model)
    loss, grads = step(model, torch.compile(model, backend="hubkernels"))
    spellings = [s for r in fresh for s, _ in r.spellings.get("rmsnorm", [])]
    assert sum(s.startswith("weightless") for s in spellings) == 6, spellings
    assert_close_to_reference(loss, eager_loss, ref_loss, dtype, "loss")
    for name, ref_grad in ref_grads.items():
        assert_close_to_reference(grads[name], eager_grads[name], ref_grad, dtype, f"grad {name}")
