"""The performance guard: a graph keeps hubcompile's replacements only when it runs faster
with them than under plain Inductor; decisions are cached on disk. On CPU the guard is
forced on (perf_guard="on"), and the timer is replaced where a test needs a verdict."""

import json
import logging

import pytest
import torch

from hubcompile.guards import performance as perf_guard
from hubcompile.lowering import kernels
from small_modules import Block, LlamaRMSNorm


@pytest.fixture
def guard(fresh, tmp_path, monkeypatch):
    """A fresh decision cache in its own directory, and a counter of kernel calls (a
    replaced op runs its kernel through kernels.call; Inductor's code never does)."""
    monkeypatch.setenv("HUBCOMPILE_CACHE_DIR", str(tmp_path))
    perf_guard.clear_cache()
    calls = []
    real_call = kernels.call

    def counting_call(*args, **kwargs):
        calls.append(args[1])
        return real_call(*args, **kwargs)

    monkeypatch.setattr(kernels, "call", counting_call)
    yield calls
    perf_guard.clear_cache()


def fake_timer(monkeypatch, hub_ms, plain_ms):
    """measure() gives these times; choose() times the hubkernels variant first."""
    times = iter([hub_ms, plain_ms])
    timed = []

    def measure(fn, example_inputs, training):
        timed.append(training)
        return next(times)

    monkeypatch.setattr(perf_guard, "measure", measure)
    return timed


def norm_and_input():
    torch.manual_seed(0)
    module = LlamaRMSNorm(24).eval()
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
    return module, torch.randn(3, 5, 24)


@pytest.mark.parametrize("hub_ms,plain_ms,keep", [(1.0, 2.0, "hubkernels"), (2.0, 1.0, "inductor"),
                                                  (1.0, 1.0, "inductor")])
def test_the_faster_variant_is_kept(guard, monkeypatch, hub_ms, plain_ms, keep):
    """A tie goes to Inductor: a replacement must earn its place."""
    timed = fake_timer(monkeypatch, hub_ms, plain_ms)
    module, x = norm_and_input()
    run = torch.compile(module, backend="hubkernels", options={"perf_guard": "on"})
    with torch.no_grad():
        out = run(x)
        guard.clear()
        out = run(x)
    torch.testing.assert_close(out, module(x))
    assert timed == [False, False]
    assert [d.keep for d in perf_guard.DECISIONS] == [keep]
    assert (len(guard) > 0) == (keep == "hubkernels"), guard


def test_decision_is_cached_on_disk(guard, monkeypatch, fresh):
    """A second compile of the same graph times nothing; with Inductor chosen it does not
    even run hubcompile's passes."""
    fake_timer(monkeypatch, 2.0, 1.0)
    module, x = norm_and_input()
    with torch.no_grad():
        torch.compile(module, backend="hubkernels", options={"perf_guard": "on"})(x)
    cache = json.loads(perf_guard.cache_path().read_text())
    assert list(cache.values()) == ["inductor"]

    torch._dynamo.reset()
    fresh.clear()
    perf_guard.clear_cache()  # the in-memory copy too: read back from disk
    monkeypatch.setattr(perf_guard, "measure", lambda *a: pytest.fail("a cached graph was timed again"))
    with torch.no_grad():
        out = torch.compile(module, backend="hubkernels", options={"perf_guard": "on"})(x)
    torch.testing.assert_close(out, module(x))
    assert [(d.keep, d.source) for d in perf_guard.DECISIONS] == [("inductor", "cache")]
    assert len(fresh) == 0  # the passes never ran

    # another shape is another decision
    fake_timer(monkeypatch, 1.0, 2.0)
    with torch.no_grad():
        torch.compile(module, backend="hubkernels", options={"perf_guard": "on"}, dynamic=False)(x[:2])
    assert perf_guard.DECISIONS[-1].keep == "hubkernels"
    assert len(json.loads(perf_guard.cache_path().read_text())) == 2


def test_unreadable_cache_is_ignored_with_a_warning(guard, monkeypatch, caplog):
    perf_guard.cache_path().parent.mkdir(parents=True, exist_ok=True)
    perf_guard.cache_path().write_text("{not json")
    fake_timer(monkeypatch, 1.0, 2.0)
    module, x = norm_and_input()
    with caplog.at_level(logging.WARNING, logger="hubcompile"), torch.no_grad():
        out = torch.compile(module, backend="hubkernels", options={"perf_guard": "on"})(x)
    torch.testing.assert_close(out, module(x))
    assert "ignoring unreadable perf guard cache" in caplog.text
    assert perf_guard.DECISIONS[-1].keep == "hubkernels"
    assert list(json.loads(perf_guard.cache_path().read_text()).values()) == ["hubkernels"]


def test_nothing_replaced_is_not_timed(guard, monkeypatch):
    monkeypatch.setattr(perf_guard, "measure", lambda *a: pytest.fail("a graph with no replacement was timed"))
    module = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(module, backend="hubkernels", options={"perf_guard": "on"})(x),
                                   module(x))
    assert perf_guard.DECISIONS == []


def test_auto_stands_aside_off_cuda(guard, monkeypatch):
    monkeypatch.setattr(perf_guard, "measure", lambda *a: pytest.fail("perf_guard='auto' timed a CPU graph"))
    module, x = norm_and_input()
    with torch.no_grad():
        torch.compile(module, backend="hubkernels")(x)
    assert perf_guard.DECISIONS == [] and guard
    assert perf_guard.why_not("auto", [x], torch.fx.symbolic_trace(module), False).startswith(
        "perf_guard='auto' decides on CUDA only")


def test_graph_that_mutates_its_inputs_is_left_alone(guard):
    def f(x, buf):
        buf.add_(1)
        return x * 2

    gm = torch.fx.symbolic_trace(f)
    reason = perf_guard.why_not("on", [torch.ones(2), torch.ones(2)], gm, False)
    assert reason is not None and "mutates its inputs (buf)" in reason
    assert perf_guard.why_not("on", [torch.ones(2)], gm, True).startswith("CUDA graphs are on")


def test_training_graph_is_timed_forward_and_backward_without_touching_grads(guard):
    """The real timer: forward+backward through autograd.grad, so the parameters' .grad
    after one step equal eager's (the guard's own runs leave no trace)."""
    torch.manual_seed(0)
    block = Block(24, 40)
    x = torch.randn(2, 5, 24)
    run = torch.compile(block, backend="hubkernels", options={"perf_guard": "on"})
    run(x).sum().backward()
    compiled = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad(set_to_none=True)
    block(x).sum().backward()
    for name, p in block.named_parameters():
        torch.testing.assert_close(compiled[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    decision = perf_guard.DECISIONS[-1]
    assert decision.training and decision.source == "measured"
    assert decision.hubkernels_ms > 0 and decision.inductor_ms > 0


def test_setting_is_validated():
    from hubcompile import config

    assert config.resolve({"perf_guard": False}).perf_guard == "off"
    with pytest.raises(ValueError, match="'perf_guard' must be one of auto, on, off"):
        config.resolve({"perf_guard": "sometimes"})


def test_explain_reports_the_decision(guard, monkeypatch):
    import hubcompile

    fake_timer(monkeypatch, 2.0, 1.0)
    module, x = norm_and_input()
    report = hubcompile.explain(module, x, options={"perf_guard": "on"})
    assert report.perf_guard == ["kept plain Inductor (hubkernels 2.000 ms, Inductor 1.000 ms, forward, measured)"]
    assert "perf guard: kept plain Inductor" in report.text()
    assert json.loads(report.to_json())["perf_guard"] == report.perf_guard


def test_timing_leaves_the_callers_autograd_graph_alone(guard):
    """The guard's timing runs take their gradients on detached inputs: the autograd
    graph of the eager code that produced the compiled region's input is still whole
    for the caller's own backward, and the gradients equal eager's."""
    torch.manual_seed(0)
    block = Block(24, 40)
    leaf = torch.randn(2, 5, 24, requires_grad=True)
    run = torch.compile(block, backend="hubkernels", options={"perf_guard": "on"})
    run(leaf.exp()).sum().backward()  # exp saves its result for backward
    compiled = leaf.grad.clone()
    leaf.grad = None
    block(leaf.exp()).sum().backward()
    torch.testing.assert_close(compiled, leaf.grad, rtol=1e-4, atol=1e-5)
    assert perf_guard.DECISIONS[-1].training
