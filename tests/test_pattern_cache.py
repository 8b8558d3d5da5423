"""The traced-pattern cache (hubcompile/patterns/trace_cache.py): patterns loaded from
disk are the traced ones, a compile from the cache traces nothing and replaces the
same matches, and an unreadable file is traced again."""

import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch._inductor import pattern_matcher
from torch._inductor.pattern_matcher import fwd_only, joint_fwd_bwd

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


@pytest.mark.parametrize("family, stage, trace_fn", [
    (rmsnorm.FAMILY, 0, joint_fwd_bwd),  # multi-output joint patterns
    (rmsnorm.FAMILY, 1, fwd_only),
    (rotary.FAMILY, 0, fwd_only),  # lists of patterns (cat) as arguments
], ids=["rmsnorm-joint", "rmsnorm-fwd", "rotary-fwd"])
def test_loaded_patterns_are_the_traced_ones(cache, family, stage, trace_fn):
    name = f"{family.name}-{stage}-test"
    traced = family._register(family.stages[stage], trace_fn, name)
    n_traced = len(cache)
    assert n_traced == sum(len(s.dtypes) for s in family.stages[stage])
    assert (trace_cache.cache_dir() / f"{name}.pkl").exists()

    loaded = family._register(family.stages[stage], trace_fn, name)
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
        family._register(family.stages[0], fwd_only, name)
    assert len(cache) == sum(len(s.dtypes) for s in family.stages[0])
    assert any("unreadable pattern cache" in r.message and str(path) in r.message for r in caplog.records)
    assert trace_cache.load(name)  # rewritten with the traced patterns


def test_turned_off_it_neither_reads_nor_writes(cache, monkeypatch):
    monkeypatch.setenv(trace_cache.ENV_PATTERN_CACHE, "0")
    family, name = rotary.FAMILY, "rotary-0-off"
    family._register(family.stages[0], fwd_only, name)
    family._register(family.stages[0], fwd_only, name)
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
