"""Numerical guards: deliberately wrong kernels, injected through the config as local
repos, are rejected at compile time (the original code stays, the report names each
rejection with its errors), right ones are accepted, the check runs once per shape
signature, and the runtime mode catches a kernel that goes wrong later."""

import json
import logging
import textwrap
import warnings

import pytest
import torch
from torch import nn

import hubcompile
from hubcompile.guards import numerical as guards
from hubcompile.lowering import kernels
from numerics import assert_close_to_reference

# A local repo in the bundled API. The forward wraps the correct bundled torch-cpu
# kernel and then goes wrong in one way; the backward is the correct one.
REPO = '''
import itertools
import torch
import kernels
from hubcompile.lowering.kernels import BUNDLED_ROOT

_ok = kernels.get_local_kernel(BUNDLED_ROOT / "rmsnorm" / "build" / "torch-cpu")
rms_norm_backward = _ok.rms_norm_backward
_calls = itertools.count(1)


def rms_norm_forward(x, weight, eps, weight_offset, cast_before_scale, residual=None):
    call = next(_calls)
{body}
'''

WRONG = {
    # eps 0.05 too large: a 2.5% error on unit-variance rows (bf16 rounding alone is ~0.3%).
    "slightly_wrong_eps": "return _ok.rms_norm_forward(x, weight, eps + 0.05, weight_offset, cast_before_scale, residual)",
    # normalizes over the sequence instead of the hidden dim
    "wrong_reduction_axis": """
        y, rstd, h = _ok.rms_norm_forward(x, weight, eps, weight_offset, cast_before_scale, residual)
        hf = x.float()
        y = (hf * torch.rsqrt(hf.pow(2).mean(-2, keepdim=True) + eps)).to(x.dtype) * weight
        return y, rstd, h""",
    "nan_on_some_rows": """
        y, rstd, h = _ok.rms_norm_forward(x, weight, eps, weight_offset, cast_before_scale, residual)
        y = y.clone()
        y.view(-1, y.shape[-1])[::5] = float("nan")
        return y, rstd, h""",
    # normalizes a bf16-rounded copy of an fp32 input
    "wrong_dtype_cast": "return _ok.rms_norm_forward(x.bfloat16().to(x.dtype), weight, eps, weight_offset, "
                        "cast_before_scale, residual)",
    "ignores_weight": "return _ok.rms_norm_forward(x, torch.ones_like(weight), eps, weight_offset, "
                      "cast_before_scale, residual)",
    # vectorized by pairs: the last column of an odd hidden size is never written, so it
    # keeps what the buffer held (here ones). Not zeros: a zero column is close to right
    # whenever the guard's random weight for that column is close to zero.
    "right_only_for_even_sizes": """
        y, rstd, h = _ok.rms_norm_forward(x, weight, eps, weight_offset, cast_before_scale, residual)
        if y.shape[-1] % 2:
            y = y.clone()
            y[..., -1] = 1
        return y, rstd, h""",
}
CORRECT = "return _ok.rms_norm_forward(x, weight, eps, weight_offset, cast_before_scale, residual)"
# Right for the guard's call and the first real call, wrong from the third call on.
GOES_WRONG_LATER = """
        y, rstd, h = _ok.rms_norm_forward(x, weight, eps, weight_offset, cast_before_scale, residual)
        return (y * 1.5 if call >= 3 else y), rstd, h"""


def make_repo(root, name, body):
    variant = root / name / "build" / "torch-cpu"
    variant.mkdir(parents=True)
    body = textwrap.indent(textwrap.dedent(body).strip(), "    ")
    (variant / "__init__.py").write_text(REPO.format(body=body))
    (variant / "metadata.json").write_text(json.dumps(
        {"name": name.replace("_", "-"), "id": f"_guard_test_{name}", "version": 1, "license": "Apache-2.0", "python-depends": [],
         "backend": {"type": "cpu"}}))
    return f"local:{variant}"


class UserNorm(nn.Module):
    """A user-written model with a Llama-style RMSNorm of odd hidden size."""

    def __init__(self, hidden=33):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        self.weight = nn.Parameter(torch.randn(hidden))
        self.eps = 1e-6

    def forward(self, x):
        h = self.proj(x)
        hf = h.to(torch.float32)
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hf.to(h.dtype)


@pytest.fixture
def clean(fresh):
    kernels.clear_cache()
    guards.clear_cache(disk=True)
    yield fresh
    kernels.clear_cache()
    guards.clear_cache(disk=True)


def compile_and_run(model, x, **options):
    with torch.no_grad():
        return torch.compile(model, backend="hubkernels", options=options or None)(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wrong_kernels_are_rejected_and_named(clean, tmp_path, dtype, caplog):
    torch.manual_seed(0)
    model = UserNorm().to(dtype)
    x = torch.randn(2, 7, 33, dtype=dtype)
    ref_model = UserNorm().double()
    ref_model.load_state_dict(model.state_dict())
    eager, ref = model(x), ref_model(x.double())
    for name, body in WRONG.items():
        spec = make_repo(tmp_path, name, body)
        if name == "wrong_dtype_cast" and dtype == torch.bfloat16:
            continue  # a bf16 round trip is a no-op on bf16 input
        clean.clear()
        torch._dynamo.reset()
        with caplog.at_level(logging.WARNING, logger="hubcompile"):
            out = compile_and_run(model, x, kernels={"rmsnorm": spec})
        (record,) = clean
        assert record.replaced["rmsnorm"] == 0, name
        (spelling, reason), = record.refused["rmsnorm"]
        assert reason.startswith(f"guard failed for {spec}: "), reason
        assert ("rmse" in reason and "> bound" in reason) or "NaN/Inf" in reason, reason
        (_, kernel, result), = record.guards["rmsnorm"]
        assert kernel == spec and not result.passed and result.comparisons
        failed = [c for c in result.comparisons if not c.ok]
        assert failed and all(c.nonfinite or c.error > c.bound for c in failed)
        assert any(spec in r.message and "failed its numerical guard" in r.message for r in caplog.records)
        # the original code ran: the output is as accurate as eager
        assert_close_to_reference(out, eager, ref, dtype, name)


def test_correct_kernel_is_accepted(clean, tmp_path):
    spec = make_repo(tmp_path, "correct", CORRECT)
    model, x = UserNorm(), torch.randn(2, 7, 33)
    out = compile_and_run(model, x, kernels={"rmsnorm": spec})
    (record,) = clean
    assert record.replaced["rmsnorm"] == 1 and record.refused["rmsnorm"] == []
    (_, kernel, result), = record.guards["rmsnorm"]
    assert kernel == spec and result.passed and result.source == "run"
    assert [c.what for c in result.comparisons] == ["out"]
    torch.testing.assert_close(out, model(x))


def test_training_checks_the_backward(clean, tmp_path):
    # A forward that is right with a backward that drops the weight's gradient.
    spec = make_repo(tmp_path, "bad_backward", CORRECT)
    init = tmp_path / "bad_backward" / "build" / "torch-cpu" / "__init__.py"
    init.write_text(init.read_text().replace(
        "rms_norm_backward = _ok.rms_norm_backward",
        "def rms_norm_backward(*args, **kwargs):\n    dh, dw = _ok.rms_norm_backward(*args, **kwargs)\n"
        "    return dh, dw * 0.5\n"))
    model, x = UserNorm(), torch.randn(2, 7, 33)
    torch.compile(model, backend="hubkernels", options={"kernels": {"rmsnorm": spec}})(x).sum().backward()
    (record,) = clean
    assert record.replaced["rmsnorm"] == 0
    (_, reason), = record.refused["rmsnorm"]
    assert "grad w: rmse" in reason and "> bound" in reason, reason

    # With the backward check switched off, the same kernel is used.
    clean.clear()
    torch._dynamo.reset()
    opts = {"kernels": {"rmsnorm": spec}, "guard_backward": False}
    torch.compile(model, backend="hubkernels", options=opts)(x).sum().backward()
    assert clean[-1].replaced["rmsnorm"] == 1


def test_guard_runs_once_per_shape_signature(clean):
    model = UserNorm()
    before = dict(guards.STATS)
    compiled = torch.compile(model, backend="hubkernels")
    with torch.no_grad():
        for _ in range(3):
            compiled(torch.randn(2, 7, 33))  # one compile, then cached calls
    assert guards.STATS["runs"] - before["runs"] == 1
    # A recompile with the same shapes uses the result in memory.
    torch._dynamo.reset()
    compile_and_run(model, torch.randn(2, 7, 33))
    assert guards.STATS["runs"] - before["runs"] == 1 and guards.STATS["memory_hits"] > before["memory_hits"]
    # A new process (memory cleared) reads it from disk.
    guards.clear_cache()
    torch._dynamo.reset()
    compile_and_run(model, torch.randn(2, 7, 33))
    assert guards.STATS["runs"] - before["runs"] == 1 and guards.STATS["disk_hits"] > before["disk_hits"]
    # A new shape signature is checked again.
    torch._dynamo.reset()
    compile_and_run(model, torch.randn(3, 5, 33))
    assert guards.STATS["runs"] - before["runs"] == 2
    assert all(r.replaced["rmsnorm"] == 1 for r in clean)


def test_unreadable_guard_cache_is_ignored(clean, caplog):
    guards.cache_path().parent.mkdir(parents=True, exist_ok=True)
    guards.cache_path().write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="hubcompile"):
        compile_and_run(UserNorm(), torch.randn(2, 7, 33))
    assert clean[-1].replaced["rmsnorm"] == 1
    assert any("unreadable guard cache" in r.message for r in caplog.records)
    json.loads(guards.cache_path().read_text())  # rewritten whole


def test_runtime_mode_catches_a_kernel_that_goes_wrong_later(clean, tmp_path):
    spec = make_repo(tmp_path, "goes_wrong", GOES_WRONG_LATER)
    model = UserNorm()
    compiled = torch.compile(model, backend="hubkernels", options={"kernels": {"rmsnorm": spec}, "runtime_checks": 5})
    xs = [torch.randn(2, 7, 33) for _ in range(4)]
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [compiled(x) for x in xs]
    assert clean[-1].replaced["rmsnorm"] == 1  # the guard saw a right kernel
    messages = [str(w.message) for w in caught if "failed its runtime check" in str(w.message)]
    assert len(messages) == 1 and spec in messages[0], messages
    for x, out in zip(xs, outs):  # every output right: the bad call was replaced by the reference
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, message", [
    ({"tolerances": {"rmsnorm": {"float32": (-1.0, 1e-6)}}}, "k must be a number >= 0, got -1.0"),
    ({"tolerances": {"rmsnorm": {"float32": {"k": 2.0, "floor": -1e-6}}}}, "floor must be a number >= 0"),
    ({"tolerances": {"rmsnorm": {"fp8": (2.0, 1e-6)}}}, "unknown dtype 'fp8'"),
    ({"tolerances": {"layernorm": {"float32": (2.0, 1e-6)}}}, "unknown pattern 'layernorm'"),
    ({"runtime_checks": -1}, "must be an integer >= 0"),
    ({"runtime_check_every": "often"}, "'runtime_check_every' must be an integer >= 0.*got 'often'"),
    ({"guard": "maybe"}, "must be True or False"),
])
def test_bad_guard_config_raises(options, message):
    with pytest.raises(ValueError, match=message):
        hubcompile.configure(**options)
    hubcompile.reset_config()


def test_tolerance_override_applies(clean, tmp_path):
    # A generous enough bound accepts the eps-perturbed kernel: the override is used.
    spec = make_repo(tmp_path, "loose", WRONG["slightly_wrong_eps"])
    compile_and_run(UserNorm(), torch.randn(2, 7, 33), kernels={"rmsnorm": spec},
                    tolerances={"rmsnorm": {"float32": (2.0, 0.1)}})
    assert clean[-1].replaced["rmsnorm"] == 1


def test_large_shapes_are_checked_on_a_bounded_slice(monkeypatch):
    """A match on [64, 4096, 4096]-sized activations has a cut shape along batch and
    sequence of about guards.MAX_ELEMENTS, keeping every input's shape consistent (the
    check falls back to it where the kernel cannot run at the real shape)."""
    from hubcompile.patterns import rmsnorm

    spelling = next(s for stage in rmsnorm.FAMILY.stages for s in stage if s.name == "add_llama_pow_w_first")
    meta = {"x": torch.empty(64, 4096, 4096, device="meta"), "residual": torch.empty(64, 4096, 4096, device="meta"),
            "w": torch.empty(4096, device="meta"), "eps": 1e-6}
    # sequence 4096 == hidden 4096: the sequence is cut, the hidden size is not
    shapes = guards.input_shapes(spelling, meta)
    assert shapes["x"] == shapes["residual"] and shapes["x"][-1] == 4096 and shapes["w"] == [4096]
    numel = shapes["x"][0] * shapes["x"][1] * shapes["x"][2]
    assert numel <= 2 * guards.MAX_ELEMENTS, shapes
    assert guards.reach(spelling, meta) == "cut"  # 2^31 elements: no kernel run at the real shape on CPU
    # and the check itself runs cut: [64, 256, 64] inputs (1M elements) pass on a slice
    # (where they are over the budget for a whole check and the kernel's real shape)
    monkeypatch.setattr(guards, "WHOLE_ELEMENTS", {"cpu": 1 << 20})
    monkeypatch.setattr(guards, "REAL_SIZE_ELEMENTS", {"cpu": 1 << 20})
    values = {"x": torch.empty(64, 256, 64), "residual": torch.empty(64, 256, 64), "w": torch.empty(64), "eps": 1e-6}
    assert guards.input_shapes(spelling, values)["x"][0] < 64
    result = guards.check(spelling, values, ("bundled:rmsnorm", "bundled:rmsnorm"), backward=True)
    assert result.passed and result.comparisons, result.summary()
    assert result.reach.startswith("cut to x [") and result.reach != "cut to x [64, 256, 64]", result.reach


# Raises at the guard's cut sizes (a bounds check that cut inputs do not satisfy), right at
# full size: the guard must check again uncut, and the kernel must stay on afterwards.
RAISES_WHEN_CUT = """
        if x.shape[-2] < 256:
            raise ValueError(f"cut input {tuple(x.shape)}")
        return _ok.rms_norm_forward(x, weight, eps, weight_offset, cast_before_scale, residual)"""


def test_kernel_error_at_cut_sizes_is_checked_uncut_and_stays_on(clean, tmp_path, monkeypatch):
    spec = make_repo(tmp_path, "raises_when_cut", RAISES_WHEN_CUT)
    monkeypatch.setattr(guards, "MAX_ELEMENTS", 2**12)
    monkeypatch.setattr(guards, "WHOLE_ELEMENTS", {"cpu": 0})
    monkeypatch.setattr(guards, "REAL_SIZE_ELEMENTS", {"cpu": 0})  # no run at the real shape: cut
    model, x = UserNorm(65), torch.randn(2, 256, 65)
    out = compile_and_run(model, x, kernels={"rmsnorm": spec})
    (record,) = clean
    (_, _, result), = record.guards["rmsnorm"]
    assert record.replaced["rmsnorm"] == 1 and result.passed, result.summary()
    assert kernels._impls[(spec, "rms_norm_forward", x.device)] is not kernels._FALLBACK  # still the kernel
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_guard_fails_for_a_kernel_that_already_fell_back(clean, tmp_path):
    """A kernel that raised earlier in the process runs its reference from then on; the
    guard must not pass it by comparing the reference with itself."""
    spec = make_repo(tmp_path, "correct_but_off", CORRECT)
    model, x = UserNorm(), torch.randn(2, 7, 33)
    kernels._impls[(spec, "rms_norm_forward", x.device)] = kernels._FALLBACK
    out = compile_and_run(model, x, kernels={"rmsnorm": spec})
    (record,) = clean
    assert record.replaced["rmsnorm"] == 0
    (_, reason), = record.refused["rmsnorm"]
    assert "already fell back to its reference" in reason, reason
    torch.testing.assert_close(out, model(x))


def test_a_size_shared_with_another_dim_is_not_cut():
    """Causal conv1d's x is [batch, channels, sequence]: with channels == sequence, cutting
    the sequence would cut the channels (and the weight and bias would not fit)."""
    from hubcompile.patterns import causal_conv1d

    spelling = causal_conv1d.FAMILY.stages[0][0]
    meta = {name: torch.empty(shape, device="meta") for name, shape in
            (("x", (8, 2048, 2048)), ("w", (2048, 1, 4)), ("b", (2048,)))}
    values = {n: meta.get(n, 0) for n in spelling.search.__code__.co_varnames[:spelling.search.__code__.co_argcount]}
    shapes = guards.input_shapes(spelling, values)
    assert shapes["x"][1:] == [2048, 2048] and shapes["x"][0] < 8, shapes
