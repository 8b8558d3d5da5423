"""Bugs a guard on random inputs of a slice cannot see (issue 25), injected through the
config as local repos: a kernel wrong past row 4096 (an index overflow, a tiling bug of
large grids) and one wrong on one call in three (a race). The guard checks a match whole
when it fits its budget, and kernels that did not come with hubcompile are compared with
the reference on their first real calls, then sampled; neither bug reaches the model's
outputs or gradients, and each is named with its errors."""

import logging
import warnings

import pytest
import torch
import transformers as T

from hubcompile.guards import numerical as guards
from hubcompile.lowering import kernels
from numerics import assert_close_to_reference
from test_guards import make_repo

BUGS = {
    "wrong_past_row_4096": """
        y, rstd, h = _ok.rms_norm_forward(x, weight, eps, weight_offset, cast_before_scale, residual)
        y = y.clone()
        y.view(-1, y.shape[-1])[4096:] *= 1.5
        return y, rstd, h""",
    "wrong_one_call_in_three": """
        y, rstd, h = _ok.rms_norm_forward(x, weight, eps, weight_offset, cast_before_scale, residual)
        return (y * 1.5 if call % 3 == 0 else y), rstd, h""",
}
ROWS = 4200


@pytest.fixture
def clean(fresh, monkeypatch):
    kernels.clear_cache()
    guards.clear_cache(disk=True)
    # What a real hidden size does to the slice (4200 x 4096 is over 2^18): 4200 x 32 is
    # over this, so a slice of leading rows would be all the old guard saw.
    monkeypatch.setattr(guards, "MAX_ELEMENTS", 2**12)
    yield fresh
    kernels.clear_cache()
    guards.clear_cache(disk=True)


def tiny_llama(dtype):
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=ROWS)
    config._attn_implementation = "eager"
    model = T.LlamaForCausalLM(config).to(dtype).eval()
    ref = T.LlamaForCausalLM(config).double().eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


def ids(seq, seed):
    return torch.randint(0, 64, (1, seq), generator=torch.Generator().manual_seed(seed))


def named(records, caught, spec) -> list[str]:
    """Where the kernel is named with its errors: guard refusals and runtime-check warnings."""
    reasons = [reason for r in records for _, reason in r.refused.get("rmsnorm", [])]
    reasons += [str(w.message) for w in caught if "failed its runtime check" in str(w.message)]
    return [m for m in reasons if spec in m and ("rmse" in m or "NaN/Inf" in m)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bug", list(BUGS))
def test_inference_outputs_are_unchanged(clean, tmp_path, bug, dtype):
    spec = make_repo(tmp_path, bug, BUGS[bug])
    model, ref = tiny_llama(dtype)
    compiled = torch.compile(model, backend="hubkernels", options={"kernels": {"rmsnorm": spec},
                                                                  "patterns": ["rmsnorm"]})
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed, seq in enumerate([24, 24, 24, ROWS]):
            x = ids(seq, seed)
            out = compiled(x).logits
            assert_close_to_reference(out, model(x).logits, ref(x).logits, dtype, f"{bug} at {seq} tokens")
    assert any(r.replaced["rmsnorm"] for r in clean)  # the kernel was used where it looked right
    assert named(clean, caught, spec), [r.refused for r in clean]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bug", list(BUGS))
def test_training_step_gradients_are_unchanged(clean, tmp_path, bug, dtype):
    spec = make_repo(tmp_path, bug, BUGS[bug])
    model, ref = tiny_llama(dtype)
    x = ids(ROWS, 7)

    def grads(run, m, inputs):
        m.zero_grad(set_to_none=True)
        logits = run(inputs).logits
        torch.nn.functional.cross_entropy(logits[0, :-1].float(), inputs[0, 1:]).backward()
        return logits.detach(), {n: p.grad for n, p in m.named_parameters()}

    compiled = torch.compile(model, backend="hubkernels", options={"kernels": {"rmsnorm": spec},
                                                                  "patterns": ["rmsnorm"]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, got = grads(compiled, model, x)
    eager_out, eager = grads(model, model, x)
    ref_out, want = grads(ref, ref, x)
    assert_close_to_reference(out, eager_out, ref_out, dtype, f"{bug} logits")
    for name, grad in got.items():
        assert_close_to_reference(grad, eager[name], want[name], dtype, f"{bug} grad {name}")
    assert named(clean, caught, spec), [r.refused for r in clean]


def test_guard_checks_a_match_whole_within_its_budget(monkeypatch):
    """4200 rows of 32 are checked at their real shape (the kernel sees rows past 4096);
    over the budget, and for attention (scores grow with the square), they are cut."""
    from hubcompile.patterns import attention, rmsnorm

    spelling = next(s for stage in rmsnorm.FAMILY.stages for s in stage if s.name == "add_llama_pow_w_first")
    values = {"x": torch.empty(ROWS, 32), "residual": torch.empty(ROWS, 32), "w": torch.empty(32), "eps": 1e-6}
    assert guards.checks_whole(spelling, values)
    monkeypatch.setattr(guards, "WHOLE_ELEMENTS", {"cpu": 2 * ROWS * 32 - 1})
    assert not guards.checks_whole(spelling, values)
    assert not any(s.guard_whole for stage in attention.FAMILY.stages for s in stage)


def rms_call(spec, x, w):
    reference = kernels.load("bundled:rmsnorm", kernels.detect(x.device), trusted_orgs=None).rms_norm_forward
    return kernels.call(spec, "rms_norm_forward", x, w, 1e-6, 0.0, True, reference=reference)


# Right on its first four calls, wrong from the fifth on.
WRONG_FROM_CALL_5 = """
        y, rstd, h = _ok.rms_norm_forward(x, weight, eps, weight_offset, cast_before_scale, residual)
        return (y * 1.5 if call >= 5 else y), rstd, h"""


def test_runtime_checks_sample_after_the_first_calls(clean, tmp_path):
    """Defaults: the first 3 calls are checked, then one in runtime_check_every; the
    bundled kernels are not checked."""
    spec = make_repo(tmp_path, "wrong_from_call_5", WRONG_FROM_CALL_5)
    kernels.set_runtime_checks(None, every=4)
    x, w = torch.randn(5, 32), torch.randn(32)
    expected = kernels.load("bundled:rmsnorm", kernels.detect(x.device), trusted_orgs=None).rms_norm_forward(
        x, w, 1e-6, 0.0, True)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [rms_call(spec, x, w)[0] for _ in range(8)]
    # calls 5 and 6 are not checked (the kernel's wrong output goes through), call 7 is
    wrong = [i + 1 for i, y in enumerate(outs) if not torch.allclose(y, expected)]
    assert wrong == [5, 6], wrong
    (message,) = [str(w.message) for w in caught if "failed its runtime check" in str(w.message)]
    assert spec in message and "rmse" in message
    assert not kernels._check_due("bundled:rmsnorm", ("bundled:rmsnorm", "rms_norm_forward", x.device), x)


ALWAYS_WRONG = """
        y, rstd, h = _ok.rms_norm_forward(x, weight, eps, weight_offset, cast_before_scale, residual)
        return y * 1.5, rstd, h"""


def test_runtime_checks_are_skipped_while_a_cuda_graph_is_captured(clean, tmp_path, monkeypatch, caplog):
    spec = make_repo(tmp_path, "always_wrong", ALWAYS_WRONG)
    x, w = torch.randn(5, 32), torch.randn(32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with caplog.at_level(logging.INFO, logger="hubcompile"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            rms_call(spec, x, w)  # no sync, no reference: nothing to record into the graph
        skipped = [r.message for r in caplog.records if "skipped while a CUDA graph is captured" in r.message]
        assert len(skipped) == 1 and spec in skipped[0] and not caught
        # After capture, the calls are checked again (those skipped were not counted).
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        rms_call(spec, x, w)
    assert [str(w.message) for w in caught if "failed its runtime check" in str(w.message)]


def test_whole_budget_follows_free_device_memory(monkeypatch):
    """On CUDA the whole check may take MEMORY_FRACTION of free memory (with what PyTorch's
    allocator holds unused), at WHOLE_BYTES_PER_ELEMENT per input element; the count is
    the CPU's budget, and the fallback where free memory cannot be asked."""
    cuda = torch.device("cuda", 0)
    free = 1 << 30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 4 * free))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    fits = int(free * guards.MEMORY_FRACTION) // guards.WHOLE_BYTES_PER_ELEMENT
    assert guards.fits_whole([torch.empty(fits, device="meta")], cuda)
    assert not guards.fits_whole([torch.empty(fits + 1, device="meta")], cuda)
    # memory the allocator caches but does not use counts as free
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: free)
    assert guards.fits_whole([torch.empty(2 * fits, device="meta")], cuda)
    # the same tensors on CPU: the count
    assert not guards.fits_whole([torch.empty(guards.WHOLE_ELEMENTS["cpu"] + 1, device="meta")], torch.device("cpu"))

    def unanswered(device=None):
        raise RuntimeError("no driver")

    monkeypatch.setattr(torch.cuda, "mem_get_info", unanswered)
    assert guards.free_bytes(cuda) is None
    assert guards.fits_whole([torch.empty(guards.WHOLE_ELEMENTS_DEVICE, device="meta")], cuda)
