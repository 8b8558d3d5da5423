"""Eager attention whose kernel is SDPA is traced into the graph, forward and backward
(hubcompile/passes/traced_attention.py): the graph holds SDPA's own fused ops, the
forward runs once per step, and logits and gradients match float64."""

import re

import pytest
import torch

from test_causal_mask import LLAMA, assert_close_to_float64, causal_lm, loss_and_grads
from tiny_models import LLAMA_LIKE, input_ids, replaced

OPTIONS = {"perf_guard": "off"}
LAYERS = LLAMA_LIKE["num_hidden_layers"]
# SDPA's fused ops on any device: flash, cuDNN, memory-efficient, flash for CPU
SDPA_FORWARD = re.compile(r"aten\._scaled_dot_product_\w*attention(_for_cpu)?\.default\(")
SDPA_BACKWARD = re.compile(r"aten\._scaled_dot_product_\w*attention(_for_cpu)?_backward\.default\(")


def _calls(code: str, pattern) -> list[str]:
    return [line.strip() for line in code.splitlines() if pattern.search(line)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_graph_runs_sdpa_once_per_layer(fresh, dtype):
    """One SDPA forward and one SDPA backward per layer, causal and without a mask; no
    hubcompile attention op left (its backward ran the forward again)."""
    model = causal_lm(*LLAMA, dtype, "eager")
    ids = input_ids()
    logits, grads = loss_and_grads(model, torch.compile(model, backend="hubkernels", options=OPTIONS), ids)
    counts = replaced(fresh)
    assert counts["attention"] == counts["causal_mask"] == LAYERS, counts
    code = fresh[-1].code_after
    assert "hubcompile.attention" not in code
    forwards, backwards = _calls(code, SDPA_FORWARD), _calls(code, SDPA_BACKWARD)
    assert len(forwards) == len(backwards) == LAYERS, (forwards, backwards)
    # is_causal (after dropout_p 0.0) set, and no mask reaches the kernels
    assert all("0.0, True" in line for line in forwards + backwards), forwards + backwards
    assert all("attn_mask = None" in line or "attn_bias" not in line for line in backwards)
    assert_close_to_float64(model, LLAMA, "eager", ids, logits, grads, dtype)


def test_padding_mask_is_passed_to_sdpa(fresh):
    """A mask the caller passes (right padding, as training batches are padded) cannot be
    dropped: SDPA gets it, and logits and gradients are eager's."""
    model = causal_lm(*LLAMA, torch.float32, "eager")
    ids = input_ids()
    attention_mask = torch.ones_like(ids)
    attention_mask[1, -4:] = 0
    labels = ids.masked_fill(attention_mask == 0, -100)

    def loss_and_grads(run):
        model.zero_grad(set_to_none=True)
        out = run(ids, labels=labels, attention_mask=attention_mask, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, grads = loss_and_grads(torch.compile(model, backend="hubkernels", options=OPTIONS))
    eager_logits, eager_grads = loss_and_grads(model)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    code = fresh[-1].code_after
    assert "hubcompile.attention" not in code
    forwards = _calls(code, SDPA_FORWARD)
    assert len(forwards) == LAYERS and not any("0.0, True" in line for line in forwards), forwards


def test_rows_that_see_no_key():
    """Left padding: a query row whose every key carries the dtype's minimum. Eager softmax
    gives it equal weights (min + score rounds to min), so its output is the mean of v; the
    bundled kernel gives the same output and the same dv. SDPA alone got dv wrong there: its
    backward recomputes the weights from a log-sum-exp that lost log(S) next to -3.4e38.
    dq and dk of such a row are 0, the derivative of a row that does not depend on them
    (eager's autograd passes a gradient through the rounded-away scores)."""
    import importlib.util

    from hubcompile.lowering.kernels import BUNDLED_ROOT

    path = BUNDLED_ROOT / "attention" / "build" / "torch-cpu" / "__init__.py"
    spec = importlib.util.spec_from_file_location("bundled_attention_test", path)
    bundled = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bundled)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.float64)
    mask[1, :, :2, :] = torch.finfo(torch.float64).min  # batch 1: rows 0-1 see no key
    mask[1, :, 2:, :2] = torch.finfo(torch.float64).min

    def eager(q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5 + mask, dim=-1)
        return w @ v

    dout = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    out = bundled.attention_forward(q, k, v, mask, 8 ** -0.5)
    ref = eager(q, k, v)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    torch.testing.assert_close(grads[2], ref_grads[2])  # dv
    live = torch.ones(2, 6, dtype=torch.bool)
    live[1, :2] = False
    rows = live[:, None].expand(2, 3, 6)
    torch.testing.assert_close(grads[0][rows], ref_grads[0][rows])  # dq of the rows that see keys
    assert grads[0][1, :, :2].abs().max() == 0


def test_inference_graph_runs_sdpa(fresh):
    model = causal_lm(*LLAMA, torch.float32, "eager").eval()
    ids = input_ids()
    with torch.no_grad():
        logits = torch.compile(model, backend="hubkernels", options=OPTIONS)(ids, use_cache=False).logits
        eager = model(ids, use_cache=False).logits
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-5)
    code = fresh[-1].code_after
    assert "hubcompile.attention" not in code and len(_calls(code, SDPA_FORWARD)) == LAYERS


def test_other_kernels_stay_ops(fresh):
    """Only a kernel that declares its forward traceable is traced: the reference (like a
    Hub kernel) runs through the op."""
    model = causal_lm(*LLAMA, torch.float32, "eager")
    ids = input_ids()
    run = torch.compile(model, backend="hubkernels", options={**OPTIONS, "kernels": {"attention": "reference"}})
    logits, _ = loss_and_grads(model, run, ids)
    torch.testing.assert_close(logits, loss_and_grads(model, model, ids)[0], rtol=1e-4, atol=1e-5)
    code = fresh[-1].code_after
    assert code.count("torch.ops.hubcompile.attention.default") == LAYERS
    assert code.count("torch.ops.hubcompile.attention_backward.default") == LAYERS
    assert not _calls(code, SDPA_FORWARD)


def test_symbolic_shapes_stay_ops(fresh):
    """A batch marked dynamic: the attention is replaced, but not traced (SDPA's backend
    choice depends on the sizes); the op runs the same kernel."""
    from test_attention import UserAttention

    model = UserAttention("div_add")
    mask = torch.zeros(1, 1, 7, 7).masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), -1e4)
    run = torch.compile(model, backend="hubkernels", options=OPTIONS)
    for batch in (2, 3):
        q, k, v = (torch.randn(batch, 7, 3, 8).transpose(1, 2).requires_grad_() for _ in range(3))
        for t in (q, k, v):
            torch._dynamo.mark_dynamic(t, 0)
        out = run(q, k, v, mask)
        torch.testing.assert_close(out, model(q, k, v, mask), rtol=1e-4, atol=1e-5)
    records = [r for r in fresh if r.replaced.get("attention")]
    assert records and all("torch.ops.hubcompile.attention.default" in r.code_after for r in records)
