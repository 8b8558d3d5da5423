"""Kernel mappings in the vocabulary users already write (transformers' KernelConfig,
kernels' LayerRepository mappings) given to backend="hubkernels": each form reaches the
mapped Hub layer for every match, on a transformers model and on user-written modules;
modes and devices pick entries as kernelize picks them; a layer without a backward is
kept out of training; malformed mappings are clear errors; and against kernels.kernelize
with the same mapping, both replace the same RMSNorms of a transformers model, while only
hubcompile reaches a user-written one. MLP layers get whole MLPs, ForCausalLMLoss layers
the LM head's loss, rotary layers only matches whose cos/sin provably repeat their first
half; transformers' default names compile a Llama training step.

The Hub layers are stand-in repos (tests/standins/{liger-kernels,activation-layers,
rotary-layers}) that follow the layer conventions (no __init__, state read from the
module, has_backward / can_torch_compile) and load under the kernels-community ids
through LOCAL_KERNELS. Each counts its calls (``layers.CALLS``), and the RMSNorm layer
records which weights it was called with (``layers.WEIGHTS``). The real liger-kernels
layers, built at test time from the liger-kernel package (liger_repo.py), run where
Triton's CPU interpreter runs their kernels: rotary and the loss (``test_real_liger_*``).
"""

import copy
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
import liger_repo
import tiny_models
from hubcompile.explain import GraphReport, Report
from hubcompile.lowering import kernels, mapping
from hubcompile.lowering.device import DeviceInfo
from hubcompile.lowering.numerics import KeepFloat64
from numerics import assert_close_to_reference
from small_modules import Block, LlamaRMSNorm, Phi3MLP, SwiGLU

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
        getattr(layers, "MLP_WEIGHTS", []).clear()


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
    assert "has no layer Missing (its layers: LigerCausalConv1d, LigerForCausalLMLossLayer" in choice.reasons[0]
    assert "LigerRMSNorm, LigerRMSNormInPlace, LigerSwiGLUMLP" in choice.reasons[0]


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


# ------------------------------------------------ rotary: cos/sin with equal halves


def _aten_graph(fn, *inputs):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake")(*inputs).graph


@pytest.mark.parametrize("built, proven", [
    ("cat", True),  # transformers: emb = cat((freqs, freqs), -1)
    ("repeat", True),  # the same once decomposed: clone(expand(unsqueeze(f, -2))) viewed as [..., 2h]
    ("cat_two", False),  # two different halves
    ("stack_two", False),
    ("input", False),  # cos/sin handed in: nothing to prove it
])
def test_equal_halves_of_cos_sin_are_proven_from_the_graph(built, proven):
    """Rotary layers may read only the first half of cos/sin (liger's does): the rotary
    family proves from the graph that cos/sin repeat it, through the scaling, cast and
    unsqueeze transformers applies."""
    from hubcompile.patterns.rotary import halves_equal

    def cos_of(f, g, given):
        emb = {"cat": lambda: torch.cat((f, f), dim=-1),
               "repeat": lambda: f.unsqueeze(-2).expand(*f.shape[:-1], 2, f.shape[-1]).contiguous().view(
                   *f.shape[:-1], 2 * f.shape[-1]),
               "cat_two": lambda: torch.cat((f, g), dim=-1),
               "stack_two": lambda: torch.stack((f, g), dim=-2).view(*f.shape[:-1], 2 * f.shape[-1]),
               "input": lambda: given}[built]()
        return (emb.cos() * 0.5).to(torch.bfloat16).unsqueeze(1)

    graph = _aten_graph(cos_of, torch.randn(2, 7, 4), torch.randn(2, 7, 4), torch.randn(2, 7, 8))
    out = graph.output_node().args[0]
    assert halves_equal(out[0] if isinstance(out, (tuple, list)) else out) is proven


class Rope(nn.Module):
    """q, k [B, H, S, D] rotated as Llama rotates them, with cos/sin built in the graph
    from positions (cat((freqs, freqs))) or handed in."""

    def forward(self, q, k, cos=None, sin=None):
        if cos is None:
            d = q.shape[-1]
            inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
            freqs = torch.arange(q.shape[2], dtype=torch.float32)[:, None] * inv_freq[None]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos()[None, None], emb.sin()[None, None]

        def rotate_half(x):
            return torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)

        d = q.shape[-1]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def test_rotary_layer_gets_only_matches_whose_cos_sin_repeat_their_first_half(community):
    """The stand-in of liger's rotary layer reads only the first half of cos/sin, as
    liger's kernel does. Where the graph builds cos/sin with cat((freqs, freqs)) it serves
    both rotations; where cos/sin are inputs (halves unknown), the bundled kernel does,
    with the reason, and the result is still right."""
    value = {"rotary_pos_emb": ("kernels-community/liger-kernels:liger_rotary_pos_emb_layer", {"version": 3})}
    spec = "hub:kernels-community/liger-kernels@3:liger_rotary_pos_emb_layer#rotary_pos_emb"
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8)
    rope = Rope()
    compiled, _ = compile_run(rope, q, k, mapping_value=value)
    assert [(f, kernel) for f, kernel, _ in replacements(community)] == [("rotary", spec)] * 2
    reset(spec)
    for got, want in zip(compiled(q, k), rope(q, k)):
        torch.testing.assert_close(got, want)
    assert layers_of(spec).CALLS["liger_rotary_pos_emb_layer"] == 2

    torch._dynamo.reset()
    community.clear()
    cos, sin = torch.randn(1, 1, 7, 8), torch.randn(1, 1, 7, 8)  # different halves
    _, out = compile_run(rope, q, k, cos, sin, mapping_value=value)
    assert [(f, kernel) for f, kernel, _ in replacements(community)] == [("rotary", "bundled:rotary")] * 2
    for got, want in zip(out, rope(q, k, cos, sin)):
        torch.testing.assert_close(got, want)
    choice = kernels.choose("rotary", CPU, torch.float32, hubcompile.config.resolve(
        {"kernel_mapping": value}).kernel_overrides(), interleaved=False, halves_equal=False)
    assert choice.spec == "bundled:rotary"
    assert "may read only the first half of cos/sin" in choice.reasons[0]


# ---------------------------------------------- the real liger-kernels repo, on CPU


@pytest.fixture(scope="module")
def liger(tmp_path_factory):
    """kernels-community/liger-kernels built now from the liger-kernel package
    (liger_repo.py), named by its path; its Triton kernels run on CPU under
    TRITON_INTERPRET=1 (conftest.py) where the interpreter can run them."""
    return liger_repo.build(tmp_path_factory.mktemp("hub") / "liger-kernels")


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("batch, seq", [(1, 7), (2, 1)])
def test_real_liger_rotary_layer(liger, layout, batch, seq):
    """liger's rotary layer, its Triton kernel interpreted, through the adapter: right
    against float64 with cos/sin as transformers builds them, forward and backward. With
    batch 1 or one token liger rotates the tensors it is given in place: the op's input
    stays untouched (q as the models lay it out, [B, S, H, D] seen as [B, H, S, D], and
    contiguous). A match whose cos/sin halves are not proven equal is not offered. fp32
    only: Triton 3.9's interpreter computes bf16 arithmetic wrong (a bf16 multiply kernel
    returns values near 1e37), and liger's rotation computes in cos's dtype."""
    from hubcompile.lowering import rotary_ops

    dtype = torch.float32
    adapter = kernels.load(f"local:{liger}:liger_rotary_pos_emb_layer#rotary_pos_emb", CPU)
    assert adapter.unsupported("rotary_forward", CPU, dtype, halves_equal=True) is None
    assert "first half of cos/sin" in adapter.unsupported("rotary_forward", CPU, dtype, halves_equal=False)
    torch.manual_seed(0)
    x = torch.randn(batch, seq, 4, 16, dtype=dtype).transpose(1, 2)
    x = x.contiguous() if layout == "bhsd" else x
    freqs = torch.randn(batch, seq, 8)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)
    before = x.clone()
    out = adapter.rotary_forward(x, cos, sin, False)
    assert torch.equal(x, before)
    ref64 = rotary_ops.reference(x.double(), cos.double(), sin.double(), False)
    assert_close_to_reference(out, rotary_ops.reference(x, cos, sin, False), ref64, dtype, "out")
    dout = torch.randn_like(out)
    dx = adapter.rotary_backward(dout, cos, sin, False)
    (want64,) = torch.func.vjp(lambda t: rotary_ops.reference(t, cos.double(), sin.double(), False),
                               x.double())[1](dout.double())
    (want,) = torch.func.vjp(lambda t: rotary_ops.reference(t, cos, sin, False), x)[1](dout)
    assert_close_to_reference(dx, want, want64, dtype, "dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction, bias", [("mean", False), ("sum", True)])
def test_real_liger_loss_layer(liger, dtype, reduction, bias):
    """liger's ForCausalLMLoss layer (its fused linear cross-entropy, Triton interpreted)
    through the adapter: the loss of the logits it never builds and its gradients, as the
    op's contract says, against float64; targets already shifted, some ignored; the
    returned logits where the graph wants them. It takes no logit scale or soft-capping."""
    from hubcompile.lowering import linear_cross_entropy_ops as lce

    adapter = kernels.load(f"local:{liger}:LigerForCausalLMLossLayer#ForCausalLMLoss", CPU)
    fn = "linear_cross_entropy_logits_grads_forward"
    assert adapter.unsupported(fn, CPU, dtype, training=True) is None
    assert "no logit scale or soft-capping" in adapter.unsupported(fn, CPU, dtype, scale=0.5)
    assert "no logit scale or soft-capping" in adapter.unsupported(fn, CPU, dtype, softcap=30.0)
    torch.manual_seed(0)
    h, w = torch.randn(13, 24, dtype=dtype), torch.randn(37, 24, dtype=dtype) / 4
    b = torch.randn(37, dtype=dtype) if bias else None
    target = torch.randint(0, 37, (13,))
    target[[2, 7]] = -100
    args = (h, w, b, target, -100, reduction, 1.0, 0.0)
    loss, logits, grad_h, grad_w, grad_b = adapter.linear_cross_entropy_logits_grads_forward(*args, dtype)
    want = lce._logits_grads_forward_reference(*args, dtype)
    with KeepFloat64():
        want64 = lce._logits_grads_forward_reference(*(t.double() if isinstance(t, torch.Tensor) and
                                                       t.is_floating_point() else t for t in args), torch.float64)
    assert loss.dtype == torch.float32 and logits.dtype == dtype
    for name, got, orig, ref in zip(("loss", "logits", "grad_h", "grad_w"), (loss, logits, grad_h, grad_w),
                                    want, want64):
        assert got.dtype == orig.dtype, name
        assert_close_to_reference(got, orig, ref, dtype, name)
    if bias:
        assert_close_to_reference(grad_b, want[4], want64[4], dtype, "grad_b")
    loss_only = adapter.linear_cross_entropy_forward(*args, False)
    torch.testing.assert_close(loss_only[0], loss)
    assert all(t.numel() == 0 for t in loss_only[1:])


def test_real_liger_rotary_and_loss_layers_on_a_llama(liger, community):
    """transformers' names for the real liger layers whose kernels the interpreter runs: a
    Llama training step compiled as a loss function (the logits never built), its loss a
    sum over num_items_in_batch. Every rotation runs liger_rotary_pos_emb_layer and the
    loss LigerForCausalLMLossLayer (inside the op, under torch.compile, though the layer
    is torch.compiler.disable'd); the loss and every gradient are eager's."""
    value = transformers.KernelConfig(kernel_mapping={
        "rotary_pos_emb": f"{liger}:liger_rotary_pos_emb_layer",
        "ForCausalLMLoss": f"{liger}:LigerForCausalLMLossLayer"}, use_local_kernel=True)
    rotary, loss_layer = (f"local:{liger}:liger_rotary_pos_emb_layer#rotary_pos_emb",
                          f"local:{liger}:LigerForCausalLMLossLayer#ForCausalLMLoss")
    model, _ = tiny_models.build("llama")
    model.train()
    ids = tiny_models.input_ids()
    items = int(ids[:, 1:].numel())

    @torch.compile(backend="hubkernels", options={"kernel_mapping": value,
                                                  "patterns": ["rotary", "linear_cross_entropy"]})
    def loss_fn(ids):
        return model(ids, labels=ids, num_items_in_batch=items).loss

    loss = loss_fn(ids)
    loss.backward()
    got = replacements(community)
    assert sorted(got) == sorted([("rotary", rotary, rotary)] * 4 + [("linear_cross_entropy", loss_layer,
                                                                       "reference")])
    assert [s for rec in community for s in rec.spellings.get("linear_cross_entropy", [])] == [("sum", loss_layer)]
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(ids, labels=ids, num_items_in_batch=items).loss
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_real_liger_rmsnorm_and_mlp_cannot_run_interpreted(liger, community, caplog):
    """liger's RMSNorm and SwiGLU kernels do not run under Triton's CPU interpreter:
    Triton 3.9's interpreter passes a float argument (eps, the gate multiplier) as a Python
    float, on which the kernels call .to() (and RMSNorm's libdevice rsqrt is not
    interpreted). So each match keeps its original code or, for the MLP, leaves its gate to
    the silu_gate family, with the guard's reason logged; the compile and the result are
    right. (bench/kernel_mapping.py runs them on a GPU.)"""
    value = transformers.KernelConfig(kernel_mapping={
        "RMSNorm": f"{liger}:LigerRMSNorm", "MLP": f"{liger}:LigerSwiGLUMLP"}, use_local_kernel=True)
    torch.manual_seed(0)
    block, x = Block(), torch.randn(2, 5, 16)
    with caplog.at_level(logging.WARNING, logger="hubcompile"):
        compiled, out = compile_run(block, x, mapping_value=value)
    torch.testing.assert_close(out, block(x))
    assert replacements(community) == [("silu_gate", "bundled:activation", "bundled:activation")]
    refused = [why for rec in community for _, why in rec.refused.get("rmsnorm", [])]
    # each norm, and the plain norm inside the one fused with the residual add, refused
    assert len(refused) == 3 and all("InterpreterError" in why and "'float' object has no attribute 'to'" in why
                                     for why in refused), refused
    mlp = [r.getMessage() for r in caplog.records if "LigerSwiGLUMLP" in r.getMessage()]
    assert mlp and "'float' object has no attribute 'to'" in mlp[0]


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


MLP = "hub:kernels-community/liger-kernels@3:LigerSwiGLUMLP#MLP"


def _mlp_case(form):
    """(module, mapping, spec of the layer, its CALLS key, spelling) of each MLP form."""
    torch.manual_seed(0)
    liger = "kernels-community/liger-kernels"
    if form.startswith("fused"):
        layer = "LigerPhi3SwiGLUMLP" if form == "fused" else "LigerSwiGLUMLP"
        module, spelling = Phi3MLP(16, 12), "mlp_fused_gate_up"
    else:
        layer = "LigerGEGLUMLP" if form == "gelu_tanh" else "LigerSwiGLUMLP"
        module = SwiGLU(16, 24, act="gelu_tanh" if form == "gelu_tanh" else "silu", bias=form == "separate_bias")
        spelling = "mlp"
    name = "GeGLUMLP" if form == "gelu_tanh" else "MLP"
    return module, {name: (f"{liger}:{layer}", {"version": 3})}, f"hub:{liger}@3:{layer}#{name}", layer, spelling


@pytest.mark.parametrize("form, dtype", [
    ("separate", torch.float32), ("separate", torch.bfloat16), ("separate_bias", torch.float32),
    ("fused", torch.float32), ("fused", torch.bfloat16), ("fused_by_separate_layer", torch.float32),
    ("gelu_tanh", torch.float32)])
def test_mlp_layer_serves_the_whole_mlp(community, form, dtype):
    """An MLP layer (MLP, GeGLUMLP) gets the whole MLP in a training graph: the two
    projections or Phi-3's fused gate_up_proj, the gate and the down projection, called on
    a stand-in carrying the module's own weights as gate_proj/up_proj/down_proj (and as
    gate_up_proj for a fused one, so a layer reading either serves it). Recorded under the
    gate's family; output and every gradient against float64, forward and backward through
    the layer."""
    module, value, spec, layer, spelling = _mlp_case(form)
    module = module.to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype)
    xt = x.clone().requires_grad_(True)
    compiled, _ = compile_run(module, xt, mapping_value=value, train=True)
    family = "gelu_tanh_gate" if form == "gelu_tanh" else "silu_gate"
    assert replacements(community) == [(family, spec, spec)]
    assert [s for rec in community for s in rec.spellings.get(family, [])] == [(spelling, spec)]
    reset(spec)
    out = compiled(xt)
    out.backward(torch.ones_like(out))
    assert layers_of(spec).CALLS[layer] == 2  # forward, and forward again to differentiate it
    if layer == "LigerSwiGLUMLP":
        assert set(layers_of(spec).MLP_WEIGHTS) == {module.down_proj.weight.data_ptr()}
    grads = [xt.grad] + [p.grad for p in module.parameters()]
    module.zero_grad()
    xe = x.clone().requires_grad_(True)
    eager = module(xe)
    eager.backward(torch.ones_like(eager))
    wanted = [xe.grad] + [p.grad for p in module.parameters()]
    module64 = copy.deepcopy(module).double()
    module64.zero_grad()
    x64 = x.double().requires_grad_(True)
    ref = module64(x64)
    ref.backward(torch.ones_like(ref))
    assert_close_to_reference(out.detach(), eager.detach(), ref.detach(), dtype, "out")
    for i, (got, want, want64) in enumerate(zip(grads, wanted, [x64.grad] + [p.grad for p in module64.parameters()])):
        assert_close_to_reference(got, want, want64, dtype, f"grad {i}")


def test_fused_only_mlp_layer_leaves_separate_projections_to_the_gate(community):
    """A layer reading only gate_up_proj does not serve an MLP with two projections: its
    gate goes to the silu_gate family (the bundled kernel), with the reason."""
    value = {"MLP": ("kernels-community/liger-kernels:LigerPhi3SwiGLUMLP", {"version": 3})}
    torch.manual_seed(0)
    module, x = SwiGLU(16, 24), torch.randn(2, 5, 16)
    _, out = compile_run(module, x, mapping_value=value)
    assert replacements(community) == [("silu_gate", "bundled:activation", "bundled:activation")]
    torch.testing.assert_close(out, module(x))
    reason = kernels.choose("gated_mlp", CPU, torch.float32, hubcompile.config.resolve(
        {"kernel_mapping": value}).kernel_overrides(), activation="silu", fused=False).reasons
    assert reason == ("hub:kernels-community/liger-kernels@3:LigerPhi3SwiGLUMLP#MLP: layer LigerPhi3SwiGLUMLP "
                      "reads gate_up_proj: it serves a fused gate/up projection only",)


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
    monkeypatch.setattr(mapping, "_WARNED", set())
    value = {"RMSNorm": "kernels-community/liger-kernels:LigerRMSNorm",
             "MLP": "kernels-community/liger-kernels:LigerSwiGLUMLP",
             "ForCausalLMLoss": ("kernels-community/liger-kernels:LigerForCausalLMLossLayer", {"version": 3}),
             "MegaBlocksMoeMLP": {"cuda": "kernels-community/megablocks:MegaBlocksMoeMLP"},
             "RMSNormGated": {"cuda": ("kernels-community/fla:FusedRMSNormGated", {"version": 1})},
             "Linear": {"cuda": ("kernels-community/liger-kernels:LigerLinear", {"version": 3})}}
    with caplog.at_level(logging.WARNING, logger="hubcompile"):
        entries = mapping.parse(value)
        mapping.parse(value)  # a second compile warns no more
    assert {e.name for e in entries} == {"RMSNorm", "MLP", "ForCausalLMLoss"}
    warned = [r.getMessage() for r in caplog.records if "kernel_mapping: skipping" in r.getMessage()]
    assert len(warned) == 3, warned
    for name in ("MegaBlocksMoeMLP", "RMSNormGated", "Linear"):
        (line,) = [w for w in warned if f"{name!r}" in w]
        assert "the names served are RMSNorm, LayerNorm, rotary_pos_emb" in line and "MLP" in line


def test_a_llama_trains_with_transformers_default_mapping_names(community, caplog, monkeypatch):
    """transformers' own mapping names in one KernelConfig (stand-ins answer for the
    kernels-community repos): a Llama training step, compiled whole, goes on with one
    warning per name no family serves, and every served name routes every match of its
    family to its layer: RMSNorm (all but the first norm, left to Inductor in fp32
    training: README, known limits), MLP (each whole MLP, so SiLU, the gate alone, gets
    none), rotary_pos_emb, ForCausalLMLoss (with the logits the model returns). The logits,
    the loss and every gradient are eager's."""
    monkeypatch.setattr(mapping, "_WARNED", set())
    liger = "kernels-community/liger-kernels"
    value = transformers.KernelConfig(kernel_mapping={
        "RMSNorm": (f"{liger}:LigerRMSNorm", {"version": 3}),
        "rotary_pos_emb": (f"{liger}:liger_rotary_pos_emb_layer", {"version": 3}),
        "MLP": (f"{liger}:LigerSwiGLUMLP", {"version": 3}),
        "ForCausalLMLoss": (f"{liger}:LigerForCausalLMLossLayer", {"version": 3}),
        "SiLU": "kernels-community/activation:Silu",
        "MegaBlocksMoeMLP": {"cuda": "kernels-community/megablocks:MegaBlocksMoeMLP"},
        "RMSNormGated": {"cuda": ("kernels-community/fla:FusedRMSNormGated", {"version": 1})},
        "Linear": {"cuda": (f"{liger}:LigerLinear", {"version": 3})}})
    rotary = f"hub:{liger}@3:liger_rotary_pos_emb_layer#rotary_pos_emb"
    loss_layer = f"hub:{liger}@3:LigerForCausalLMLossLayer#ForCausalLMLoss"
    model, _ = tiny_models.build("llama")
    model.train()
    ids = tiny_models.input_ids()
    with caplog.at_level(logging.WARNING, logger="hubcompile"):
        compiled, out = compile_run(model, ids, labels=ids, mapping_value=value, train=True,
                                    patterns=[*PATTERNS, "linear_cross_entropy"])
    warned = [r.getMessage() for r in caplog.records if "kernel_mapping: skipping" in r.getMessage()]
    assert sorted(w.split("'")[1] for w in warned) == ["Linear", "MegaBlocksMoeMLP", "RMSNormGated"], warned
    assert tiny_models.replaced(community) == {"rmsnorm": 4, "silu_gate": 2, "rotary": 4, "linear_cross_entropy": 1}
    assert sorted(set(replacements(community))) == sorted({
        ("rmsnorm", LIGER, LIGER), ("silu_gate", MLP, MLP), ("rotary", rotary, rotary),
        ("linear_cross_entropy", loss_layer, "reference")})  # the layer's gradients come with its loss
    # a second step, compiled: every layer runs for each of its matches
    model.zero_grad()
    reset(LIGER, SILU, rotary)
    out = compiled(ids, labels=ids)
    out.loss.backward()
    calls = layers_of(LIGER).CALLS
    assert (calls["LigerRMSNorm"], calls["LigerSwiGLUMLP"], calls["liger_rotary_pos_emb_layer"],
            calls["LigerForCausalLMLossLayer"]) == (4 * 2, 2 * 2, 4, 1)  # norms and MLPs run again in backward
    assert calls["LigerRMSNorm.backward"] == 4 and layers_of(SILU).CALLS["Silu"] == 0
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(ids, labels=ids)
    eager.loss.backward()
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
