"""Bugs a guard on random inputs of a slice cannot see (issue 25), injected through the
config as local repos: a kernel wrong past row 4096 (an index overflow, a tiling bug of
large grids) and one wrong on one call in three (a race). The guard checks a match whole
when it fits its budget, and kernels that did not come with hubcompile are compared with
the reference on their first real calls, then sampled; neither bug reaches the model's
outputs or gradients, and each is named with its errors. Over the budget, the guard runs
the kernel at the real shape and compares rows sampled at the start, middle and end:
a kernel wrong past a row or in its last block is refused there too."""

import logging
import textwrap
import warnings

import pytest
import torch
import transformers as T

from hubcompile.guards import numerical as guards
from hubcompile.lowering import kernels
from numerics import assert_close_to_reference
from test_guards import CORRECT, UserNorm, make_repo

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
# Past row 4096 as 175 sequences of 24 tokens: the norms see rows, and attention over one
# sequence of 4200 tokens would cost these tests most of their time on a CPU.
ROWS = 4200
SEQ = 24


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
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ)
    config._attn_implementation = "eager"
    model = T.LlamaForCausalLM(config).to(dtype).eval()
    ref = T.LlamaForCausalLM(config).double().eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


def ids(rows, seed):
    return torch.randint(0, 64, (rows // SEQ, SEQ), generator=torch.Generator().manual_seed(seed))


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
        for seed, rows in enumerate([SEQ, SEQ, SEQ, ROWS]):
            x = ids(rows, seed)
            out = compiled(x).logits
            assert_close_to_reference(out, model(x).logits, ref(x).logits, dtype, f"{bug} at {rows} rows")
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
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), inputs[:, 1:].flatten()).backward()
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


# ------------------------------------------- matches larger than the whole-check budget

# Over the whole-check budget the kernel runs at the real shape and sampled rows are
# compared: 1000 rows of 33 ([2, 500, 33]), a budget of 2^14 elements for a whole check
# and of 2^12 for the sample: rows 0-19, 240-259 and 480-499 of each batch, where a cut
# check saw the leading 125 rows of one batch. Bugs in flattened rows: past row 900 (in
# the end block only, past the middle one) and in the last block of 64 rows (960-999).
LARGE = (2, 500, 33)
LARGE_BUGS = {
    "past_row_900": "rows[900:] *= 1.5",
    "last_block_of_64": "rows[(rows.shape[0] - 1) // 64 * 64:] *= 1.5",
}


@pytest.fixture
def large(clean, monkeypatch):
    monkeypatch.setattr(guards, "WHOLE_ELEMENTS", {"cpu": 2**14})
    return clean


def large_bug_repo(root, bug, where):
    """A local repo whose rms_norm_forward (or rms_norm_backward, for x's gradient) is
    wrong on the rows LARGE_BUGS[bug] names."""
    if where == "forward":
        return make_repo(root, f"{bug}_forward", f"""
            y, rstd, h = _ok.rms_norm_forward(x, weight, eps, weight_offset, cast_before_scale, residual)
            rows = y.clone().view(-1, y.shape[-1])
            {LARGE_BUGS[bug]}
            return rows.view(y.shape), rstd, h""")
    spec = make_repo(root, f"{bug}_backward", CORRECT)
    init = root / f"{bug}_backward" / "build" / "torch-cpu" / "__init__.py"
    init.write_text(init.read_text().replace("rms_norm_backward = _ok.rms_norm_backward", textwrap.dedent(f"""
        def rms_norm_backward(*args, **kwargs):
            dh, dw = _ok.rms_norm_backward(*args, **kwargs)
            rows = dh.clone().view(-1, dh.shape[-1])
            {LARGE_BUGS[bug]}
            return rows.view(dh.shape), dw
        """)))
    return spec


def user_norm(dtype):
    torch.manual_seed(0)
    model = UserNorm().to(dtype)
    ref = UserNorm().double()
    ref.load_state_dict(model.state_dict())
    return model, ref


def compiled_norm(model, spec):
    return torch.compile(model, backend="hubkernels", options={"kernels": {"rmsnorm": spec}, "patterns": ["rmsnorm"]})


def assert_refused_on_sampled_rows(records, spec):
    (record,) = records
    assert record.replaced["rmsnorm"] == 0
    (_, reason), = record.refused["rmsnorm"]
    assert reason.startswith(f"guard failed for {spec}: ") and "rmse" in reason and "> bound" in reason, reason
    (_, kernel, result), = record.guards["rmsnorm"]
    assert kernel == spec and not result.passed
    # caught by the sampled rows (the end block), the kernel at its real shape
    assert result.reach.startswith("sampled rows") and "480-499 of 500" in result.reach, result.reach
    assert result.reach in reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bug", list(LARGE_BUGS))
def test_large_match_with_a_wrong_forward_is_refused(large, tmp_path, bug, dtype):
    spec = large_bug_repo(tmp_path, bug, "forward")
    model, ref = user_norm(dtype)
    x = torch.randn(*LARGE, dtype=dtype)
    with torch.no_grad():
        out = compiled_norm(model, spec)(x)
        assert_close_to_reference(out, model(x), ref(x.double()), dtype, bug)
    assert_refused_on_sampled_rows(large, spec)


def training_step(run, model, x, cotangent):
    """The output and the gradients of x and the parameters for ``cotangent``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = run(x)
    out.backward(cotangent)
    return [out.detach(), x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bug", list(LARGE_BUGS))
def test_large_match_with_a_wrong_backward_is_refused(large, tmp_path, bug, dtype):
    spec = large_bug_repo(tmp_path, bug, "backward")
    model, ref = user_norm(dtype)
    x, cotangent = torch.randn(*LARGE, dtype=dtype), torch.randn(*LARGE, dtype=dtype)
    got = training_step(compiled_norm(model, spec), model, x, cotangent)
    eager = training_step(model, model, x, cotangent)
    want = training_step(ref, ref, x.double(), cotangent.double())
    for what, new, orig, r in zip(["out", "grad x", "grad proj.weight", "grad proj.bias", "grad weight"],
                                  got, eager, want):
        assert_close_to_reference(new, orig, r, dtype, f"{bug} {what}")
    assert_refused_on_sampled_rows(large, spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_large_match_with_a_correct_kernel_passes(large, tmp_path, training, dtype):
    spec = make_repo(tmp_path, "correct", CORRECT)
    model, ref = user_norm(dtype)
    x, cotangent = torch.randn(*LARGE, dtype=dtype), torch.randn(*LARGE, dtype=dtype)
    if training:
        got = training_step(compiled_norm(model, spec), model, x, cotangent)
        eager = training_step(model, model, x, cotangent)
        want = training_step(ref, ref, x.double(), cotangent.double())
    else:
        with torch.no_grad():
            got, eager, want = [compiled_norm(model, spec)(x)], [model(x)], [ref(x.double())]
    (record,) = large
    (_, kernel, result), = record.guards["rmsnorm"]
    assert record.replaced["rmsnorm"] == 1 and result.passed, result.summary()
    assert result.reach.startswith("sampled rows"), result.reach
    assert [c.what for c in result.comparisons] == ["out"] + (["grad x", "grad w"] if training else [])
    for new, orig, r in zip(got, eager, want):
        assert_close_to_reference(new, orig, r, dtype, "correct kernel")


def test_sampled_rows_reach_what_a_cut_check_misses(clean, tmp_path, monkeypatch):
    """The same large match, checked cut (the kernel cannot run at its real shape) and
    sampled: the bug past row 900 is only seen by the sampled check."""
    from hubcompile.patterns import rmsnorm

    spec = large_bug_repo(tmp_path, "past_row_900", "forward")
    spelling = next(s for stage in rmsnorm.FAMILY.stages for s in stage if s.name == "llama_pow_w_first")
    values = {"x": torch.empty(*LARGE), "w": torch.empty(LARGE[-1]), "eps": 1e-6}
    monkeypatch.setattr(guards, "WHOLE_ELEMENTS", {"cpu": 2**14})
    assert guards.reach(spelling, values) == "rows"
    sampled = guards.check(spelling, values, (spec, spec), backward=False)
    monkeypatch.setattr(guards, "REAL_SIZE_ELEMENTS", {"cpu": 2**14})
    assert guards.reach(spelling, values) == "cut"
    cut = guards.check(spelling, values, (spec, spec), backward=False)
    assert not sampled.passed and sampled.reach.startswith("sampled rows"), sampled.summary()
    assert cut.passed and cut.reach == "cut to x [1, 125, 33], w [33]", cut.summary()


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


def wrong_past(t, dim, start):
    """``t`` with its entries from ``start`` on along ``dim`` 1.5 times too large."""
    t = t.clone()
    t.narrow(dim, start, t.shape[dim] - start).mul_(1.5)
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_samples_query_rows_against_all_keys(clean, monkeypatch, dtype):
    """Attention is never checked whole: its output rows (query rows, per batch) are
    sampled, each against all the keys, the kernel at the real shape. A kernel wrong past
    query row 300 of 400 is refused (in its output and all three gradients), the right
    one passes."""
    import dataclasses

    from hubcompile.patterns import attention

    monkeypatch.setattr(guards, "MAX_ELEMENTS", 2**12)
    right = next(s for stage in attention.FAMILY.stages for s in stage if s.name == "gqa_masked_t")
    wrong = dataclasses.replace(right, name="gqa_masked_t_wrong_past_query_300",
                                replace=lambda q, k, v, mask, scale: wrong_past(right.replace(q, k, v, mask, scale),
                                                                                2, 300))
    k = torch.empty(3, 2, 400, 8, dtype=dtype)
    values = {"q": torch.empty(3, 4, 400, 8, dtype=dtype), "k": k, "v": k.clone(),
              "mask": torch.empty(3, 1, 400, 400, dtype=dtype), "scale": 0.3}
    assert guards.reach(right, values) == "rows"
    kernels_ = ("bundled:attention", "bundled:attention")
    passed = guards.check(right, values, kernels_, backward=True)
    refused = guards.check(wrong, values, kernels_, backward=True)
    assert passed.passed, passed.summary()
    assert not refused.passed and {c.what for c in refused.comparisons if not c.ok} == {
        "out", "grad q", "grad k", "grad v"}, refused.summary()
    for result in (passed, refused):
        assert result.reach.startswith("sampled rows") and "399 of 400" in result.reach, result.reach


def test_causal_conv1d_samples_channels_over_the_whole_sequence(clean, monkeypatch):
    """Causal conv1d's rows are (batch, channel) pairs, each a scan over the whole
    sequence with its channel's weight and bias: a kernel wrong from channel 60 of 64 on
    is refused, the right one passes."""
    import dataclasses

    from hubcompile.patterns import causal_conv1d

    monkeypatch.setattr(guards, "MAX_ELEMENTS", 2**12)
    monkeypatch.setattr(guards, "WHOLE_ELEMENTS", {"cpu": 2**14})
    right = causal_conv1d.FAMILY.stages[0][0]
    wrong = dataclasses.replace(right, name=f"{right.name}_wrong_past_channel_60",
                                replace=lambda x, w, b: wrong_past(right.replace(x, w, b), 1, 60))
    values = {"x": torch.empty(3, 64, 300), "w": torch.empty(64, 1, 4), "b": torch.empty(64)}
    kernels_ = ("bundled:causal-conv1d", "bundled:causal-conv1d")
    passed = guards.check(right, values, kernels_, backward=True)
    refused = guards.check(wrong, values, kernels_, backward=True)
    assert passed.passed and not refused.passed, (passed.summary(), refused.summary())
    assert refused.reach.startswith("sampled rows") and "63 of 64" in refused.reach, refused.reach


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lm_head_loss_is_checked_on_sampled_rows(clean, monkeypatch, dtype):
    """The LM head's loss reduces over the rows: the guard ignores the targets of the rows
    it does not sample, so the kernel's loss at the real shape is the sample's. A kernel
    wrong past row 700 of 800 is refused; the right one passes."""
    import torch.nn.functional as F

    from hubcompile.patterns import linear_cross_entropy as lce

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(24, 101, bias=False)

        def forward(self, h, y):
            return F.cross_entropy(self.proj(h), y)

    torch.manual_seed(0)
    head = Head().to(dtype)
    h, y = torch.randn(800, 24, dtype=dtype, requires_grad=True), torch.randint(0, 101, (800,))
    monkeypatch.setattr(guards, "MAX_ELEMENTS", 2**12)
    right_call = lce._call
    results = {}
    for case in ("right", "wrong"):
        if case == "wrong":
            monkeypatch.setattr(lce, "_call", lambda kind, h, *args: right_call(kind, wrong_past(h, 0, 700), *args))
        clean.clear()
        torch._dynamo.reset()
        guards.clear_cache(disk=True)  # the wrong kernel is the same spec
        loss = torch.compile(head, backend="hubkernels")(h, y)
        torch.testing.assert_close(loss, head(h, y), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
        (results[case],) = [result for r in clean for _, _, result in r.guards.get("linear_cross_entropy", [])]
    assert results["right"].passed and not results["wrong"].passed, results["wrong"].summary()
    assert {c.what for c in results["wrong"].comparisons if not c.ok} >= {"out", "grad h"}
    for result in results.values():
        assert result.reach.startswith("sampled rows") and "799 of 800" in result.reach, result.reach
