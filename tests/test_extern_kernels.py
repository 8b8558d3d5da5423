"""Hub function kernels traced into the graph (hubcompile/passes/inline.py): a compiled
repo's torch.library op becomes one extern kernel call in Inductor's code, and the
adapter's Python (allocation, contiguous) graph ops; on CPU too. The stand-in
(tests/standins/activation-ops) has kernels-community/activation's convention: an op that
writes ``out`` and has no fake implementation."""

from pathlib import Path

import torch
from torch._inductor.utils import run_and_get_code

from numerics import assert_close_to_reference
from small_modules import Phi3MLP

STANDIN = Path(__file__).parent / "standins" / "activation-ops"


def _compile(fresh, options):
    torch.manual_seed(0)
    model = Phi3MLP(hidden=16, inter=12)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        # Runtime checks (on by default for Hub kernels) keep an op an op: off, to judge the lowering.
        options = {"runtime_checks": 0, **options}
        out, code = run_and_get_code(torch.compile(model, backend="hubkernels", options=options), x)
        eager = model(x)
        ref = Phi3MLP(16, 12).double()
        ref.load_state_dict(model.state_dict())
        ref64 = ref(x.double())
    launches = {op: ways for r in fresh for op, ways in r.launches.items()}
    return out, eager, ref64, "\n".join(code), launches


def test_a_compiled_hub_op_is_an_extern_kernel_call(fresh):
    kernels = {"activation": [f"local:{STANDIN}#activation"]}
    out, eager, ref64, code, launches = _compile(fresh, {"perf_guard": "off", "kernels": kernels})
    assert launches == {"gated_activation_fused": {"Inductor: extern kernel": 1}}, launches
    assert "torch.ops._standin_activation_ops.silu_and_mul.default(" in code
    assert "hubcompile" not in code  # no op, no adapter Python: the repo's op alone
    assert_close_to_reference(out, eager, ref64, torch.float32, "output")


def test_inline_kernels_off_keeps_the_hub_kernel_behind_its_op(fresh):
    kernels = {"activation": [f"local:{STANDIN}#activation"]}
    out, eager, ref64, code, launches = _compile(fresh, {"perf_guard": "off", "kernels": kernels,
                                                         "inline_kernels": False})
    assert launches == {"gated_activation_fused": {"op: inline_kernels=False": 1}}, launches
    assert "hubcompile_direct.gated_activation_fused.default(" in code
    assert_close_to_reference(out, eager, ref64, torch.float32, "output")


def test_a_hub_kernel_whose_trace_runs_python_on_values_stays_an_op(fresh, monkeypatch, request):
    """Python that reads a tensor's values at trace time would not run again: refused."""
    from hubcompile.lowering import adapters
    from hubcompile.lowering import kernels as kernels_module

    original = adapters.Activation.gated_act_fused_forward

    def reads_values(self, x, activation):
        if x.abs().max() > 1e6:  # data-dependent: fails under fake tensors
            raise ValueError("too large")
        return original(self, x, activation)

    monkeypatch.setattr(adapters.Activation, "gated_act_fused_forward", reads_values)
    kernels_module.clear_cache()  # resolved functions are cached per process: the patched one, and
    request.addfinalizer(kernels_module.clear_cache)  # after the test, not the patched one
    kernels = {"activation": [f"local:{STANDIN}#activation"]}
    out, eager, ref64, code, launches = _compile(fresh, {"perf_guard": "off", "kernels": kernels})
    (how,) = launches["gated_activation_fused"]
    assert how.startswith("op: its kernel could not be traced"), launches
    assert_close_to_reference(out, eager, ref64, torch.float32, "output")
