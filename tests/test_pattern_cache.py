"""The traced-pattern cache (hubcompile/patterns/trace_cache.py): patterns loaded from
disk are the traced ones, a compile from the cache traces nothing and replaces the
same matches, and an unreadable file is traced again."""

import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch._inductor import pattern_matcher

from hubcompile.patterns import families, gated_activation, rmsnorm, rotary, trace_cache
from small_modules import Block
from tiny_models import replaced


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty pattern cache, and a count of the initial traces Inductor runs."""
    monkeypatch.setenv("HUBCOMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(trace_cache.ENV_PATTERN_CACHE, raising=False)
    monkeypatch.delenv(trace_cache.ENV_PATTERN_CACHE_DIR, raising=False)
    traces = []
    real = pattern_matcher.gen_pattern_and_search_gm

    def counting(*args, **kwargs):
        traces.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(pattern_matcher, "gen_pattern_and_search_gm", counting)
    yield traces


def _patterns(pm_pass):
    """Each registered pattern in order, as text, with its duplicate-check record."""
    return ([(key, [repr(entry.pattern) for entry in entries]) for key, entries in pm_pass.patterns.items()],
            dict(pm_pass.seen_patterns))


@pytest.mark.parametrize("family, stage, kind", [
    (rmsnorm.FAMILY, 0, "joint"),  # multi-output joint patterns
    (rmsnorm.FAMILY, 1, "fwd"),
    (rotary.FAMILY, 0, "fwd"),  # lists of patterns (cat) as arguments
], ids=["rmsnorm-joint", "rmsnorm-fwd", "rotary-fwd"])
def test_loaded_patterns_are_the_traced_ones(cache, family, stage, kind):
    name = f"{family.name}-{stage}-test"
    traced = family.register_stage(stage, kind, name)
    n_traced = len(cache)
    assert n_traced == sum(len(s.dtypes) for s in family.stages[stage])
    assert (trace_cache.cache_dir() / f"{name}.pkl").exists()

    loaded = family.register_stage(stage, kind, name)
    assert len(cache) == n_traced, "the second registration traced again"
    assert _patterns(loaded) == _patterns(traced)
    for (_, a), (_, b) in zip(traced.patterns.items(), loaded.patterns.items()):
        for x, y in zip(a, b):
            assert x.pattern.pattern_eq(y.pattern)


def test_a_compile_from_the_cache_traces_nothing_and_replaces_the_same(cache, fresh):
    torch.manual_seed(0)
    model, x = Block(), torch.randn(2, 5, 16, requires_grad=True)
    ref_out = model(x)
    ref_out.sum().backward()
    ref_grad = x.grad
    chosen = [rmsnorm.FAMILY, *gated_activation.FAMILIES]
    saved = [dict(f._passes) for f in chosen]
    results = []
    try:
        for attempt in range(2):
            for f in chosen:
                f._passes.clear()
            torch._dynamo.reset()
            fresh.clear()
            x.grad = None
            before = len(cache)
            out = torch.compile(model, backend="hubkernels")(x)
            out.sum().backward()
            results.append((replaced(fresh), len(cache) - before))
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x.grad, ref_grad, rtol=1e-5, atol=1e-5)
    finally:
        for f, passes in zip(chosen, saved):
            f._passes.clear()
            f._passes.update(passes)
    (first, traces_first), (second, traces_second) = results
    # (fp32 training: the first norm reads the input directly and stays Inductor's, as in
    # test_models.py)
    assert first == second == {"rmsnorm": 1, "silu_gate": 1}, results
    assert traces_first > 0 and traces_second == 0, results


def test_an_unreadable_file_is_traced_again(cache, caplog):
    family, name = rotary.FAMILY, "rotary-0-unreadable"
    path = trace_cache.cache_dir() / f"{name}.pkl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a pickle")
    with caplog.at_level(logging.WARNING, logger="hubcompile"):
        family.register_stage(0, "fwd", name)
    assert len(cache) == sum(len(s.dtypes) for s in family.stages[0])
    assert any("unreadable pattern cache" in r.message and str(path) in r.message for r in caplog.records)
    assert trace_cache.load(name)  # rewritten with the traced patterns


def test_turned_off_it_neither_reads_nor_writes(cache, monkeypatch):
    monkeypatch.setenv(trace_cache.ENV_PATTERN_CACHE, "0")
    family, name = rotary.FAMILY, "rotary-0-off"
    family.register_stage(0, "fwd", name)
    family.register_stage(0, "fwd", name)
    assert len(cache) == 2 * sum(len(s.dtypes) for s in family.stages[0])
    assert not trace_cache.cache_dir().exists()


def test_spelling_names_are_unique_cache_keys():
    for family in families():
        for stage in family.stages:
            keys = [(s.name, d) for s in stage for d in s.dtypes]
            assert len(keys) == len(set(keys)), family.name


def test_the_directory_follows_torch_and_the_pattern_sources(cache, tmp_path, monkeypatch):
    assert trace_cache.cache_dir().parent == tmp_path / "patterns" and torch.__version__ in trace_cache.cache_dir().name
    monkeypatch.setenv(trace_cache.ENV_PATTERN_CACHE_DIR, str(tmp_path / "shared"))
    assert trace_cache.cache_dir().parent == tmp_path / "shared"
    sources = Path(trace_cache.__file__).parent
    copy = tmp_path / "copy"
    shutil.copytree(sources, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert trace_cache.source_digest(copy) == trace_cache.source_digest(sources)
    with open(copy / "rmsnorm.py", "a") as f:
        f.write("# an edit\n")
    trace_cache.source_digest.cache_clear()
    assert trace_cache.source_digest(copy) != trace_cache.source_digest(sources)


# ------------------------------------------------ traces at each match, and in workers


def _match_time_traces(monkeypatch, model, x):
    """How many times the matcher retraces a search function at the matches of ``model``
    (a training step): with fake tensors (the initial traces, of real example tensors,
    come from the cache)."""
    from torch._subclasses.fake_tensor import FakeTensor

    from hubcompile.patterns import framework

    calls = []
    searches = {s.search for f in families() for stage in f.stages for s in stage}

    def counting(real):
        def trace(fn, args, *rest, **kwargs):
            if fn in searches and any(isinstance(a, FakeTensor) for a in args):
                calls.append(fn)
            return real(fn, args, *rest, **kwargs)
        return trace

    monkeypatch.setattr(framework, "fwd_only", counting(pattern_matcher.fwd_only))
    monkeypatch.setattr(framework, "joint_fwd_bwd", counting(pattern_matcher.joint_fwd_bwd))
    torch._dynamo.reset()
    for f in (rmsnorm.FAMILY, *gated_activation.FAMILIES):
        f._passes.clear()  # registered again, with the counting trace functions
    torch.compile(model, backend="hubkernels", options={"patterns": ["rmsnorm", "silu_gate"]})(x).sum().backward()
    return len(calls)


def test_layers_of_the_same_shapes_trace_each_spelling_once(cache, fresh, monkeypatch):
    """A model's layers share their shapes: the retrace of a spelling's search function
    is done at its first match and remembered for the others."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    one = _match_time_traces(monkeypatch, Block().to(torch.bfloat16), x)
    per_layer = replaced(fresh)
    fresh.clear()
    three = _match_time_traces(monkeypatch, torch.nn.Sequential(Block(), Block(), Block()).to(torch.bfloat16), x)
    assert replaced(fresh) == {f: 3 * n for f, n in per_layer.items()} and per_layer["rmsnorm"] == 2, per_layer
    assert three == one > 0, (one, three)
    for f in (rmsnorm.FAMILY, *gated_activation.FAMILIES):
        f._passes.clear()  # not the counting ones, for the tests after this one


def test_workers_trace_what_the_cache_lacks(cache, monkeypatch):
    """With cores to spare, the patterns a compile lacks are traced by worker processes
    into the cache: the same patterns as traced here, and registering them traces nothing."""
    monkeypatch.setenv(trace_cache.ENV_TRACE_WORKERS, "2")
    monkeypatch.setattr(trace_cache, "WORKER_START_COST", 0)
    family = rotary.FAMILY
    monkeypatch.setattr(family, "_passes", {})  # none registered in this process yet
    stages = range(len(family.stages))
    todo = family.untraced(training=False)
    assert todo == {f"rotary-{i}-fwd": family.trace_keys(i) for i in stages}
    assert trace_cache.trace_elsewhere(todo) == sum(len(keys) for keys in todo.values())
    assert family.untraced(training=False) == {}
    loaded = [family.register_stage(i, "fwd") for i in stages]
    assert len(cache) == 0, "traced in this process"
    monkeypatch.setenv(trace_cache.ENV_PATTERN_CACHE, "0")
    traced_here = [family.register_stage(i, "fwd") for i in stages]
    assert len(cache) == sum(len(keys) for keys in todo.values())
    assert [_patterns(p) for p in loaded] == [_patterns(p) for p in traced_here]


def test_a_failing_worker_leaves_the_tracing_to_the_compile(cache, monkeypatch, caplog):
    monkeypatch.setenv(trace_cache.ENV_TRACE_WORKERS, "2")
    monkeypatch.setattr(trace_cache, "WORKER_START_COST", 0)
    with caplog.at_level(logging.WARNING, logger="hubcompile"):
        assert trace_cache.trace_elsewhere({"no_such_family-0-fwd": ["a:x", "b:x"]}) == 0
    assert any("2 of 2 pattern-tracing workers failed" in r.message for r in caplog.records), caplog.text


def test_workers_start_before_aot_autograd_and_the_joint_pass_waits_for_them(cache, fresh, monkeypatch):
    """The backend starts the workers as Dynamo's graph arrives, so that they run beside
    AOTAutograd's trace; the joint pass then loads their patterns and traces none itself."""
    from hubcompile.passes import pipeline

    monkeypatch.setenv(trace_cache.ENV_TRACE_WORKERS, "2")
    monkeypatch.setattr(trace_cache, "WORKER_START_COST", 0)
    events = []
    real_init, real_finish, real_pass = trace_cache.Tracing.__init__, trace_cache.Tracing.finish, \
        pipeline.HubcompilePass.__call__

    def init(self, jobs, count):
        events.append(("start", {name.rsplit("-", 2)[-1] for name, _ in jobs}))
        real_init(self, jobs, count)

    def finish(self):
        events.append(("finish", self.done is None))
        return real_finish(self)

    def joint_pass(self, graph):
        events.append(("joint pass", None))
        return real_pass(self, graph)

    monkeypatch.setattr(trace_cache.Tracing, "__init__", init)
    monkeypatch.setattr(trace_cache.Tracing, "finish", finish)
    monkeypatch.setattr(pipeline.HubcompilePass, "__call__", joint_pass)
    chosen = [rmsnorm.FAMILY, *gated_activation.FAMILIES]
    for f in chosen:
        monkeypatch.setattr(f, "_passes", {})  # none registered in this process yet
    torch.manual_seed(0)
    model, x = Block(), torch.randn(2, 5, 16)
    with torch.no_grad():
        out = torch.compile(model, backend="hubkernels")(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    # inference: forward-only patterns; waited for by the joint pass, then once more a no-op
    assert events == [("start", {"fwd"}), ("joint pass", None), ("finish", True), ("finish", False)], events
    ours = [f for f in cache if f.__module__.startswith("hubcompile")]  # not Inductor's own, first used here
    assert ours == [], "traced in this process"
    assert replaced(fresh) == {"rmsnorm": 2, "silu_gate": 1}, replaced(fresh)
    # A new process on this machine: the cache files are there, no worker starts
    events.clear()
    torch._dynamo.reset()
    for f in chosen:
        f._passes.clear()
    with torch.no_grad():
        torch.compile(model, backend="hubkernels")(x)
    assert events == [("joint pass", None)], events


def test_workers_are_used_only_where_cores_are_spare_and_time_is_saved(monkeypatch):
    monkeypatch.delenv(trace_cache.ENV_TRACE_WORKERS, raising=False)
    training = [("attention-0-joint", f"s{i}") for i in range(150)] + [("rmsnorm-0-fwd", f"s{i}") for i in range(150)]
    inference = [("rotary-0-fwd", f"s{i}") for i in range(22)]  # a GPT-NeoX prefill's: 22 quick traces
    assert trace_cache.trace_cost(training) == 150 * 9 + 150
    monkeypatch.setattr(trace_cache.os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert trace_cache.trace_workers(training) == 0  # 2 cores: one compiles, one is no pool
    monkeypatch.setattr(trace_cache.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert trace_cache.trace_workers(training) == trace_cache.MAX_TRACE_WORKERS
    assert trace_cache.trace_workers(inference) == 0  # starting workers would take longer than tracing here
    monkeypatch.setenv(trace_cache.ENV_TRACE_WORKERS, "3")
    assert trace_cache.trace_workers(training) == 3
    monkeypatch.setenv(trace_cache.ENV_TRACE_WORKERS, "0")
    assert trace_cache.trace_workers(training) == 0
    monkeypatch.setenv(trace_cache.ENV_TRACE_WORKERS, "many")
    with pytest.raises(ValueError, match="HUBCOMPILE_TRACE_WORKERS='many'"):
        trace_cache.trace_workers(training)
