"""The layer_norm family: nn.LayerNorm / F.layer_norm, upcast or not, fused with a
residual add, replaced in Dynamo's graph; small modules and real transformers models
(random weights), forward and backward against float64."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

from hubcompile.lowering.device import DeviceInfo
from numerics import assert_close_to_reference
from tiny_models import MHA, replaced

ops = torch.ops.hubcompile


class Block(nn.Module):
    """Every spelling once: a residual add into nn.LayerNorm (the sum used again), no
    bias, no affine, and F.layer_norm on the upcast input rounded back (OLMo)."""

    def __init__(self, n=33):
        super().__init__()
        self.ln = nn.LayerNorm(n)
        self.ln_no_bias = nn.LayerNorm(n, bias=False)
        self.ln_plain = nn.LayerNorm(n, elementwise_affine=False)
        self.proj = nn.Linear(n, n)

    def forward(self, x, residual):
        h = x + residual
        y = self.proj(self.ln(h))
        z = F.layer_norm(h.float(), (h.shape[-1],), None, None, 1e-5).type_as(h)
        return self.ln_no_bias(y) * self.ln_plain(z) + h


def _grads(module, x, residual, run=None):
    out = (module if run is None else run)(x, residual)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    leaves = [x, *module.parameters()]
    return out, torch.autograd.grad(out, leaves, cot.to(out.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_spelling_is_replaced_forward_and_backward(fresh, dtype):
    torch.manual_seed(0)
    module = Block().to(dtype)
    ref_module = copy.deepcopy(module).double()
    x = torch.randn(2, 5, 33, dtype=dtype, requires_grad=True)
    residual = torch.randn(2, 5, 33, dtype=dtype)
    eager, eager_grads = _grads(module, x, residual)
    ref, ref_grads = _grads(ref_module, x.detach().double().requires_grad_(), residual.double())
    out, grads = _grads(module, x, residual, torch.compile(module, backend="hubkernels"))
    spellings = sorted(s for r in fresh for s, _ in r.spellings["layer_norm"])
    upcast = "upcast_layer_norm_no_affine" if dtype == torch.bfloat16 else "layer_norm_no_affine"  # fp32: no cast
    assert spellings == sorted(["add_layer_norm", upcast, "layer_norm_no_bias", "layer_norm_no_affine"])
    code = "".join(r.code_after for r in fresh)
    assert "var_mean" not in code and code.count("hubcompile.layer_norm_backward") == 4
    assert_close_to_reference(out, eager, ref, dtype, "out")
    for i, (g, e, r) in enumerate(zip(grads, eager_grads, ref_grads)):
        assert_close_to_reference(g, e, r, dtype, f"grad {i}")


def test_dynamic_shapes_compile_once(fresh):
    """dynamic=True: the block's normalized shape (h.shape[-1],) is symbolic too."""
    module = Block()
    compiled = torch.compile(module, backend="hubkernels", dynamic=True)
    for seq in (5, 9, 13):
        x, residual = torch.randn(2, seq, 33, requires_grad=True), torch.randn(2, seq, 33)
        out = compiled(x, residual)
        out.sum().backward()
        torch.testing.assert_close(out, module(x, residual))
    assert len(fresh) == 1, "recompiled for a new sequence length"
    assert replaced(fresh)["layer_norm"] == 4, fresh[0].refused["layer_norm"]


def test_a_norm_over_two_dims_is_kept_with_its_reason(fresh):
    def f(x, w):
        return F.layer_norm(x, x.shape[-2:], w, None, 1e-5)

    x, w = torch.randn(2, 3, 4, 8), torch.randn(4, 8)
    torch.testing.assert_close(torch.compile(f, backend="hubkernels")(x, w), f(x, w))
    assert replaced(fresh).get("layer_norm", 0) == 0
    assert [why for _, why in fresh[0].refused["layer_norm"]] == ["normalized_shape (4, 8) spans more than the last dim"]


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_launch_bound_norms_are_left_to_inductor(fresh, monkeypatch, mode):
    """min_elements (test_launch_bound.py), with the rule's devices widened to CPU: a small
    norm is Inductor's, under CUDA graphs too. (Called with (x, x): an add of a tensor to
    itself is not fused, its norm is a plain one.)"""
    import hubcompile
    from hubcompile.patterns import framework

    monkeypatch.setattr(framework, "LAUNCH_BOUND_DEVICES", ("cpu", "cuda", "xpu"))
    hubcompile.configure(perf_guard="off", min_elements=4096)  # torch.compile takes mode= or options=
    module, x = Block(), torch.randn(2, 5, 33)
    with torch.no_grad():
        out = torch.compile(module, backend="hubkernels", mode=mode)(x, x)
        torch.testing.assert_close(out, module(x, x))
    reasons = [why for r in fresh for _, why in r.refused["layer_norm"]]
    assert replaced(fresh).get("layer_norm", 0) == 0 and len(reasons) == 4
    assert all(why.startswith("launch-bound: 330 elements, under min_elements=4096") for why in reasons), reasons


@pytest.mark.parametrize("kernel", ["reference", "bundled:layer-norm"])
def test_opcheck(kernel):
    x, r = torch.randn(3, 5, 17, requires_grad=True), torch.randn(3, 5, 17, requires_grad=True)
    w, b = torch.randn(17, requires_grad=True), torch.randn(17, requires_grad=True)
    torch.library.opcheck(ops.layer_norm, (x, w, b, 1e-5, kernel, kernel))
    torch.library.opcheck(ops.layer_norm, (x, None, None, 1e-5, kernel, kernel))
    torch.library.opcheck(ops.add_layer_norm, (x, r, w, None, 1e-5, kernel, kernel))


# ------------------------------------------------------------------ transformers models

# name: (config class, model class, config, LayerNorms, of them fused with the residual add,
#        dtype, Inductor options). Two decoder layers (one encoder layer for BERT); each
# model in one dtype, to keep the suite short.
MODELS = {
    # parallel residual: both norms of a layer read the same sum; only one can fuse it
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM,
                 {**MHA, "hidden_size": 48, "intermediate_size": 80, "rotary_pct": 0.5, "max_position_embeddings": 64},
                 5, 2, torch.bfloat16, {"cpp.simdlen": 1}),
    # one norm feeding attention and MLP
    "phi": (T.PhiConfig, T.PhiForCausalLM, {**MHA, "hidden_size": 48, "intermediate_size": 80,
                                             "partial_rotary_factor": 0.5, "max_position_embeddings": 64},
            3, 2, torch.float32, None),
    "stablelm": (T.StableLmConfig, T.StableLmForCausalLM,
                 {**MHA, "hidden_size": 48, "intermediate_size": 80, "num_key_value_heads": 2,
                  "partial_rotary_factor": 0.5, "max_position_embeddings": 64},
                 5, 4, torch.bfloat16, None),
    # bf16: in fp32, plain Inductor's training gradients on CPU already miss eager's fp32
    # bound (1.6e-3 max on the embeddings, backend="inductor", without hubcompile)
    "falcon": (T.FalconConfig, T.FalconForCausalLM,
               {**MHA, "hidden_size": 48, "new_decoder_architecture": False, "parallel_attn": True, "bias": True},
               3, 2, torch.bfloat16, {"cpp.simdlen": 1}),
    "starcoder2": (T.Starcoder2Config, T.Starcoder2ForCausalLM,
                   {**MHA, "hidden_size": 48, "intermediate_size": 80, "num_key_value_heads": 2,
                    "max_position_embeddings": 64}, 5, 4, torch.bfloat16, None),
    # LayerNorm1P: F.layer_norm(x, shape, weight + 1.0, bias), the weight computed in the
    # graph after the residual add that the norm fuses
    "nemotron": (T.NemotronConfig, T.NemotronForCausalLM,
                 {**MHA, "hidden_size": 48, "intermediate_size": 80, "num_key_value_heads": 2,
                  "max_position_embeddings": 64}, 5, 4, torch.float32, None),
    # LayerNorm written out by hand (no F.layer_norm call), one per layer (parallel residual)
    "cohere": (T.CohereConfig, T.CohereForCausalLM,
               {**MHA, "hidden_size": 48, "intermediate_size": 80, "num_key_value_heads": 2,
                "max_position_embeddings": 64}, 3, 2, torch.bfloat16, None),
    # post-norm: LayerNorm(dropout(dense(h)) + input), and the embeddings' sum
    "bert": (T.BertConfig, T.BertForMaskedLM, {**MHA, "num_hidden_layers": 1, "hidden_size": 48,
                                               "intermediate_size": 80, "max_position_embeddings": 64,
                                               "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
             4, 2, torch.float32, None),
}


def _build(name):
    config_cls, model_cls, config, *_ = MODELS[name]
    torch.manual_seed(0)
    config = config_cls(**config)
    config._attn_implementation = "eager"
    return model_cls(config).to(MODELS[name][5])


def _step(model, ids, run=None):
    model.zero_grad(set_to_none=True)
    loss = (model if run is None else run)(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", MODELS)
def test_models_replace_every_layer_norm(fresh, name):
    """Inference, then a training step: every LayerNorm replaced (the residual adds fused
    where the norm reads one), logits, loss and gradients as accurate as eager's."""
    count, fused, dtype, options = MODELS[name][3:]
    options = options if not torch.cuda.is_available() else None
    model = _build(name).eval()
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("LayerNorm")]
    assert len(norms) == count
    ref_model = copy.deepcopy(model).double()
    ids = torch.randint(3, MHA["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager, ref = model(ids).logits, ref_model(ids).logits
        compiled = torch.compile(model, backend="hubkernels", options=options)(ids).logits
    assert replaced(fresh)["layer_norm"] == count
    assert sum(s.startswith("add_") for r in fresh for s, _ in r.spellings["layer_norm"]) == fused
    assert_close_to_reference(compiled, eager, ref, dtype, f"{name} logits")

    fresh.clear()
    torch._dynamo.reset()
    model.train()
    ref_model.train()
    eager_loss, eager_grads = _step(model, ids)
    ref_loss, ref_grads = _step(ref_model, ids)
    loss, grads = _step(model, ids, torch.compile(model, backend="hubkernels", options=options))
    assert replaced(fresh)["layer_norm"] == count
    assert sum(r.code_after.count("hubcompile.layer_norm_backward") for r in fresh) == count
    assert_close_to_reference(loss, eager_loss, ref_loss, dtype, f"{name} loss")
    for pname, ref_grad in ref_grads.items():
        assert_close_to_reference(grads[pname], eager_grads[pname], ref_grad, dtype, f"{name} grad {pname}")


# ------------------------------------------------------------------ Hub kernels and layers

STANDIN = Path(__file__).parent / "standins" / "layer-norm"


def _block_run(fresh, dtype, options, train):
    torch.manual_seed(0)
    module = Block().to(dtype)
    ref_module = copy.deepcopy(module).double()
    x = torch.randn(2, 5, 33, dtype=dtype, requires_grad=train)
    residual = torch.randn(2, 5, 33, dtype=dtype)
    with torch.set_grad_enabled(train):
        compiled = torch.compile(module, backend="hubkernels", options={"perf_guard": "off", **options})
        if not train:
            return compiled(x, residual), module(x, residual), ref_module(x.double(), residual.double()), None
    out, grads = _grads(module, x, residual, compiled)
    eager, eager_grads = _grads(module, x, residual)
    ref, ref_grads = _grads(ref_module, x.detach().double().requires_grad_(), residual.double())
    return out, eager, ref, (grads, eager_grads, ref_grads)


def test_kernels_community_layer_norm_convention(fresh):
    """``dropout_add_ln_fwd`` (a stand-in with kernels-community/layer-norm's signature)
    serves every norm of the block's forward; the residual sum is added before it."""
    options = {"kernels": {"layer_norm": [f"local:{STANDIN}#layer_norm", "bundled:layer-norm"]}}
    out, eager, ref, _ = _block_run(fresh, torch.float32, options, train=False)
    assert {k for r in fresh for _, k in r.spellings["layer_norm"]} == {f"local:{STANDIN}#layer_norm"}
    assert replaced(fresh)["layer_norm"] == 4
    assert_close_to_reference(out, eager, ref, torch.float32, "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_layer_of_a_kernel_mapping(fresh, monkeypatch, dtype):
    """``{"LayerNorm": "kernels-community/layer-norm:LayerNorm"}``: the layer runs every
    match, forward and (through its autograd) backward; the bias it ignores is added after it."""
    from hubcompile.lowering import kernels

    monkeypatch.setenv("LOCAL_KERNELS", f"kernels-community/layer-norm={STANDIN}")
    kernels.clear_cache()
    try:
        layer = "hub:kernels-community/layer-norm@1:LayerNorm#LayerNorm"
        calls = kernels.load(layer, DeviceInfo("cpu")).module.layers.CALLS
        calls.clear()
        options = {"kernel_mapping": {"LayerNorm": "kernels-community/layer-norm:LayerNorm"}}
        out, eager, ref, grads = _block_run(fresh, dtype, options, train=True)
        chosen = {(r.kernel, r.backward_kernel) for rec in fresh for r in rec.replacements["layer_norm"]}
        assert chosen == {(layer, layer)} and replaced(fresh)["layer_norm"] == 4
        assert calls, "the layer never ran"
        assert_close_to_reference(out, eager, ref, dtype, "out")
        for i, (g, e, r) in enumerate(zip(*grads)):
            assert_close_to_reference(g, e, r, dtype, f"grad {i}")
    finally:
        kernels.clear_cache()
