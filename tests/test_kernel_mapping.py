"""Kernel mappings in the vocabulary users already write (transformers' KernelConfig,
kernels' LayerRepository mappings) given to backend="hubkernels": each form reaches the
mapped Hub layer for every match, on a transformers model and on user-written modules;
modes and devices pick entries as kernelize picks them; a layer without a backward is
kept out of training; malformed mappings are clear errors; and against kernels.kernelize
with the same mapping, both replace the same RMSNorms of a transformers model, while only
hubcompile reaches a user-written one.

The Hub layers are stand-in repos (tests/standins/{liger-kernels,activation-layers,
rotary-layers}) that follow the layer conventions (no __init__, state read from the
module, has_backward / can_torch_compile) and load under the kernels-community ids
through LOCAL_KERNELS. Each counts its calls (``layers.CALLS``), and the RMSNorm layer
records which weights it was called with (``layers.WEIGHTS``).
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from kernels import (
    CUDAProperties,
    Device,
    LayerRepository,
    LocalLayerRepository,
    LockedLayerRepository,
    Mode,
    kernelize,
    use_kernel_mapping,
)
from torch import nn

import hubcompile
import tiny_models
from hubcompile.explain import GraphReport, Report
from hubcompile.lowering import kernels, mapping
from hubcompile.lowering.device import DeviceInfo
from small_modules import Block, LlamaRMSNorm

STANDINS = Path(__file__).parent / "standins"
CPU = DeviceInfo("cpu")
LIGER = "hub:kernels-community/liger-kernels@3:LigerRMSNorm#RMSNorm"
SILU = "hub:kernels-community/activation@1:Silu#SiLU"
# Only the families under test are registered: registration is most of a first compile.
PATTERNS = ["rmsnorm", "silu_gate", "gelu_tanh_gate", "rotary", "causal_conv1d"]


@pytest.fixture(autouse=True)
def community(monkeypatch, fresh):
    """The stand-in layer repos answer for the kernels-community ids."""
    ids = {"liger-kernels": "liger-kernels", "activation": "activation-layers", "rotary": "rotary-layers",
           "flash-attn2": "flash-attn"}
    monkeypatch.setenv("LOCAL_KERNELS", ":".join(f"kernels-community/{k}={STANDINS / v}" for k, v in ids.items()))
    kernels.clear_cache()
    yield fresh
    kernels.clear_cache()


def layers_of(spec):
    """The stand-in's layers module behind a spec: the one the ops call."""
    return kernels.load(spec, CPU).module.layers


def reset(*specs):
    for spec in specs:
        layers = layers_of(spec)
        layers.CALLS.clear()
        getattr(layers, "WEIGHTS", []).clear()


def compile_run(module, *args, mapping_value, train=False, labels=None, **options):
    """Compile with the mapping and run once (the compile); returns (compiled, output)."""
    compiled = torch.compile(module, backend="hubkernels",
                             options={"kernel_mapping": mapping_value, "patterns": PATTERNS, **options})
    with torch.set_grad_enabled(train):
        return compiled, compiled(*args) if labels is None else compiled(*args, labels=labels)


def replacements(records):
    """[(family, kernel, backward kernel)] over all graphs."""
    return [(r.family, r.kernel, r.backward_kernel) for rec in records for reps in rec.replacements.values()
            for r in reps]


def assert_grads_match_eager(block, x, xt):
    """The gradients a compiled run left on ``block`` and ``xt`` (x, requiring grad) equal
    eager's for the same loss, out.square().sum()."""
    grads = [p.grad.clone() for p in block.parameters()] + [xt.grad.clone()]
    block.zero_grad()
    xe = x.clone().requires_grad_(True)
    block(xe).square().sum().backward()
    for got_grad, want in zip(grads, [p.grad for p in block.parameters()] + [xe.grad]):
        torch.testing.assert_close(got_grad, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the mapping forms


def _locked(tmp_path):
    from kernels._rust import KernelDependency, KernelLock, KernelLocks, KernelVersion

    dep = KernelDependency(repo_id="kernels-community/liger-kernels", version=KernelVersion.Version(3))
    path = tmp_path / "kernels.lock"
    path.write_text(KernelLocks(locks={dep: KernelLock(commit="0123456789abcdef0123456789abcdef01234567")}).to_json())
    return path


def test_each_form_becomes_layer_specs(tmp_path):
    """Every form users write, parsed to the spec each entry becomes (device, mode)."""
    local = STANDINS / "liger-kernels"
    lock = _locked(tmp_path)
    forms = {
        "KernelConfig string": (transformers.KernelConfig(kernel_mapping={
            "RMSNorm": "kernels-community/liger-kernels:LigerRMSNorm"}),
            [("*", "fallback", "hub:kernels-community/liger-kernels@1:LigerRMSNorm#RMSNorm")]),
        "KernelConfig tuple": (transformers.KernelConfig(kernel_mapping={
            "RMSNorm": ("kernels-community/liger-kernels:LigerRMSNorm", {"version": 3})}),
            [("*", "fallback", LIGER)]),
        "dict with revision, per device": ({"RMSNorm": {
            "cuda": ("kernels-community/liger-kernels:LigerRMSNorm", {"revision": "main"}),
            "cpu": "kernels-community/liger-kernels:LigerRMSNorm"}},
            [("cuda", "fallback", "hub:kernels-community/liger-kernels@rev=main:LigerRMSNorm#RMSNorm"),
             ("cpu", "fallback", "hub:kernels-community/liger-kernels@1:LigerRMSNorm#RMSNorm")]),
        "KernelConfig local": (transformers.KernelConfig(kernel_mapping={"RMSNorm": f"{local}:LigerRMSNorm"},
                                                         use_local_kernel=True),
                               [("*", "fallback", f"local:{local}:LigerRMSNorm#RMSNorm")]),
        "kernels LayerRepository per Mode": ({"RMSNorm": {"cpu": {
            Mode.INFERENCE | Mode.TORCH_COMPILE: LayerRepository(
                "kernels-community/liger-kernels", layer_name="LigerRMSNorm", version=3),
            Mode.TRAINING: LayerRepository(
                "kernels-community/liger-kernels", layer_name="RMSNormInferenceOnly", revision="v3")}}},
            [("cpu", "inference|torch_compile", LIGER),
             ("cpu", "training", "hub:kernels-community/liger-kernels@rev=v3:RMSNormInferenceOnly#RMSNorm")]),
        "kernels LocalLayerRepository": ({"SiLU": {"cpu": LocalLayerRepository(
            STANDINS / "activation-layers", layer_name="Silu")}},
            [("cpu", "fallback", f"local:{STANDINS / 'activation-layers'}:Silu#SiLU")]),
        "kernels LockedLayerRepository": ({"RMSNorm": {Device("cuda", CUDAProperties(80, 90)): LockedLayerRepository(
            "kernels-community/liger-kernels", lockfile=lock, layer_name="LigerRMSNorm")}},
            [("cuda", "fallback", f"locked:kernels-community/liger-kernels@{lock}:LigerRMSNorm#RMSNorm")]),
    }
    for form, (value, expected) in forms.items():
        cfg = hubcompile.config.resolve({"kernel_mapping": value})
        got = [(e.device, e.mode, e.spec) for e in cfg.kernel_mapping]
        assert got == expected, form
        for _, _, spec in got:
            assert kernels.KernelSpec.parse(spec).layer is not None
    # JSON has no tuples (hubcompile diff --options): a two-item list is the tuple form
    assert hubcompile.config.resolve({"kernel_mapping": json.loads(json.dumps(
        {"RMSNorm": ["kernels-community/liger-kernels:LigerRMSNorm", {"version": 3}]}))}).kernel_mapping[0].spec == LIGER
    # trust_remote_code lets that repo (and only it) load from an untrusted org
    cfg = hubcompile.config.resolve({"kernel_mapping": {"RMSNorm": ("my-org/norms:Fast", {
        "version": 2, "trust_remote_code": True})}})
    assert "my-org/norms" in cfg.trusted_orgs and "my-org" not in cfg.trusted_orgs
    # the mapping feeds the cache key
    assert hubcompile.config.resolve({"kernel_mapping": forms["KernelConfig tuple"][0]}).fingerprint() != \
        hubcompile.config.resolve({"kernel_mapping": forms["KernelConfig string"][0]}).fingerprint()


@pytest.mark.parametrize("training", [False, True])
def test_mode_order_follows_kernelize(training):
    """For every subset of modes a mapping may register, the first entry hubcompile tries
    is the one kernelize(mode=X | TORCH_COMPILE) selects, where kernelize selects one;
    then come the entries of the eager mode X, then FALLBACK."""
    from itertools import combinations

    from kernels.layer.repos import _select_repository

    modes = [Mode.FALLBACK, Mode.INFERENCE, Mode.TRAINING, Mode.INFERENCE | Mode.TORCH_COMPILE,
             Mode.TRAINING | Mode.TORCH_COMPILE]
    wanted = (Mode.TRAINING if training else Mode.INFERENCE)
    for n in range(1, len(modes) + 1):
        for subset in combinations(modes, n):
            repos = {m: LayerRepository("kernels-community/liger-kernels", layer_name=f"L{i}", version=1)
                     for i, m in enumerate(subset)}
            entries = mapping.parse({"RMSNorm": {"cpu": repos}})
            got = mapping.candidates(entries, "rmsnorm", CPU, training)
            picked = _select_repository(repos, mode=wanted | Mode.TORCH_COMPILE)
            if picked is not None and picked[1] != Mode.FALLBACK:
                assert got[0].endswith(f":{picked[0].layer_name}#RMSNorm"), (subset, got)
            eager = _select_repository(repos, mode=wanted)
            if eager is not None:
                assert any(s.endswith(f":{eager[0].layer_name}#RMSNorm") for s in got), (subset, got)
            if Mode.FALLBACK in subset:
                assert got[-1].endswith(f":L{subset.index(Mode.FALLBACK)}#RMSNorm")


def test_devices_pick_as_kernels_picks():
    value = {"RMSNorm": {
        Device("cuda"): "kernels-community/liger-kernels:Any",
        Device("cuda", CUDAProperties(min_capability=80, max_capability=89)): "kernels-community/liger-kernels:Ampere",
        "rocm": "kernels-community/liger-kernels:Rocm"}}
    entries = mapping.parse(value)
    pick = lambda dev: [s.split(":")[-1] for s in mapping.candidates(entries, "rmsnorm", dev, False)]  # noqa: E731
    assert pick(DeviceInfo("cuda", (8, 6))) == ["Ampere#RMSNorm"]
    assert pick(DeviceInfo("cuda", (9, 0))) == ["Any#RMSNorm"]
    assert pick(DeviceInfo("rocm")) == ["Rocm#RMSNorm"]
    assert pick(CPU) == []  # no entry for cpu: the group's own candidates
    assert kernels.choose("rms_norm", CPU, torch.float32, hubcompile.config.resolve(
        {"kernel_mapping": value}).kernel_overrides()).spec == "bundled:rmsnorm"


@pytest.mark.parametrize("value, message", [
    ({"RMSNorm": "kernels-community/liger-kernels"}, "malformed repository for 'RMSNorm'.*'org/repo:Layer'"),
    ({"RMSNorm": ("kernels-community/liger-kernels:LigerRMSNorm", {"version": 1, "revision": "main"})},
     "exactly one of version and revision"),
    ({"RMSNorm": ("kernels-community/liger-kernels:LigerRMSNorm", {"versoin": 1})},
     "unknown metadata key.*'versoin'.*valid keys: version, revision, trust_remote_code"),
    ({"RMSNorm": ("kernels-community/liger-kernels:LigerRMSNorm", {"version": 1, "trust_remote_code": "yes"})},
     "trust_remote_code.*'yes'"),
    ({"RMSNorm": {"gpu": "kernels-community/liger-kernels:LigerRMSNorm"}}, "unknown device.*'gpu'.*valid devices: cuda"),
    ({"RMSNorm": {"cuda": {Mode.TORCH_COMPILE: LayerRepository("kernels-community/liger-kernels",
                                                                layer_name="LigerRMSNorm", version=3)}}},
     "neither inference nor training.*valid modes"),
    ({"RMSNorm": {"cuda": {"inference": "kernels-community/liger-kernels:LigerRMSNorm"}}},
     "unknown device.*'inference'|unknown mode"),
    ({"RMSNorm": 3}, "unknown repository form for 'RMSNorm': 3; valid forms"),
    ({"attn_implementation": "flash-attn2"}, "malformed repository for 'attn_implementation'.*'org/repo"),
    ({"attn_implementation": "kernels-community/flash-attn2:flash_attn_varlen_func"},
     "'flash_attn_varlen_func'.*flash_attn_func"),
    (["RMSNorm"], "must be a transformers KernelConfig or a dict"),
    ({"SwiGLUMLP": "kernels-community/liger-kernels"}, "malformed repository for 'SwiGLUMLP'"),  # unserved, malformed
    ({"MLP": 3}, "unknown repository form for 'MLP': 3; valid forms"),
])
def test_malformed_mapping_is_a_clear_error(value, message):
    with pytest.raises(ValueError, match=message):
        hubcompile.config.resolve({"kernel_mapping": value})
    with pytest.raises(ValueError, match=message):
        hubcompile.configure(kernel_mapping=value)


def test_a_layer_spec_names_its_layer():
    with pytest.raises(ValueError, match="must say which layer it stands for.*valid layer names: RMSNorm"):
        kernels.KernelSpec.parse("hub:kernels-community/liger-kernels@3:LigerRMSNorm")
    with pytest.raises(ValueError, match="malformed layer spec.*pinned"):
        kernels.KernelSpec.parse("hub:kernels-community/liger-kernels:LigerRMSNorm#RMSNorm")
    choice = kernels.choose("rms_norm", CPU, torch.float32, {"rmsnorm": (
        "hub:kernels-community/liger-kernels@3:Missing#RMSNorm", "bundled:rmsnorm")})
    assert choice.spec == "bundled:rmsnorm"
    assert "has no layer Missing (its layers: LigerCausalConv1d, LigerRMSNorm" in choice.reasons[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_offset, cast_before_scale", [(0.0, True), (1.0, False)])
def test_rmsnorm_layer_serves_llama_and_gemma_forms(dtype, weight_offset, cast_before_scale):
    """A Llama-form layer computes w * norm(x): the Gemma form's (1 + w) is folded into the
    stand-in's weight; the residual add, rstd and both gradients come out as the op's
    contract says (compared with the eager reference, in float64 for the tolerance)."""
    from hubcompile.lowering import reference

    adapter = kernels.load(LIGER, CPU)
    torch.manual_seed(0)
    x, res, w = torch.randn(3, 5, 32, dtype=dtype), torch.randn(3, 5, 32, dtype=dtype), torch.randn(32, dtype=dtype)
    y, rstd, h = adapter.rms_norm_forward(x, w, 1e-5, weight_offset, cast_before_scale, residual=res)
    want_y, want_h, want_rstd = reference.add_rms_norm(x, res, w, 1e-5, weight_offset, cast_before_scale)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    assert y.dtype == want_y.dtype and h.dtype == want_h.dtype
    torch.testing.assert_close(y, want_y, **tol)
    torch.testing.assert_close(h, want_h)
    torch.testing.assert_close(rstd, want_rstd)
    dy = torch.randn_like(y)
    dh, dw = adapter.rms_norm_backward(dy, h, w, rstd, weight_offset, cast_before_scale, eps=1e-5)
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    want = torch.autograd.grad(reference.rms_norm(hh, ww, 1e-5, weight_offset, cast_before_scale)[0], (hh, ww), dy)
    assert dh.dtype == h.dtype and dw.dtype == w.dtype
    torch.testing.assert_close(dh, want[0], **tol)
    torch.testing.assert_close(dw, want[1], **(dict(rtol=2e-2, atol=1e-1) if dtype == torch.bfloat16 else tol))


# ------------------------------------------- user-written modules, every mapping form


def _forms():
    liger, acts = STANDINS / "liger-kernels", STANDINS / "activation-layers"
    return {
        "KernelConfig": transformers.KernelConfig(kernel_mapping={
            "RMSNorm": ("kernels-community/liger-kernels:LigerRMSNorm", {"version": 3}),
            "SiLU": "kernels-community/activation:Silu"}),
        "KernelConfig dict per device": {
            "RMSNorm": {"cuda": "kernels-community/other:Other", "cpu": "kernels-community/liger-kernels:LigerRMSNorm"},
            "SiLU": {"cpu": ("kernels-community/activation:Silu", {"revision": "main"})}},
        "KernelConfig local": transformers.KernelConfig(kernel_mapping={
            "RMSNorm": f"{liger}:LigerRMSNorm", "SiLU": f"{acts}:Silu"}, use_local_kernel=True),
        "kernels LayerRepository per Mode": {
            "RMSNorm": {"cpu": {Mode.INFERENCE: LayerRepository(
                "kernels-community/liger-kernels", layer_name="LigerRMSNorm", version=3)}},
            "SiLU": {"cpu": {Mode.INFERENCE | Mode.TORCH_COMPILE: LayerRepository(
                "kernels-community/activation", layer_name="Silu", version=1)}}},
        "kernels LocalLayerRepository": {
            "RMSNorm": {"cpu": LocalLayerRepository(liger, layer_name="LigerRMSNorm")},
            "SiLU": {"cpu": LocalLayerRepository(acts, layer_name="Silu")}},
    }


@pytest.mark.parametrize("form", list(_forms()))
def test_user_module_gets_the_mapped_layer_for_every_match(form, community):
    """A user-written block (two RMSNorms, one fused with the residual add, and a SwiGLU
    MLP): each match runs the mapped layer, with the block's own weights."""
    value = _forms()[form]
    torch.manual_seed(0)
    block, x = Block(), torch.randn(2, 5, 16)
    compiled, _ = compile_run(block, x, mapping_value=value)
    specs = {family: kernel for family, kernel, _ in replacements(community)}
    assert [f for f, _, _ in replacements(community)].count("rmsnorm") == 2
    assert [f for f, _, _ in replacements(community)].count("silu_gate") == 1
    norm, act = specs["rmsnorm"], specs["silu_gate"]
    assert ":LigerRMSNorm#RMSNorm" in norm and ":Silu#SiLU" in act
    reset(norm, act)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x))
    assert layers_of(norm).CALLS["LigerRMSNorm"] == 2 and layers_of(act).CALLS["Silu"] == 1
    assert set(layers_of(norm).WEIGHTS) == {block.norm1.weight.data_ptr(), block.norm2.weight.data_ptr()}
    if form == "KernelConfig":
        text = Report([GraphReport(0, community[-1])]).text(diff=False)
        assert "hub layers (from a kernel mapping):" in text
        assert "LigerRMSNorm  RMSNorm     kernels-community/liger-kernels@3" in text
        assert "Silu          SiLU        kernels-community/activation@1" in text
        data = Report([GraphReport(0, community[-1])]).to_json()
        reps = json.loads(data)["graphs"][0]["replacements"]
        assert {"layer": "LigerRMSNorm", "repo": "kernels-community/liger-kernels@3", "stands_for": "RMSNorm"} in \
            [r.get("layer") for r in reps]


def test_gelu_tanh_and_causal_conv1d_layers(community):
    """The GELU-tanh names and causal_conv1d_fn reach their families: a GeGLU block and a
    Mamba-style causal conv, written by hand."""
    from test_causal_conv1d import MambaConv

    torch.manual_seed(0)
    block, x = Block(act="gelu_tanh"), torch.randn(2, 5, 16)
    conv, xc = MambaConv(), torch.randn(2, 12, 9)
    value = {"NewGELU": "kernels-community/activation:GeluTanh",
             "causal_conv1d_fn": ("kernels-community/liger-kernels:LigerCausalConv1d", {"version": 3})}
    compiled_block, _ = compile_run(block, x, mapping_value=value)
    compiled_conv, _ = compile_run(conv, xc, mapping_value=value)
    got = {f: k for f, k, _ in replacements(community)}
    assert got["gelu_tanh_gate"] == "hub:kernels-community/activation@1:GeluTanh#NewGELU"
    assert got["causal_conv1d"] == "hub:kernels-community/liger-kernels@3:LigerCausalConv1d#causal_conv1d_fn"
    reset(got["gelu_tanh_gate"], got["causal_conv1d"])
    with torch.no_grad():
        torch.testing.assert_close(compiled_block(x), block(x))
        torch.testing.assert_close(compiled_conv(xc), conv(xc))
    assert layers_of(got["gelu_tanh_gate"]).CALLS["GeluTanh"] == 1
    assert layers_of(got["causal_conv1d"]).CALLS["LigerCausalConv1d"] == 1
    # the SiLU layer is not offered to a GELU-tanh gate (nor the GELU one to a SiLU gate)
    overrides = hubcompile.config.resolve({"kernel_mapping": {**value, "SiLU": "kernels-community/activation:Silu"}}
                                          ).kernel_overrides()
    assert overrides.mapped("activation", CPU, False, "silu") == (SILU,)


def test_training_uses_layers_with_a_backward_only(community):
    """In a training graph the RMSNorm layer (has_backward) runs forward and backward; the
    SiluAndMul layer (has_backward=False) is passed over for the bundled kernel, with the
    reason logged, as kernelize keeps it out of training. Gradients match eager."""
    value = {"RMSNorm": {"cpu": LayerRepository("kernels-community/liger-kernels", layer_name="LigerRMSNorm",
                                                version=3)},
             "SiluAndMul": {"cpu": LayerRepository("kernels-community/activation", layer_name="SiluAndMul",
                                                   version=1)}}
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(2, 5, 16)
    # inference: SiluAndMul serves the gate
    compile_run(block, x, mapping_value=value)
    assert ("silu_gate", "hub:kernels-community/activation@1:SiluAndMul#SiluAndMul",
            "bundled:activation") in replacements(community)
    torch._dynamo.reset()
    community.clear()
    reset(LIGER)
    xt = x.clone().requires_grad_(True)
    _, out = compile_run(block, xt, mapping_value=value, train=True)
    out.square().sum().backward()
    got = replacements(community)
    assert ("rmsnorm", LIGER, LIGER) in got
    assert ("silu_gate", "bundled:activation", "bundled:activation") in got
    assert layers_of(LIGER).CALLS["LigerRMSNorm.backward"] >= 1
    assert_grads_match_eager(block, x, xt)
    reason = kernels.choose("gated_activation", CPU, torch.float32,
                            hubcompile.config.resolve({"kernel_mapping": value}).kernel_overrides(),
                            activation="silu", training=True).reasons
    assert reason == ("hub:kernels-community/activation@1:SiluAndMul#SiluAndMul: layer SiluAndMul has no backward "
                      "(has_backward=False): used in inference only",)


def test_layer_whose_backward_writes_over_its_gradient_input(community):
    """liger's layers write the input gradient over the output gradient (in_place=True).
    The op's gradient input may have other readers in the graph and its outputs may not
    alias its inputs: the layer gets its own copy. The guard passes it and the gradients
    match eager."""
    spec = "hub:kernels-community/liger-kernels@3:LigerRMSNormInPlace#RMSNorm"
    value = {"RMSNorm": {"cpu": LayerRepository("kernels-community/liger-kernels", layer_name="LigerRMSNormInPlace",
                                                version=3)}}
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(2, 5, 16)
    reset(spec)
    xt = x.clone().requires_grad_(True)
    _, out = compile_run(block, xt, mapping_value=value, train=True)
    out.square().sum().backward()
    assert ("rmsnorm", spec, spec) in replacements(community)
    assert layers_of(spec).CALLS["LigerRMSNormInPlace.backward"] >= 1
    assert_grads_match_eager(block, x, xt)


# --------------------------------------------------------------- transformers models


@pytest.mark.parametrize("form", ["KernelConfig", "kernels"])
def test_transformers_llama_gets_the_mapped_layers(form, community):
    """A Llama (random weights): every RMSNorm, SwiGLU gate and rotary match runs the
    mapped layer, in inference."""
    if form == "KernelConfig":
        value = transformers.KernelConfig(kernel_mapping={
            "RMSNorm": ("kernels-community/liger-kernels:LigerRMSNorm", {"version": 3}),
            "SiLU": "kernels-community/activation:Silu",
            "rotary_pos_emb": ("kernels-community/rotary:apply_rotary_transformers", {"version": 2})})
    else:
        value = {
            "RMSNorm": {"cpu": {Mode.INFERENCE: LayerRepository(
                "kernels-community/liger-kernels", layer_name="LigerRMSNorm", version=3)}},
            "SiLU": {"cpu": LayerRepository("kernels-community/activation", layer_name="Silu", version=1)},
            "rotary_pos_emb": {"cpu": {Mode.INFERENCE: LayerRepository(
                "kernels-community/rotary", layer_name="apply_rotary_transformers", version=2)}}}
    model, _ = tiny_models.build("llama")
    ids = tiny_models.input_ids()
    compiled, _ = compile_run(model, ids, mapping_value=value)
    assert tiny_models.replaced(community) == {"rmsnorm": 5, "silu_gate": 2, "rotary": 4}
    rotary = "hub:kernels-community/rotary@2:apply_rotary_transformers#rotary_pos_emb"
    assert {k for _, k, _ in replacements(community)} == {LIGER, SILU, rotary}
    reset(LIGER, SILU, rotary)
    with torch.no_grad():
        out = compiled(ids).logits
        torch.testing.assert_close(out, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert layers_of(LIGER).CALLS["LigerRMSNorm"] == 5
    assert layers_of(SILU).CALLS["Silu"] == 2
    assert layers_of(rotary).CALLS["apply_rotary_transformers"] == 4
    norms = {m.weight.data_ptr() for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"}
    assert set(layers_of(LIGER).WEIGHTS) == norms


def test_transformers_llama_training(community):
    """Training a Llama: the RMSNorm layer with its backward, the SiLU layer through its
    own autograd; the forward-only rotary layer stays out (bundled kernel); the loss and
    gradients match eager."""
    value = transformers.KernelConfig(kernel_mapping={
        "RMSNorm": ("kernels-community/liger-kernels:LigerRMSNorm", {"version": 3}),
        "SiLU": "kernels-community/activation:Silu",
        "rotary_pos_emb": ("kernels-community/rotary:apply_rotary_transformers", {"version": 2})})
    model, _ = tiny_models.build("llama")
    model.train()
    ids = tiny_models.input_ids()
    reset(LIGER, SILU)
    loss = compile_run(model, ids, labels=ids, mapping_value=value, train=True)[1].loss
    loss.backward()
    got = replacements(community)
    # the first layer's input norm reads the embedding directly: left to Inductor in fp32
    # training (README, known limits)
    assert tiny_models.replaced(community) == {"rmsnorm": 4, "silu_gate": 2, "rotary": 4}
    assert {(f, k, b) for f, k, b in got} == {("rmsnorm", LIGER, LIGER), ("silu_gate", SILU, SILU),
                                              ("rotary", "bundled:rotary", "bundled:rotary")}
    assert layers_of(LIGER).CALLS["LigerRMSNorm.backward"] >= 4
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(ids, labels=ids).loss
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_attention_repo_of_attn_implementation(community):
    """``attn_implementation``'s repo string reaches the attention family: the Llama's
    causal eager attention runs flash_attn_func with causal=True; a mask that is not the
    causal one runs SDPA with the mask; gradients go through the repo's function."""
    value = transformers.KernelConfig(kernel_mapping={"attn_implementation": "kernels-community/flash-attn2"})
    spec = "hub:kernels-community/flash-attn2@4#flash_attn"
    assert [e.spec for e in hubcompile.config.resolve({"kernel_mapping": value}).kernel_mapping] == [spec]
    model, _ = tiny_models.build("llama")
    ids = tiny_models.input_ids()
    compiled, _ = compile_run(model, ids, mapping_value=value, patterns=["attention"])
    assert replacements(community) == [("attention", spec, spec)] * 2
    calls = kernels.load(spec, CPU).module.CALLS
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert calls == {"causal": 2}

    from hubcompile.lowering import attention_ops

    adapter = kernels.load(spec, CPU)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    padding = torch.zeros(2, 1, 6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    padding[0, ..., :2] = float("-inf")  # left padding of the first sequence: not the causal mask
    padding[0, ..., :2, :2] = 0.0
    calls.clear()
    torch.testing.assert_close(adapter.attention_forward(q, k, v, padding, 0.3),
                               attention_ops.reference(q, k, v, padding, 0.3), rtol=1e-5, atol=1e-5)
    assert calls == {}
    causal = torch.zeros(1, 1, 6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), torch.finfo().min)
    dout = torch.randn(2, 4, 6, 8)
    got = adapter.attention_backward(dout, q, k, v, causal, 0.3)
    want = torch.autograd.grad(attention_ops.reference(*(t.requires_grad_() for t in (q, k, v)), causal, 0.3),
                               (q, k, v), dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert calls == {"causal": 1}


# -------------------------------------------------- the same mapping with kernelize


def test_kernelize_and_hubcompile_with_one_mapping(community):
    """One mapping, given to kernels.kernelize and to hubcompile. On a transformers Llama
    (LlamaRMSNorm is decorated with use_kernel_forward_from_hub("RMSNorm")) both replace
    the same five RMSNorms; on a user-written RMSNorm module only hubcompile does."""
    # A local repo: kernelize resolves a LayerRepository's version on the Hub even when
    # LOCAL_KERNELS names a path for it (hubcompile's get_kernel call does not).
    value = {"RMSNorm": {"cpu": LocalLayerRepository(STANDINS / "liger-kernels", layer_name="LigerRMSNorm")}}
    spec = f"local:{STANDINS / 'liger-kernels'}:LigerRMSNorm#RMSNorm"
    ids = tiny_models.input_ids()
    model, _ = tiny_models.build("llama")
    with use_kernel_mapping(value):
        kernelized, _ = tiny_models.build("llama")
        kernelize(kernelized, mode=Mode.INFERENCE, device="cpu")

    def norm_names(m):
        return {mod.weight.data_ptr(): name for name, mod in m.named_modules() if type(mod).__name__ == "LlamaRMSNorm"}

    layer_forward = layers_of(spec).LigerRMSNorm.forward
    swapped = {name for name, mod in kernelized.named_modules()
               if getattr(mod.forward, "__func__", None) is layer_forward}
    assert len(swapped) == 5
    reset(spec)
    with torch.no_grad():
        want = kernelized(ids).logits
    by_kernelize = sorted(norm_names(kernelized)[p] for p in layers_of(spec).WEIGHTS)

    compiled, _ = compile_run(model, ids, mapping_value=value, patterns=["rmsnorm"])
    reset(spec)
    with torch.no_grad():
        got = compiled(ids).logits
    by_hubcompile = sorted(norm_names(model)[p] for p in layers_of(spec).WEIGHTS)
    assert by_kernelize == by_hubcompile == sorted(swapped) == sorted(norm_names(model).values())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # a user-written RMSNorm, not decorated: kernelize leaves it, hubcompile reaches it
    torch.manual_seed(0)
    user = nn.Sequential(nn.Linear(16, 16), LlamaRMSNorm(16))
    x = torch.randn(2, 3, 16)
    with use_kernel_mapping(value):
        kernelize(user, mode=Mode.INFERENCE, device="cpu")
    reset(spec)
    with torch.no_grad():
        user(x)
    assert layers_of(spec).CALLS["LigerRMSNorm"] == 0
    torch._dynamo.reset()
    compiled, _ = compile_run(user, x, mapping_value=value, patterns=["rmsnorm"])
    reset(spec)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), user(x))
    assert layers_of(spec).WEIGHTS == [user[1].weight.data_ptr()]


# ------------------------------------------------------------ a locked layer, offline


_LOCKED_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from kernels import LockedLayerRepository
    import hubcompile
    from hubcompile.lowering import kernels
    from hubcompile.lowering.device import DeviceInfo
    repo = LockedLayerRepository("kernels-community/liger-kernels", lockfile=Path(sys.argv[1]),
                                 layer_name="LigerRMSNorm")
    cfg = hubcompile.config.resolve({"kernel_mapping": {"RMSNorm": {"cpu": repo}}})
    choice = kernels.choose("rms_norm", DeviceInfo("cpu"), torch.float32, cfg.kernel_overrides(), training=False)
    x, w = torch.randn(3, 8), torch.randn(8)
    y, _ = torch.ops.hubcompile.rms_norm(x, w, 1e-6, 0.0, True, None, choice.spec, "reference")
    calls = kernels.load(choice.spec, DeviceInfo("cpu")).module.layers.CALLS["LigerRMSNorm"]
    ok = torch.allclose(y, w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)))
    print(json.dumps([choice.spec, list(choice.reasons), calls, ok]))
    """
)


def test_locked_layer_loads_from_the_cache_offline(tmp_path):
    from test_kernel_resolution import _fill_cache

    cache = tmp_path / "hub"
    commit = _fill_cache(cache, "kernels-community/liger-kernels", STANDINS / "liger-kernels", version=3)
    lock = _locked(tmp_path)
    assert commit in lock.read_text()
    script = tmp_path / "locked.py"
    script.write_text(_LOCKED_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_KERNELS"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), KERNELS_CACHE=str(cache))
    done = subprocess.run([sys.executable, str(script), str(lock)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    spec, reasons, calls, ok = json.loads(done.stdout.strip().splitlines()[-1])
    assert spec == f"locked:kernels-community/liger-kernels@{lock}:LigerRMSNorm#RMSNorm", reasons
    assert calls == 1 and ok


def test_unserved_layer_names_are_skipped_with_one_warning_each(caplog, monkeypatch):
    """A KernelConfig written for use_kernels=True holds transformers' own names; those no
    family serves are skipped (as kernelize skips names no module uses), each named once
    with the names that are served, and the served ones kept."""
    from hubcompile.lowering import mapping

    monkeypatch.setattr(mapping, "_WARNED", set())
    value = {"RMSNorm": "kernels-community/liger-kernels:LigerRMSNorm",
             "MLP": "kernels-community/liger-kernels:LigerSwiGLUMLP",
             "ForCausalLMLoss": ("kernels-community/liger-kernels:LigerForCausalLMLossLayer", {"version": 3}),
             "MegaBlocksMoeMLP": {"cuda": "kernels-community/megablocks:MegaBlocksMoeMLP"}}
    with caplog.at_level(logging.WARNING, logger="hubcompile"):
        entries = mapping.parse(value)
        mapping.parse(value)  # a second compile warns no more
    assert {e.name for e in entries} == {"RMSNorm"}
    warned = [r.getMessage() for r in caplog.records if "kernel_mapping: skipping" in r.getMessage()]
    assert len(warned) == 3, warned
    for name in ("MLP", "ForCausalLMLoss", "MegaBlocksMoeMLP"):
        (line,) = [w for w in warned if f"{name!r}" in w]
        assert "the names served are RMSNorm, LayerNorm, rotary_pos_emb" in line
    assert "takes the logits" in [w for w in warned if "'ForCausalLMLoss'" in w][0]


def test_a_llama_compiles_with_transformers_default_mapping_names(community, caplog, monkeypatch):
    """transformers' own mapping names in one KernelConfig: the compile goes on with one
    warning per name no family serves, and every served name routes every match."""
    from hubcompile.lowering import mapping

    monkeypatch.setattr(mapping, "_WARNED", set())
    value = transformers.KernelConfig(kernel_mapping={
        "RMSNorm": ("kernels-community/liger-kernels:LigerRMSNorm", {"version": 3}),
        "SiLU": "kernels-community/activation:Silu",
        "rotary_pos_emb": ("kernels-community/rotary:apply_rotary_transformers", {"version": 2}),
        "MLP": ("kernels-community/liger-kernels:LigerSwiGLUMLP", {"version": 3}),
        "ForCausalLMLoss": ("kernels-community/liger-kernels:LigerForCausalLMLossLayer", {"version": 3}),
        "MegaBlocksMoeMLP": {"cuda": "kernels-community/megablocks:MegaBlocksMoeMLP"}})
    model, _ = tiny_models.build("llama")
    ids = tiny_models.input_ids()
    with caplog.at_level(logging.WARNING, logger="hubcompile"):
        compiled, _ = compile_run(model, ids, mapping_value=value)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert tiny_models.replaced(community) == {"rmsnorm": 5, "silu_gate": 2, "rotary": 4}
    rotary = "hub:kernels-community/rotary@2:apply_rotary_transformers#rotary_pos_emb"
    assert {k for _, k, _ in replacements(community)} == {LIGER, SILU, rotary}
    warned = [r.getMessage() for r in caplog.records if "kernel_mapping: skipping" in r.getMessage()]
    assert sorted(w.split("'")[1] for w in warned) == ["ForCausalLMLoss", "MLP", "MegaBlocksMoeMLP"], warned
