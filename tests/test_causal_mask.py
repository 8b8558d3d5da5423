"""causal_mask: an SDPA mask built in the graph that is exactly causal becomes
``is_causal=True``; masks from graph inputs, dynamic shapes and other masks stay."""

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from hubcompile.patterns.causal_mask import is_causal
from numerics import assert_close_to_reference
from tiny_models import LLAMA_LIKE, input_ids, replaced

ONLY = {"patterns": ["causal_mask"], "perf_guard": "off"}


LLAMA = (T.LlamaConfig, T.LlamaForCausalLM)


def causal_lm(config_cls, model_cls, dtype, attn="sdpa", **extra):
    """A tiny causal LM with random weights, in training mode, with this attention."""
    torch.manual_seed(0)
    config = config_cls(**{**LLAMA_LIKE, **extra})
    config._attn_implementation = attn
    return model_cls(config).to(dtype).train()


def loss_and_grads(model, run, ids, **kwargs):
    """Without a cache, as training scripts run (use_cache=False): transformers then checks
    the positions for packed sequences and, compiled, always passes SDPA a mask."""
    model.zero_grad(set_to_none=True)
    out = run(ids, labels=ids, use_cache=False, **kwargs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_to_float64(model, classes, attn, ids, logits, grads, dtype):
    """Compiled logits and gradients against the same model run eagerly in float64 (the
    eager model calls SDPA with is_causal=True itself)."""
    eager_logits, eager_grads = loss_and_grads(model, model, ids)
    model64 = causal_lm(*classes, torch.float64, attn)
    ref_logits, ref_grads = loss_and_grads(model64, model64, ids)
    assert_close_to_reference(logits, eager_logits, ref_logits, dtype, "logits")
    for name, grad in grads.items():
        assert_close_to_reference(grad, eager_grads[name], ref_grads[name], dtype, name)


# Qwen2 builds its mask with Llama's code (it differs with a sliding window): one dtype.
@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("llama", torch.bfloat16), ("qwen2", torch.float32)])
def test_transformers_mask_becomes_causal(fresh, arch, dtype):
    """Each layer's SDPA call loses its mask; logits and every gradient match float64."""
    classes = {"llama": LLAMA, "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM)}[arch]
    model = causal_lm(*classes, dtype)
    ids = input_ids()
    logits, grads = loss_and_grads(model, torch.compile(model, backend="hubkernels", options=ONLY), ids)
    assert replaced(fresh) == {"causal_mask": LLAMA_LIKE["num_hidden_layers"]}
    # The mask's computation is gone (its packed-sequence check is a cumsum over positions).
    assert "cumsum" not in fresh[-1].code_before
    assert_close_to_float64(model, classes, "sdpa", ids, logits, grads, dtype)


def test_padding_mask_passed_in_is_kept(fresh):
    """A mask computed from a graph input can only be known at run time: kept, with why."""
    model = causal_lm(*LLAMA, torch.float32)
    ids = input_ids()
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0  # left padding
    run = torch.compile(model, backend="hubkernels", options=ONLY)
    logits, _ = loss_and_grads(model, run, ids, attention_mask=attention_mask)
    eager_logits, _ = loss_and_grads(model, model, ids, attention_mask=attention_mask)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    assert replaced(fresh) == {}
    reasons = {reason for _, reason in fresh[-1].refused["causal_mask"]}
    assert len(reasons) == 1 and "computed from the graph input" in reasons.pop()


def test_sliding_window_is_kept(fresh):
    """Mistral's sliding window (4 keys) over 11 tokens: not causal."""
    model = causal_lm(T.MistralConfig, T.MistralForCausalLM, torch.float32, sliding_window=4)
    ids = input_ids()
    logits, _ = loss_and_grads(model, torch.compile(model, backend="hubkernels", options=ONLY), ids)
    eager_logits, _ = loss_and_grads(model, model, ids)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    assert replaced(fresh) == {}
    assert {reason for _, reason in fresh[-1].refused["causal_mask"]} == {
        "not causal (padding, packed sequences or a window)"}


def test_dynamic_shapes_become_causal(fresh):
    """Under dynamic=True the mask's sizes are symbolic: it cannot be evaluated, but it is
    proven causal from how transformers builds it (causal_proof.py), for any length.
    (Inference: test_dynamic_shapes.py trains under symbolic sizes, eager attention.)"""
    model = causal_lm(*LLAMA, torch.float32).eval()
    run = torch.compile(model, backend="hubkernels", options=ONLY, dynamic=True)
    with torch.no_grad():
        for seq in (11, 13):
            ids = input_ids(seq=seq)
            torch.testing.assert_close(run(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       rtol=1e-4, atol=1e-5)
    assert len(fresh) == 1 and replaced(fresh) == {"causal_mask": LLAMA_LIKE["num_hidden_layers"]}
    assert "cumsum" not in fresh[0].code_before  # the packed-sequence check went with the mask


def test_dynamic_padding_mask_is_kept(fresh):
    """A padding mask passed in stays under symbolic sizes too, with the reason."""
    model = causal_lm(*LLAMA, torch.float32).eval()
    run = torch.compile(model, backend="hubkernels", options=ONLY, dynamic=True)
    ids = input_ids(seq=9)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0
    with torch.no_grad():
        logits = run(ids, attention_mask=attention_mask).logits
        torch.testing.assert_close(logits, model(ids, attention_mask=attention_mask).logits, rtol=1e-4, atol=1e-5)
    assert replaced(fresh) == {}
    reasons = {reason for _, reason in fresh[-1].refused["causal_mask"]}
    assert len(reasons) == 1 and "computed from the graph input" in reasons.pop()


class UserAttention(torch.nn.Module):
    """User code: a bool tril mask, or an additive one filled with -inf above the diagonal."""

    def __init__(self, additive: bool):
        super().__init__()
        self.additive = additive

    def forward(self, q, k, v):
        s = q.shape[-2]
        keep = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        if self.additive:
            mask = torch.zeros(s, s, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        else:
            mask = keep
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_user_written_causal_mask(fresh, additive, dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    module = UserAttention(additive)
    out = torch.compile(module, backend="hubkernels", options=ONLY)(q, k, v)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    eager = module(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = module(q64, k64, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    assert replaced(fresh) == {"causal_mask": 1}
    assert_close_to_reference(out, eager, ref, dtype, "out")
    for name, g, e, r in zip("qkv", grads, eager_grads, ref_grads):
        assert_close_to_reference(g, e, r, dtype, f"d{name}")


@pytest.mark.parametrize("mask,why", [
    (torch.ones(5, 5, dtype=torch.bool).tril(), None),
    (torch.zeros(5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf")), None),
    (torch.zeros(5, 5, dtype=torch.bfloat16).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(),
                                                         torch.finfo(torch.bfloat16).min), None),
    (torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5), None),
    (torch.ones(5, 5, dtype=torch.bool), "not causal (padding, packed sequences or a window)"),
    (torch.randn(5, 5), "an additive mask with values other than 0 and -inf (a bias, not a mask)"),
    (torch.ones(5, 5, dtype=torch.int64), "a torch.int64 mask"),
])
def test_is_causal(mask, why):
    assert is_causal(mask, 2, 5, 5) == why


def test_is_causal_needs_as_many_queries_as_keys():
    assert "aligns them top-left" in is_causal(torch.ones(3, 5, dtype=torch.bool).tril(2), 1, 3, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_attention_runs_causal(fresh, dtype):
    """Eager attention, replaced by the attention family, drops a causal mask too: the op
    and its backward run the kernel's causal mode (a kernel that stays an op; the bundled
    one is traced to SDPA, test_traced_attention.py). Logits and gradients match float64."""
    model = causal_lm(*LLAMA, dtype, "eager")
    ids = input_ids()
    options = {"perf_guard": "off", "kernels": {"attention": "reference"}}
    logits, grads = loss_and_grads(model, torch.compile(model, backend="hubkernels", options=options), ids)
    counts = replaced(fresh)
    assert counts["attention"] == counts["causal_mask"] == 2, counts
    calls = [line for line in fresh[-1].code_after.splitlines() if "torch.ops.hubcompile.attention" in line]
    assert len(calls) == 4 and all("causal = True" in line for line in calls), calls  # 2 forward, 2 backward
    assert_close_to_float64(model, LLAMA, "eager", ids, logits, grads, dtype)


def test_eager_attention_keeps_a_padding_mask(fresh):
    model = causal_lm(*LLAMA, torch.float32, "eager")
    ids = input_ids()
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :4] = 0
    run = torch.compile(model, backend="hubkernels", options={"perf_guard": "off"})
    logits, _ = loss_and_grads(model, run, ids, attention_mask=attention_mask)
    torch.testing.assert_close(logits, loss_and_grads(model, model, ids, attention_mask=attention_mask)[0],
                               rtol=1e-4, atol=1e-5)
    counts = replaced(fresh)
    assert counts["attention"] == 2 and "causal_mask" not in counts, counts
    reasons = {why for _, why in fresh[-1].refused["causal_mask"]}
    assert len(reasons) == 1 and "computed from the graph input" in reasons.pop()
