"""The performance guard: a graph keeps hubcompile's replacements, family by family, only
where they make it faster than plain Inductor or as fast with less memory; decisions are
cached on disk. On CPU the guard is forced on (perf_guard="on"); the timer (and the peak
memory, which CPU does not measure) is replaced where a test needs a given verdict, and a
kernel made slow on purpose checks the real timer."""

import json
import logging

import pytest
import torch

from hubcompile.guards import performance as perf_guard
from hubcompile.lowering import kernels
from small_modules import Block, LlamaRMSNorm
from test_guards import make_repo


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


def fake_timer(monkeypatch, plain_ms, family_ms, peaks=None):
    """sample_ms gives ``plain_ms`` plus the cost of each family the variant keeps; the
    peak is ``peaks[variant name]`` (None: unmeasured, as on CPU). Returns the variants
    timed, by name."""
    timed = []

    def sample_ms(variant, inputs, training, calls, restore=None):
        timed.append((variant.name, training))
        return plain_ms + sum(family_ms.get(f, 0.0) for f in variant.families)

    monkeypatch.setattr(perf_guard, "sample_ms", sample_ms)
    monkeypatch.setattr(perf_guard, "peak_bytes", lambda v, *a: (peaks or {}).get(v.name))
    return timed


def no_timing(monkeypatch, why):
    monkeypatch.setattr(perf_guard, "sample_ms", lambda *a: pytest.fail(why))


def norm_and_input():
    torch.manual_seed(0)
    module = LlamaRMSNorm(24).eval()
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
    return module, torch.randn(3, 5, 24)


def block_and_input():
    torch.manual_seed(0)
    return Block(24, 40).eval(), torch.randn(2, 5, 24)


@pytest.mark.parametrize("rmsnorm_ms,keep", [(-0.5, "hubkernels"), (0.5, "inductor"), (0.0, "inductor")])
def test_the_faster_variant_is_kept(guard, monkeypatch, rmsnorm_ms, keep):
    """A tie (within the noise floor) goes to Inductor: a replacement must earn its place."""
    timed = fake_timer(monkeypatch, 2.0, {"rmsnorm": rmsnorm_ms})
    module, x = norm_and_input()
    run = torch.compile(module, backend="hubkernels", options={"perf_guard": "on"})
    with torch.no_grad():
        out = run(x)
        guard.clear()
        out = run(x)
    torch.testing.assert_close(out, module(x))
    assert {name for name, _ in timed} == {"inductor", "hubkernels"} and not any(t for _, t in timed)
    decision = perf_guard.DECISIONS[-1]
    assert [d.keep for d in perf_guard.DECISIONS] == [keep]
    assert decision.speedup == pytest.approx(1.0 if keep == "inductor" else 2.0 / 1.5)
    assert (len(guard) > 0) == (keep == "hubkernels"), guard


def test_only_the_slow_family_falls_back(guard, monkeypatch, fresh):
    """RMSNorm slows the graph, the gate speeds it up: the graph keeps the gate."""
    timed = fake_timer(monkeypatch, 2.0, {"rmsnorm": 0.6, "silu_gate": -0.4})
    module, x = block_and_input()
    run = torch.compile(module, backend="hubkernels", options={"perf_guard": "on"})
    with torch.no_grad():
        run(x)
        guard.clear()
        out = run(x)
    torch.testing.assert_close(out, module(x), rtol=1e-4, atol=1e-5)
    decision = perf_guard.DECISIONS[-1]
    assert (decision.keep, decision.dropped) == ("hubkernels", ("rmsnorm",)), decision.describe()
    assert {"hubkernels-rmsnorm", "hubkernels-silu_gate"} <= {name for name, _ in timed}
    assert decision.speedup == pytest.approx(2.0 / 1.6)
    assert guard and not any("rms" in name for name in guard), guard  # the gate runs, no norm
    record = fresh[-1]
    assert record.replaced.get("silu_gate") and not record.replaced.get("rmsnorm")
    assert "rmsnorm" in record.dropped
    assert "kept the replacements but rmsnorm" in decision.describe()


def test_two_slow_families_fall_back_together(guard, monkeypatch, fresh):
    """Both removals help: the variant without both is compiled and timed too."""
    from small_modules import Phi3MLP

    class NormGateNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.mlp, self.b = LlamaRMSNorm(16), Phi3MLP(16, 12), LlamaRMSNorm(16)
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.b(self.proj(self.mlp(self.a(x))))

    timed = fake_timer(monkeypatch, 2.0, {"rmsnorm": 0.6, "silu_gate": 0.3})
    module, x = NormGateNorm().eval(), torch.randn(2, 5, 16)
    with torch.no_grad():
        out = torch.compile(module, backend="hubkernels", options={"perf_guard": "on"})(x)
    torch.testing.assert_close(out, module(x), rtol=1e-4, atol=1e-5)
    assert "hubkernels-rmsnorm-silu_gate" in {name for name, _ in timed}
    assert perf_guard.DECISIONS[-1].keep == "inductor"  # nothing left that helps


SLEEPY_OP = """
import time


@torch.library.custom_op("perf_guard_test::sleepy", mutates_args=())
def _sleepy(x: torch.Tensor) -> torch.Tensor:
    time.sleep(0.005)
    return x.clone()


_sleepy.register_fake(lambda x: torch.empty_like(x))
"""


def test_a_kernel_made_slow_falls_back_with_the_real_timer(guard, tmp_path, fresh):
    """A local RMSNorm kernel that sleeps 5 ms per call: the real timer drops RMSNorm, and
    the outputs are eager's. (The sleep is an op of its own: hubcompile traces a function
    kernel into the graph, where a Python-level sleep would vanish.)"""
    slow = make_repo(tmp_path, "slow_rmsnorm", "return _ok.rms_norm_forward(torch.ops.perf_guard_test.sleepy(x), "
                                               "weight, eps, weight_offset, cast_before_scale, residual)")
    with open(slow.removeprefix("local:") + "/__init__.py", "a") as repo:
        repo.write(SLEEPY_OP)
    module, x = block_and_input()
    run = torch.compile(module, backend="hubkernels", options={"perf_guard": "on", "kernels": {"rmsnorm": slow}})
    with torch.no_grad():
        out = run(x)
    torch.testing.assert_close(out, module(x), rtol=1e-4, atol=1e-5)
    decision = perf_guard.DECISIONS[-1]
    assert decision.keep == "inductor" or "rmsnorm" in decision.dropped, decision.describe()
    # At least one 5 ms sleep per call more than Inductor (not Inductor under 5 ms: on a busy
    # 2-core machine its tiny block once took 95 ms)
    assert decision.timings["hubkernels"].ms > decision.timings["inductor"].ms + 5, decision.describe()
    assert not fresh or not fresh[-1].replaced.get("rmsnorm")


@pytest.mark.parametrize("max_slowdown,keep", [(0.0, "inductor"), (0.05, "hubkernels")])
def test_a_lower_peak_is_kept_within_the_noise_or_the_stated_slowdown(guard, monkeypatch, max_slowdown, keep):
    """Within the noise floor the lower peak wins; 3% slower needs max_slowdown >= 3%."""
    fake_timer(monkeypatch, 2.0, {"rmsnorm": 0.005}, peaks={"inductor": 200 << 20, "hubkernels": 100 << 20})
    module, x = norm_and_input()
    with torch.no_grad():
        torch.compile(module, backend="hubkernels", options={"perf_guard": "on"})(x)
    assert perf_guard.DECISIONS[-1].keep == "hubkernels", "0.25% slower: within the noise, half the peak"

    torch._dynamo.reset()
    perf_guard.clear_cache(disk=True)
    fake_timer(monkeypatch, 2.0, {"rmsnorm": 0.06}, peaks={"inductor": 200 << 20, "hubkernels": 100 << 20})
    options = {"perf_guard": {"mode": "on", "max_slowdown": max_slowdown}}
    with torch.no_grad():
        torch.compile(module, backend="hubkernels", options=options)(x)
    decision = perf_guard.DECISIONS[-1]
    assert decision.keep == keep, decision.describe()
    if keep == "hubkernels":
        assert "lower peak" in decision.reason


def test_decision_is_cached_on_disk(guard, monkeypatch, fresh):
    """A second compile of the same graph times nothing; with Inductor chosen it does not
    even run hubcompile's passes, and a family dropped stays dropped."""
    fake_timer(monkeypatch, 2.0, {"rmsnorm": 0.5})
    module, x = norm_and_input()
    with torch.no_grad():
        torch.compile(module, backend="hubkernels", options={"perf_guard": "on"})(x)
    cache = json.loads(perf_guard.cache_path().read_text())
    assert [v["keep"] for v in cache.values()] == ["inductor"]

    torch._dynamo.reset()
    fresh.clear()
    perf_guard.clear_cache()  # the in-memory copy too: read back from disk
    no_timing(monkeypatch, "a cached graph was timed again")
    with torch.no_grad():
        out = torch.compile(module, backend="hubkernels", options={"perf_guard": "on"})(x)
    torch.testing.assert_close(out, module(x))
    assert [(d.keep, d.source) for d in perf_guard.DECISIONS] == [("inductor", "cache")]
    assert len(fresh) == 0  # the passes never ran

    # another shape is another decision
    fake_timer(monkeypatch, 2.0, {"rmsnorm": -0.5})
    with torch.no_grad():
        torch.compile(module, backend="hubkernels", options={"perf_guard": "on"}, dynamic=False)(x[:2])
    assert perf_guard.DECISIONS[-1].keep == "hubkernels"
    assert len(json.loads(perf_guard.cache_path().read_text())) == 2

    # a dropped family, from the cache: only the chosen variant is compiled
    block, y = block_and_input()
    fake_timer(monkeypatch, 2.0, {"rmsnorm": 0.6, "silu_gate": -0.4})
    with torch.no_grad():
        torch.compile(block, backend="hubkernels", options={"perf_guard": "on"})(y)
    torch._dynamo.reset()
    fresh.clear()
    perf_guard.clear_cache()
    no_timing(monkeypatch, "a cached graph was timed again")
    with torch.no_grad():
        out = torch.compile(block, backend="hubkernels", options={"perf_guard": "on"})(y)
    torch.testing.assert_close(out, block(y), rtol=1e-4, atol=1e-5)
    assert [(d.keep, d.dropped, d.source) for d in perf_guard.DECISIONS] == [("hubkernels", ("rmsnorm",), "cache")]
    assert len(fresh) == 1 and fresh[0].replaced.get("silu_gate") and "rmsnorm" in fresh[0].dropped


def test_the_guard_setting_is_part_of_the_key(guard, monkeypatch):
    fake_timer(monkeypatch, 2.0, {"rmsnorm": 0.5})
    module, x = norm_and_input()
    for options in ({"perf_guard": "on"}, {"perf_guard": {"mode": "on", "max_slowdown": 0.1}}):
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(module, backend="hubkernels", options=options)(x)
    assert len(json.loads(perf_guard.cache_path().read_text())) == 2


def test_unreadable_cache_is_ignored_with_a_warning(guard, monkeypatch, caplog):
    perf_guard.cache_path().parent.mkdir(parents=True, exist_ok=True)
    perf_guard.cache_path().write_text("{not json")
    fake_timer(monkeypatch, 2.0, {"rmsnorm": -0.5})
    module, x = norm_and_input()
    with caplog.at_level(logging.WARNING, logger="hubcompile"), torch.no_grad():
        out = torch.compile(module, backend="hubkernels", options={"perf_guard": "on"})(x)
    torch.testing.assert_close(out, module(x))
    assert "ignoring unreadable perf guard cache" in caplog.text
    assert perf_guard.DECISIONS[-1].keep == "hubkernels"
    assert [v["keep"] for v in json.loads(perf_guard.cache_path().read_text()).values()] == ["hubkernels"]


def test_nothing_replaced_is_not_timed(guard, monkeypatch):
    no_timing(monkeypatch, "a graph with no replacement was timed")
    module = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(module, backend="hubkernels", options={"perf_guard": "on"})(x),
                                   module(x))
    assert perf_guard.DECISIONS == []


def test_auto_is_not_asked_off_cuda(guard, monkeypatch):
    no_timing(monkeypatch, "perf_guard='auto' timed a CPU graph")
    module, x = norm_and_input()
    with torch.no_grad():
        torch.compile(module, backend="hubkernels")(x)
    assert guard and perf_guard.DECISIONS == []  # not asked: no decision to report
    assert perf_guard.why_not("auto", [x], torch.fx.symbolic_trace(module), False).startswith(
        "perf_guard='auto' decides on CUDA only")


def test_standing_aside_is_a_decision_in_the_report(guard, monkeypatch):
    """Under CUDA graphs (here forced on CPU through Inductor's own option) the guard does
    not time, and says so in explain()."""
    import hubcompile

    no_timing(monkeypatch, "the guard timed a graph under CUDA graphs")
    monkeypatch.setattr(perf_guard, "why_not", lambda *a: "CUDA graphs are on: running the graph at compile "
                                                          "time would record graphs")
    module, x = norm_and_input()
    report = hubcompile.explain(module, x, options={"perf_guard": "on"})
    assert report.perf_guard == ["stood aside: CUDA graphs are on: running the graph at compile time would record "
                                 "graphs"]
    assert report.totals["rmsnorm"]["replaced"] == 1


class KVCache(torch.nn.Module):
    """A decode step's shape: a static cache buffer written in place at ``pos``, then read."""

    def __init__(self):
        super().__init__()
        self.norm = LlamaRMSNorm(24)
        self.register_buffer("cache", torch.zeros(2, 8, 24))

    def forward(self, x, pos):
        h = self.norm(x)
        self.cache.index_copy_(1, pos, h)
        return h + self.cache.sum(1, keepdim=True)


def test_a_graph_that_mutates_its_inputs_is_decided_on_copies(guard):
    """The real timer on a graph that writes a buffer: the guard decides (not skips), and
    the buffer after the calls is exactly eager's (the timing wrote copies)."""
    torch.manual_seed(0)
    compiled_model, eager_model = KVCache(), KVCache()
    eager_model.load_state_dict(compiled_model.state_dict())
    run = torch.compile(compiled_model, backend="hubkernels", options={"perf_guard": "on"})
    with torch.no_grad():
        for step in range(3):
            x, pos = torch.randn(2, 1, 24), torch.tensor([step])
            torch.testing.assert_close(run(x, pos), eager_model(x, pos), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_model.cache, eager_model.cache, rtol=1e-4, atol=1e-5)
    decision = perf_guard.DECISIONS[0]
    assert decision.source == "measured" and decision.copied == 1, decision.describe()
    assert "timed on copies of the 1 input(s) the graph writes" in decision.describe()


class CountingCache(torch.nn.Module):
    """A static cache as transformers' StaticCache writes it: the slot is a length
    counter the graph advances in place."""

    def __init__(self, slots=4):
        super().__init__()
        self.norm = LlamaRMSNorm(24)
        self.register_buffer("cache", torch.zeros(2, slots, 24))
        self.register_buffer("length", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        h = self.norm(x)
        self.cache.index_copy_(1, self.length.view(1), h)
        self.length.add_(1)
        return h + self.cache.sum(1, keepdim=True)


def test_a_graph_that_advances_a_counter_is_timed_at_the_first_calls_position(guard, caplog):
    """The guard calls the graph many times: each call starts from the state of the
    first, or the counter would run past the 4 slots (index out of bounds; on a GPU a
    device-side assert that ends the process)."""
    torch.manual_seed(0)
    compiled_model, eager_model = CountingCache(), CountingCache()
    eager_model.load_state_dict(compiled_model.state_dict())
    run = torch.compile(compiled_model, backend="hubkernels", options={"perf_guard": "on"})
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="hubcompile"):
        for _ in range(3):
            x = torch.randn(2, 1, 24)
            torch.testing.assert_close(run(x), eager_model(x), rtol=1e-4, atol=1e-5)
    assert not [r for r in caplog.records if "could not time" in r.getMessage()], caplog.text
    assert int(compiled_model.length) == 3
    torch.testing.assert_close(compiled_model.cache, eager_model.cache, rtol=1e-4, atol=1e-5)
    decision = perf_guard.DECISIONS[0]
    assert decision.source == "measured" and decision.copied == 2, decision.describe()


def test_state_it_cannot_copy_and_cuda_graphs_are_stood_aside(guard):
    def f(x, buf):
        buf.add_(1)
        return x * 2

    gm = torch.fx.symbolic_trace(f)
    assert perf_guard.why_not("on", [torch.ones(2), torch.ones(2)], gm, False) is None
    assert perf_guard.mutated_inputs(gm) == [1]
    assert perf_guard.why_not("on", [torch.ones(2)], gm, True).startswith("CUDA graphs are on")

    holder = torch.nn.Module()
    holder.register_buffer("buf", torch.zeros(2))
    graph = torch.fx.Graph()  # a module attribute written in place (not an input)
    x = graph.placeholder("x")
    graph.call_method("add_", (graph.get_attr("buf"), 1))
    graph.output(graph.call_function(torch.mul, (x, 2)))
    reason = perf_guard.why_not("on", [torch.ones(2)], torch.fx.GraphModule(holder, graph), False)
    assert reason is not None and "mutates module state that is not an input (buf)" in reason


def test_pick_prefers_inductor_on_a_tie_and_memory_within_the_noise():
    T = perf_guard.Timing
    assert perf_guard.pick({"inductor": T(1.0, 1.0, 0.0, None), "hubkernels": T(0.998, 0.998, 0.01, None)})[0] \
        == "inductor"
    assert perf_guard.pick({"inductor": T(1.0, 1.0, 0.0, None), "hubkernels": T(0.9, 0.9, 0.01, None)})[0] \
        == "hubkernels"
    assert perf_guard.pick({"inductor": T(1.0, 1.0, 0.0, 100 << 20),
                            "hubkernels": T(1.004, 1.004, 0.005, 50 << 20)})[0] == "hubkernels"
    # a 0.5% lower peak is no win
    assert perf_guard.pick({"inductor": T(1.0, 1.0, 0.0, 1000 << 20),
                            "hubkernels": T(1.004, 1.004, 0.005, 995 << 20)})[0] == "inductor"


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
    assert decision.inductor_ms > 0 and all(t.ms > 0 for t in decision.timings.values())


def test_setting_is_validated():
    from hubcompile import config

    assert config.resolve({"perf_guard": False}).perf_guard.mode == "off"
    assert config.resolve({"perf_guard": {"max_slowdown": 0.03}}).perf_guard == config.PerfGuardSetting("auto", 0.03)
    with pytest.raises(ValueError, match="'perf_guard' must be one of auto, on, off"):
        config.resolve({"perf_guard": "sometimes"})
    with pytest.raises(ValueError, match="'max_slowdown' must be a fraction in \\[0, 1\\).*got 3"):
        config.resolve({"perf_guard": {"max_slowdown": 3}})
    with pytest.raises(ValueError, match="unknown key\\(s\\) 'slowdown'; valid keys: 'mode', 'max_slowdown'"):
        config.resolve({"perf_guard": {"slowdown": 0.1}})


def test_explain_reports_the_decision(guard, monkeypatch):
    import hubcompile

    fake_timer(monkeypatch, 1.0, {"rmsnorm": 1.0})
    module, x = norm_and_input()
    report = hubcompile.explain(module, x, options={"perf_guard": "on"})
    assert report.perf_guard == ["kept plain Inductor (predicted 1.000x Inductor, noise 0.5%, forward, measured, "
                                 "inductor 1.000 ms; hubkernels 2.000 ms)"]
    assert "perf guard: kept plain Inductor" in report.text()
    assert "the performance guard gave this family's replacements up" in report.text()
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
