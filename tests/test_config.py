"""Configuration: allowlist and opt-out three ways, clear errors, and the cache key."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hubcompile
from hubcompile import config
from small_modules import Block


def run_block(act="silu", **compile_kwargs):
    torch.manual_seed(0)
    block = Block(act=act)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        out = torch.compile(block, backend="hubkernels", **compile_kwargs)(x)
        torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-5)
    return {f: n for f, n in hubcompile.RECORDS[-1].replaced.items() if n}


def test_all_families_by_default(fresh):
    assert run_block() == {"rmsnorm": 2, "silu_gate": 1}
    torch._dynamo.reset()
    assert run_block(act="gelu_tanh") == {"rmsnorm": 2, "gelu_tanh_gate": 1}


@pytest.mark.parametrize("family", ["rmsnorm", "silu_gate", "gelu_tanh_gate"])
def test_opt_out_through_options(fresh, family):
    act = "gelu_tanh" if family == "gelu_tanh_gate" else "silu"
    replaced = run_block(act=act, options={"disable": [family]})
    assert family not in replaced and family not in hubcompile.RECORDS[-1].replaced, "a disabled family ran"
    everything = {"rmsnorm": 2, "silu_gate" if act == "silu" else "gelu_tanh_gate": 1}
    assert replaced == {f: n for f, n in everything.items() if f != family}
    assert hubcompile.RECORDS[-1].disabled == (family,)


def test_opt_out_through_python_api(fresh):
    hubcompile.configure(disable=["rmsnorm"])
    assert run_block() == {"silu_gate": 1}


def test_allowlist_through_environment(fresh, monkeypatch):
    monkeypatch.setenv("HUBCOMPILE_PATTERNS", "rmsnorm")
    assert run_block() == {"rmsnorm": 2}


def test_options_win_over_api_and_environment(fresh, monkeypatch):
    monkeypatch.setenv("HUBCOMPILE_DISABLE", "rmsnorm")
    hubcompile.configure(disable=["silu_gate"])
    assert run_block(options={"disable": []}) == {"rmsnorm": 2, "silu_gate": 1}


def test_inductor_options_pass_through(fresh):
    # Any torch._inductor.config name in options= goes to Inductor.
    assert run_block(options={"disable": "gelu_tanh_gate", "max_autotune": False})["rmsnorm"] == 2


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: config.resolve({"disable": ["rmsnrom"]}), r"unknown hubcompile pattern 'rmsnrom'.*valid names: rmsnorm, layer_norm, silu_gate, gelu_tanh_gate"),
        (lambda: config.resolve({"patterns": 3}), r"'patterns' must be a list.*got 3"),
        (lambda: config.split_options({"disabled": ["rmsnorm"]}), r"unknown option 'disabled'.*patterns, disable"),
        (lambda: hubcompile.configure(disable="rmsnorm,swiglu"), r"'swiglu'"),
    ],
)
def test_bad_values_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_environment_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HUBCOMPILE_DISABLE", "rms_norm")
    with pytest.raises(ValueError, match=r"'rms_norm' in 'HUBCOMPILE_DISABLE'"):
        config.resolve()


def test_bad_option_fails_the_compile(fresh):
    with pytest.raises(Exception, match="unknown option 'nope'"):
        run_block(options={"nope": 1})


def test_fingerprint_depends_on_settings():
    a = config.resolve({"disable": ["rmsnorm"]}).fingerprint()
    b = config.resolve({}).fingerprint()
    assert a != b
    assert a == config.resolve({"disable": "rmsnorm"}).fingerprint()


_CACHE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from torch._dynamo.utils import counters
    import hubcompile
    from small_modules import Block
    torch.manual_seed(0)
    block, x = Block(), torch.randn(2, 5, 16)
    with torch.no_grad():
        out = torch.compile(block, backend="hubkernels")(x)
    print(json.dumps({{
        "pass_ran": bool(hubcompile.RECORDS) and not hubcompile.RECORDS[-1].from_cache,
        "from_cache": bool(hubcompile.RECORDS) and hubcompile.RECORDS[-1].from_cache,
        "replaced": hubcompile.RECORDS[-1].replaced if hubcompile.RECORDS else None,
        "hits": counters["inductor"]["fxgraph_cache_hit"],
        "out": out.flatten()[:8].tolist(),
    }}))
    """
)


def test_config_change_misses_inductor_cache(tmp_path):
    """Two processes sharing an Inductor cache: same settings hit it, changed settings
    compile afresh (the pass's uuid hashes the config). On a hit the passes do not run,
    and the record of what they did is read back from hubcompile's cache."""
    script = tmp_path / "run.py"
    script.write_text(_CACHE_SCRIPT.format(tests=os.path.dirname(__file__)))

    def run(**env):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("HUBCOMPILE_")}
        full_env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"), HUBCOMPILE_CACHE_DIR=str(tmp_path / "hub"),
                        TORCHINDUCTOR_FX_GRAPH_CACHE="1", TORCHINDUCTOR_AUTOGRAD_CACHE="1", **env)
        done = subprocess.run([sys.executable, str(script)], env=full_env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    assert first["pass_ran"] and first["replaced"]["rmsnorm"] == 2 and first["hits"] == 0
    second = run()
    assert not second["pass_ran"] and second["hits"] >= 1, "same settings should hit the cache"
    assert second["out"] == first["out"]
    assert second["from_cache"] and second["replaced"] == first["replaced"]
    third = run(HUBCOMPILE_DISABLE="rmsnorm")
    assert third["pass_ran"] and third["hits"] == 0, "changed settings reused cached code"
    assert {f: n for f, n in third["replaced"].items() if n} == {"silu_gate": 1}


def test_cache_key_follows_package_version_and_local_kernel_bytes(tmp_path, monkeypatch):
    """Inductor's caches key on the pass's uuid: a new hubcompile version or an edited
    local kernel repo must give a new key (so the cached code is not reused)."""
    from hubcompile.passes.pipeline import HubcompilePass

    repo = tmp_path / "rmsnorm" / "build" / "torch-cpu"
    repo.mkdir(parents=True)
    (repo / "__init__.py").write_text("def rms_norm_forward(*a): ...\n")
    cfg = config.resolve({"kernels": {"rmsnorm": f"local:{repo}"}})
    first = HubcompilePass(cfg).uuid()
    assert HubcompilePass(cfg).uuid() == first
    (repo / "__init__.py").write_text("def rms_norm_forward(*a): return None\n")
    edited = HubcompilePass(cfg).uuid()
    assert edited != first
    monkeypatch.setattr(hubcompile, "__version__", "999.0")
    assert HubcompilePass(cfg).uuid() != edited


_GUARD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from torch._dynamo.utils import counters
    import hubcompile
    from hubcompile.guards import performance as perf_guard
    from small_modules import LlamaRMSNorm

    class Cache(torch.nn.Module):  # a decode step's shape: a norm, and a cache written in place
        def __init__(self):
            super().__init__()
            self.norm = LlamaRMSNorm(24)
            self.register_buffer("cache", torch.zeros(2, 4, 24))

        def forward(self, x, pos):
            h = self.norm(x)
            self.cache.index_copy_(1, pos, h)
            return h + self.cache.sum(1, keepdim=True)

    torch.manual_seed(0)
    run = torch.compile(Cache(), backend="hubkernels", options={{"perf_guard": "on"}})
    with torch.no_grad():
        run(torch.randn(2, 1, 24), torch.tensor([0]))
    print(json.dumps({{"hits": counters["inductor"]["fxgraph_cache_hit"],
                       "decisions": [[d.source, d.keep] for d in perf_guard.DECISIONS]}}))
    """
)


def test_the_perf_guard_decides_a_graph_that_inductors_cache_answers(tmp_path):
    """A decode-like graph whose only replacements are made by the joint passes: in a
    second process Inductor's cache answers both variants, and the guard (its decision
    file gone) still finds the family to judge, from the records on disk."""
    script = tmp_path / "run.py"
    script.write_text(_GUARD_SCRIPT.format(tests=os.path.dirname(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBCOMPILE_")}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"), HUBCOMPILE_CACHE_DIR=str(tmp_path / "hub"),
               TORCHINDUCTOR_FX_GRAPH_CACHE="1", TORCHINDUCTOR_AUTOGRAD_CACHE="1")

    def run():
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    assert first["decisions"] and first["decisions"][0][0] == "measured", first
    (tmp_path / "hub" / "perf_guard.json").unlink()
    second = run()
    assert second["hits"] >= 1, second
    assert second["decisions"] and second["decisions"][0][0] == "measured", second
