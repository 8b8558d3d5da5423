"""Kernel resolution through each route (bundled repo, LOCAL_KERNELS stand-ins under
kernels-community ids, a filled Hub cache with HF_HUB_OFFLINE=1, a lockfile) and each
failure (missing repo, missing variant, import error, missing function, untrusted org):
the chosen kernel or the fallback, and its message."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hubcompile
from hubcompile.lowering import kernels, reference
from hubcompile.lowering.device import DeviceInfo, detect
from small_modules import Block

STANDINS = Path(__file__).parent / "standins"
CPU = DeviceInfo("cpu")
ops = torch.ops.hubcompile


@pytest.fixture(autouse=True)
def clean_kernel_cache(monkeypatch):
    monkeypatch.delenv("LOCAL_KERNELS", raising=False)
    kernels.clear_cache()
    yield
    kernels.clear_cache()


@pytest.fixture
def community(monkeypatch):
    """The stand-in repos answer for the kernels-community ids, as LOCAL_KERNELS allows."""
    ids = {"activation": "activation", "rotary": "rotary", "causal-conv1d": "causal-conv1d"}
    monkeypatch.setenv("LOCAL_KERNELS", ":".join(f"kernels-community/{k}={STANDINS / v}" for k, v in ids.items()))


def test_device_detection_on_cpu():
    assert detect("cpu") == DeviceInfo("cpu")
    assert str(DeviceInfo("cuda", (9, 0))) == "cuda sm_90"


def test_bundled_is_the_default():
    assert kernels.choose("rms_norm", CPU, torch.bfloat16).spec == "bundled:rmsnorm"
    assert kernels.choose("gated_activation_fused_backward", CPU, torch.float32).spec == "bundled:activation"
    assert kernels.choose("rms_norm", DeviceInfo("mps"), torch.float32).spec == "reference"


def test_community_activation_through_local_kernels(community):
    overrides = {"activation": ("hub:kernels-community/activation@1",)}
    choice = kernels.choose("gated_activation_fused", CPU, torch.float32, overrides, activation="gelu_tanh")
    assert choice == kernels.Choice("hub:kernels-community/activation@1")
    x = torch.randn(3, 5, 18)
    out = ops.gated_activation_fused(x, "gelu_tanh", choice.spec, "reference")
    torch.testing.assert_close(out, reference.gated_activation_fused(x, "gelu_tanh"))
    # The community repo is forward-only: the backward moves on to the next candidate.
    back = kernels.choose("gated_activation_fused_backward", CPU, torch.float32,
                          {"activation": ("hub:kernels-community/activation@1", "bundled:activation")})
    assert back.spec == "bundled:activation"
    assert "has no gated_act_fused_backward" in back.reasons[0]


def test_community_rotary_adapter(community):
    adapter = kernels.load("hub:kernels-community/rotary@1", CPU)
    assert adapter.unsupported("rotary_forward", CPU, torch.float32, interleaved=True) == \
        "apply_rotary has no interleaved form"
    q = torch.randn(2, 3, 7, 16)  # [B, H, S, D], rotary dim 8 (partial)
    freqs = torch.randn(2, 7, 4)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)
    out = adapter.rotary_forward(q, cos, sin, False)
    q_rot, q_pass = q[..., :8], q[..., 8:]
    rotated = torch.cat((-q_rot[..., 4:], q_rot[..., :4]), dim=-1)
    torch.testing.assert_close(out, torch.cat((q_rot * cos + rotated * sin, q_pass), dim=-1))


@pytest.mark.parametrize("activation", [None, "silu"])
def test_community_causal_conv1d_adapter(community, activation):
    adapter = kernels.load("hub:kernels-community/causal-conv1d@1", CPU)
    x = torch.randn(2, 6, 11, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    ref = F.conv1d(x, w.unsqueeze(1), b, padding=3, groups=6)[..., :11]
    ref = F.silu(ref) if activation else ref
    torch.testing.assert_close(adapter.causal_conv1d_forward(x, w, b, activation), ref)
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(ref, (x, w, b), dout)
    for got, want in zip(adapter.causal_conv1d_backward(dout, x, w, b, activation), grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("local:{standins}/broken-import", "ImportError: undefined symbol"),
        ("local:{standins}/no-functions", "the repo has no function rms_norm_forward"),
        ("local:{standins}/cuda-only", "variant"),
        ("hub:evil-org/rmsnorm@1", "org 'evil-org' is not trusted"),
    ],
)
def test_failures_fall_back_with_the_reason(spec, reason, caplog):
    spec = spec.format(standins=STANDINS)
    with caplog.at_level(logging.WARNING, logger="hubcompile"):
        choice = kernels.choose("rms_norm", CPU, torch.float32, {"rmsnorm": (spec, "bundled:rmsnorm")})
        kernels.choose("rms_norm", CPU, torch.float32, {"rmsnorm": (spec, "bundled:rmsnorm")})
    assert choice.spec == "bundled:rmsnorm"
    assert reason in choice.reasons[0]
    warnings = [r.getMessage() for r in caplog.records if spec in r.getMessage()]
    assert len(warnings) == 1, "one warning per repo and reason"
    assert reason in warnings[0]


def test_nothing_usable_keeps_the_original_subgraph(fresh, caplog):
    """A compile whose only kernel cannot load still compiles: the norms stay with
    Inductor, the record says why, and results equal eager."""
    hubcompile.configure(kernels={"rmsnorm": f"local:{STANDINS / 'broken-import'}"})
    torch.manual_seed(0)
    block, x = Block(), torch.randn(2, 5, 16)
    with caplog.at_level(logging.WARNING, logger="hubcompile"), torch.no_grad():
        out = torch.compile(block, backend="hubkernels")(x)
    torch.testing.assert_close(out, block(x))
    (record,) = fresh
    assert {f: n for f, n in record.replaced.items() if n} == {"silu_gate": 1}
    # norm2 is refused as add+norm, then as a plain norm; norm1 as a plain norm.
    assert sorted(s for s, _ in record.refused["rmsnorm"]) == [
        "add_llama_pow_w_first", "llama_pow_w_first", "llama_pow_w_first"]
    assert all("no usable kernel for cpu" in reason and "ImportError" in reason
               for _, reason in record.refused["rmsnorm"])
    assert any("broken-import" in r.getMessage() for r in caplog.records)


def test_kernel_raising_at_call_time_falls_back_for_the_rest_of_the_run(monkeypatch):
    adapter = kernels.load("bundled:rmsnorm", CPU)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(adapter.module, "rms_norm_forward", broken)
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.warns(UserWarning, match="illegal memory access.*rest of this process"):
        y, _ = ops.rms_norm(x, w, 1e-6, 0.0, True, None, "bundled:rmsnorm", "reference")
    torch.testing.assert_close(y, reference.rms_norm(x, w, 1e-6, 0.0, True)[0])
    ops.rms_norm(x, w, 1e-6, 0.0, True, None, "bundled:rmsnorm", "reference")
    assert len(calls) == 1, "a broken kernel is not called again"


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"rmsnorm": "hub:kernels-community/x"}, "must be pinned"),
        ({"rmsnorm": "bundled:layernorm"}, "unknown bundled repo 'layernorm'"),
        ({"layernorm": "reference"}, "unknown kernel group 'layernorm'"),
        ({"rmsnorm": "hub:kernels-community/x@1#cuda"}, "unknown adapter 'cuda'"),
        ("bundled:rmsnorm", "must be a dict"),
    ],
)
def test_bad_kernel_config_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        hubcompile.config.resolve({"kernels": bad})


def _fill_cache(cache: Path, repo_id: str, source: Path, version: int = 1) -> str:
    """A Hub cache holding ``source`` as ``repo_id`` at branch v<version>, the way
    huggingface_hub lays out a downloaded kernel repo."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"kernels--{repo_id.replace('/', '--')}"
    shutil.copytree(source, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / f"v{version}").write_text(commit)
    return commit


_OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from hubcompile.lowering import kernels
    from hubcompile.lowering.device import DeviceInfo
    cpu = DeviceInfo("cpu")
    result = {}
    for spec in sys.argv[1:]:
        choice = kernels.choose("gated_activation_fused", cpu, torch.float32, {"activation": (spec,)},
                                activation="silu")
        result[spec] = [choice.spec, list(choice.reasons)]
    lock = kernels.write_lockfile(sys.argv[0] + ".lock", {"kernels-community/activation": 1})
    choice = kernels.choose("gated_activation_fused", cpu, torch.float32,
                            {"activation": (f"locked:kernels-community/activation@{lock}",)}, activation="silu")
    x = torch.randn(3, 10)
    out = torch.ops.hubcompile.gated_activation_fused(x, "silu", choice.spec, "reference")
    result["locked"] = [choice.spec is not None, torch.allclose(out, torch.nn.functional.silu(x[:, :5]) * x[:, 5:]),
                        json.loads(open(lock).read())[0]["lock"]["commit"]]
    print(json.dumps(result))
    """
)


def test_filled_cache_offline_and_lockfile(tmp_path):
    cache = tmp_path / "hub"
    commit = _fill_cache(cache, "kernels-community/activation", STANDINS / "activation")
    script = tmp_path / "offline.py"
    script.write_text(_OFFLINE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_KERNELS"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), KERNELS_CACHE=str(cache))
    specs = ["hub:kernels-community/activation@1", "hub:kernels-community/missing@1"]
    done = subprocess.run([sys.executable, str(script), *specs], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result[specs[0]] == [specs[0], []]
    missing_spec, missing_reasons = result[specs[1]]
    assert missing_spec is None and "missing" in missing_reasons[0]
    assert result["locked"] == [True, True, commit]


@pytest.mark.parametrize("group", list(kernels.GROUPS))
def test_every_bundled_repo_loads_and_serves_its_ops(group):
    """A broken bundled repo would only show as a silent fallback to the reference."""
    spec = f"bundled:{kernels.GROUPS[group]}"
    adapter = kernels.load(spec, CPU)
    for op, (op_group, fn) in kernels.OPS.items():
        if op_group == group:
            assert adapter.unsupported(fn, CPU, torch.float32) is None, f"{spec} lacks {fn} for {op}"
