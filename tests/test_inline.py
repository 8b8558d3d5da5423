"""Bundled Triton kernels traced into Inductor's graph on CUDA (hubcompile/passes/inline.py).

On CPU: the splice itself, on a graph of fake CUDA tensors, in a subprocess without
Triton's interpreter (``wrap_triton`` takes compiled kernels only), with Triton's
mutation analysis (which needs a GPU driver) told which arguments each kernel writes;
and every case that must leave the op in place. On a GPU: a compiled block's forward
and gradients against float64, inlined and not, and Inductor's code launching the
kernels itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from hubcompile.lowering import kernels
from hubcompile.passes import inline
from numerics import assert_close_to_reference

CUDA = torch.cuda.is_available()

SPLICE = textwrap.dedent("""
    import sys

    import torch
    import torch._higher_order_ops.triton_kernel_wrap as wrap
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    import hubcompile  # noqa: F401 - the ops
    from hubcompile.lowering import kernels
    from hubcompile.passes import inline
    from hubcompile.lowering.device import DeviceInfo

    WRITES = {"_gated_fwd_kernel": ["O"], "_gated_bwd_kernel": ["DG", "DU"], "_rms_norm_fwd_kernel": ["Y", "RSTD"],
              "_rms_norm_bwd_kernel": ["DH", "DW_PARTIAL"], "_rotary_kernel": ["out_ptr"],
              "_causal_conv1d_fwd_kernel": ["out_ptr"],
              "_causal_conv1d_bwd_kernel": ["dx_ptr", "dw_part_ptr", "db_part_ptr"],
              "_layer_norm_fwd_kernel": ["Y", "MEAN", "RSTD"], "_layer_norm_bwd_kernel": ["DH", "DW_PARTIAL", "DB_PARTIAL"]}

    def written(kernel_idx, constant_args_idx, kwargs, tma):
        k = wrap.kernel_side_table.get_kernel(kernel_idx)
        while hasattr(k, "fn"):
            k = k.fn
        if k.__name__ in ("_rms_norm_fwd_kernel", "_layer_norm_fwd_kernel") and \
                wrap.kernel_side_table.get_constant_args(constant_args_idx).get("HAS_RESIDUAL"):
            return [*WRITES[k.__name__], "H"]  # the fused residual add writes the sum too
        return WRITES[k.__name__]

    wrap.get_mutated_tensors = written  # Triton's analysis needs a GPU driver
    kernels.detect = lambda device: DeviceInfo("cuda", (9, 0), "fake")
    kernels.load("bundled:rmsnorm", DeviceInfo("cuda"))
    next(m for name, m in sys.modules.items() if name.endswith("_rmsnorm_triton"))._sm_count = lambda index: 132
    kernels.load("bundled:layer-norm", DeviceInfo("cuda"))
    next(m for name, m in sys.modules.items() if name.endswith("_layer_norm_triton"))._sm_count = lambda index: 132

    with FakeTensorMode():
        g = torch.empty(3, 5, 64, device="cuda", dtype=torch.bfloat16)
        u = torch.empty(3, 5, 64, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(64, device="cuda", dtype=torch.bfloat16)
        # q as a Llama lays it out: [B, S, H, D] transposed to [B, H, S, D]
        q = torch.empty(3, 5, 4, 16, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        cos = torch.empty(3, 1, 5, 16, device="cuda", dtype=torch.bfloat16)
        xc = torch.empty(3, 64, 5, device="cuda", dtype=torch.bfloat16)
        wc = torch.empty(64, 4, device="cuda", dtype=torch.bfloat16)
        bc = torch.empty(64, device="cuda", dtype=torch.bfloat16)

    def step(g, u, w, q, cos, xc, wc, bc):
        out = torch.ops.hubcompile.gated_activation(g, u, "silu", "bundled:activation", "bundled:activation")
        dg, du = torch.ops.hubcompile.gated_activation_backward(out, g, u, "silu", "bundled:activation")
        y, rstd = torch.ops.hubcompile.rms_norm(dg, w, 1e-6, 0.0, True, None, "bundled:rmsnorm", "bundled:rmsnorm")
        # its bf16 dweight is cast from fp32 partial sums: a _to_copy to decompose
        dx, dw = torch.ops.hubcompile.rms_norm_backward(y, dg, w, rstd, 1e-6, 0.0, True, None, None,
                                                        "bundled:rmsnorm")
        y2, _ = torch.ops.hubcompile.rms_norm(dx, w, 1e-6, 0.0, True, None, "bundled:rmsnorm", "bundled:rmsnorm")
        qr = torch.ops.hubcompile.rotary(q, cos, cos, False, "bundled:rotary", "bundled:rotary")
        dq = torch.ops.hubcompile.rotary_backward(qr, cos, cos, False, "bundled:rotary")
        c = torch.ops.hubcompile.causal_conv1d(xc, wc, bc, True, "bundled:causal-conv1d", "bundled:causal-conv1d")
        dxc, dwc, dbc = torch.ops.hubcompile.causal_conv1d_backward(c, xc, wc, bc, True, "bundled:causal-conv1d")
        # the residual add fused into the norm; the gate of one fused gate/up projection
        y3, h, _ = torch.ops.hubcompile.add_rms_norm(g, u, w, 1e-6, 0.0, True, None, "bundled:rmsnorm",
                                                     "bundled:rmsnorm")
        f = torch.ops.hubcompile.gated_activation_fused(g, "silu", "bundled:activation", "bundled:activation")
        df = torch.ops.hubcompile.gated_activation_fused_backward(f, g, "silu", "bundled:activation")
        # LayerNorm with weight and bias, its backward, and the fused add without a bias
        ln = "bundled:layer-norm"
        y4, mean4, rstd4 = torch.ops.hubcompile.layer_norm(g, w, w, 1e-5, ln, ln)
        dx4, dw4, db4 = torch.ops.hubcompile.layer_norm_backward(y4, g, w, w, mean4, rstd4, 1e-5, None, ln)
        y5, h5, _, _ = torch.ops.hubcompile.add_layer_norm(g, u, w, None, 1e-5, ln, ln)
        return out * 2, y, rstd, du, dx, dw, y2, qr, dq, c, dxc, dwc, dbc, y3, h, f, df, y4, dx4, dw4, db4, y5, h5

    traces = []
    trace = inline._trace
    inline._trace = lambda *args: traces.append(args[0].__name__) or trace(*args)
    gm = make_fx(step, decomposition_table=select_decomp_table())(g, u, w, q, cos, xc, wc, bc)  # as Inductor's
    layout = [(n.meta["val"].shape, n.meta["val"].stride()) for n in gm.graph.find_nodes(op="output")[0].args[0]]
    launches = {}
    print("inlined", inline.inline_bundled_kernels(gm.graph, launches), "traced", len(traces))
    print("launches", sorted(launches.items()))
    gm.graph.lint()
    after = [(n.meta["val"].shape, n.meta["val"].stride()) for n in gm.graph.find_nodes(op="output")[0].args[0]]
    assert layout == after, (layout, after)
    # the rotated q keeps q's transposed layout, with no copy on the way
    print("copies", sum(str(n.target).startswith(("aten.clone", "aten.copy")) for n in gm.graph.nodes))
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    print("hubcompile ops left", sum("hubcompile" in t for t in targets))
    print("kernel launches", sum("triton_kernel_wrapper_functional" in t for t in targets))
    print("mutations", sum(n.target._schema.is_mutable for n in gm.graph.nodes
                           if isinstance(n.target, torch._ops.OpOverload)))
    # Inductor has no lowering for ops it always decomposes (a bf16 _to_copy failed on the H200)
    print("undecomposed", [t for t in targets if "_to_copy" in t])
""")


def test_splice_puts_the_kernel_launches_in_place_of_the_ops():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SPLICE], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if not line.startswith("W")]
    launches = ("launches [('add_layer_norm', {'Inductor': 1}), ('add_rms_norm', {'Inductor': 1}), "
                "('causal_conv1d', {'Inductor': 1}), "
                "('causal_conv1d_backward', {'Inductor': 1}), ('gated_activation', {'Inductor': 1}), "
                "('gated_activation_backward', {'Inductor': 1}), ('gated_activation_fused', {'Inductor': 1}), "
                "('gated_activation_fused_backward', {'Inductor': 1}), ('layer_norm', {'Inductor': 1}), "
                "('layer_norm_backward', {'Inductor': 1}), ('rms_norm', {'Inductor': 2}), "
                "('rms_norm_backward', {'Inductor': 1}), ('rotary', {'Inductor': 1}), ('rotary_backward', {'Inductor': 1})]")
    assert lines == ["inlined 15 traced 14", launches, "copies 0", "hubcompile ops left 0", "kernel launches 15",
                     "mutations 0", "undecomposed []"], run.stdout


def _graph(spec: str, dynamic: bool = False):
    from torch.fx.experimental.proxy_tensor import make_fx

    def norm(x, w):
        return torch.ops.hubcompile.rms_norm(x, w, 1e-6, 0.0, True, None, spec, spec)[0]

    return make_fx(norm, tracing_mode="symbolic" if dynamic else "fake")(torch.randn(3, 5, 8), torch.randn(8)).graph


@pytest.mark.parametrize("case", ["cpu", "reference", "symbolic", "runtime_checks"])
def test_the_op_stays_where_inductor_cannot_launch_the_kernel(case, monkeypatch):
    """CPU tensors, the reference (or any non-bundled kernel), symbolic shapes and runs
    with runtime checks keep the op: nothing is traced."""
    if case == "runtime_checks":
        monkeypatch.setitem(kernels._runtime_checks, "n", 2)
    graph = _graph("reference" if case == "reference" else "bundled:rmsnorm", dynamic=case == "symbolic")
    launches = {}
    assert inline.inline_bundled_kernels(graph, launches) == 0
    assert any("hubcompile.rms_norm" in str(n.target) for n in graph.nodes)
    why = {"cpu": "not on a GPU (Inductor launches Triton kernels on GPUs only)", "reference": "the eager reference",
           "symbolic": "symbolic shapes", "runtime_checks": "runtime_checks compare each call with the reference"}[case]
    assert launches == {"rms_norm": {f"op: {why}": 1}}


def test_a_call_that_cannot_be_traced_stays_an_op(monkeypatch, caplog):
    """A kernel function that fails while traced leaves its op, with one log line."""
    monkeypatch.setattr(inline, "_candidate", lambda node, op: (
        (lambda **kw: 1 / 0, {"x": node.args[0]}, {"x": node.args[0].meta["val"]}, False)))
    graph = _graph("bundled:rmsnorm")
    launches = {}
    with caplog.at_level("INFO", logger="hubcompile.passes.inline"):
        assert inline.inline_bundled_kernels(graph, launches) == 0
    assert "rms_norm stays an op (ZeroDivisionError" in caplog.text
    assert launches == {"rms_norm": {"op: its kernel could not be traced (ZeroDivisionError)": 1}}
    assert any("hubcompile.rms_norm" in str(n.target) for n in graph.nodes)


def test_inline_kernels_option_is_validated():
    import hubcompile

    with pytest.raises(ValueError, match="inline_kernels"):
        hubcompile.configure(inline_kernels="sometimes")


class Block(torch.nn.Module):
    """RMSNorm, rotary-free SwiGLU MLP and a second RMSNorm: the ops a Llama layer inlines."""

    def __init__(self, d=256, hidden=688):
        super().__init__()
        self.w1, self.w2 = torch.nn.Parameter(torch.randn(d) * 0.1 + 1), torch.nn.Parameter(torch.randn(d) * 0.1 + 1)
        self.gate, self.up = torch.nn.Linear(d, hidden, bias=False), torch.nn.Linear(d, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, d, bias=False)

    @staticmethod
    def _norm(x, w):
        h = x.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    def forward(self, x):
        h = self._norm(x, self.w1)
        return self._norm(x + self.down(F.silu(self.gate(h)) * self.up(h)), self.w2)


@pytest.mark.skipif(not CUDA, reason="Inductor launches Triton kernels on GPUs only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inlined_block_matches_float64_and_inductor_launches_the_kernels(dtype, fresh):
    from torch._inductor.utils import run_and_get_code

    import hubcompile  # noqa: F401

    torch.manual_seed(0)
    model = Block().cuda().to(dtype)
    ref = Block().cuda().double()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 33, 256, device="cuda", dtype=dtype, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    ref(x64).sum().backward()
    results = {}
    for inline_kernels in (True, False):
        torch._dynamo.reset()
        model.zero_grad()
        x.grad = None
        compiled = torch.compile(model, backend="hubkernels",
                                 options={"perf_guard": "off", "inline_kernels": inline_kernels})
        out, code = run_and_get_code(lambda: compiled(x))
        out.sum().backward()
        results[inline_kernels] = (out.detach(), x.grad.clone(), model.w1.grad.clone(), "\n".join(code))
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for inline_kernels, (out, dx, dw1, code) in results.items():
        torch.testing.assert_close(out.double(), ref(x64).detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(dx.double(), x64.grad, rtol=tol, atol=tol * 10)
        torch.testing.assert_close(dw1.double(), ref.w1.grad, rtol=tol, atol=tol * 50)
    inlined, opaque = results[True][3], results[False][3]
    # opaque: the ops' twins without the custom-op wrapper (lowering/direct_ops.py)
    assert "hubcompile_direct.rms_norm" in opaque and "hubcompile_direct.gated_activation" in opaque
    assert ".rms_norm.default" not in inlined and ".gated_activation.default" not in inlined
    assert "_rms_norm_fwd_kernel" in inlined and "_gated_fwd_kernel" in inlined


def test_a_compile_that_fails_with_inlined_kernels_is_done_again_without(monkeypatch, caplog):
    """Compilation never fails because of a kernel: an Inductor error with the kernels
    inlined (a Triton compile error, say) compiles the graph again with the ops. The
    backward is compiled in the same call (not at the first backward), so its errors
    are caught there too."""
    import torch._inductor.compile_fx as inductor
    from torch._functorch import config as functorch_config

    from hubcompile.passes import pipeline

    calls = []

    def compile_fx(gm, example_inputs, config_patches):
        inlined = config_patches["post_grad_custom_pre_pass"].why_not is None
        calls.append((inlined, functorch_config.force_non_lazy_backward_lowering))
        if inlined:
            raise RuntimeError("Triton could not compile _rms_norm_fwd_kernel")
        return "compiled with the ops"

    monkeypatch.setattr(inductor, "compile_fx", compile_fx)
    with caplog.at_level("WARNING", logger="hubcompile.passes.pipeline"):
        fn = pipeline.compile_graph(None, [], {}, pipeline.HubcompilePass(None), why_not=None)
    assert fn == "compiled with the ops"
    assert calls == [(True, True), (False, False)]
    assert "compiling again with them called through their ops" in caplog.text


# The Triton kernel each replaced op launches, as Inductor's generated code names it.
KERNELS = {"rms_norm": "_rms_norm_fwd_kernel", "add_rms_norm": "_rms_norm_fwd_kernel",
           "rms_norm_backward": "_rms_norm_bwd_kernel", "gated_activation": "_gated_fwd_kernel",
           "gated_activation_backward": "_gated_bwd_kernel", "rotary": "_rotary_kernel",
           "rotary_backward": "_rotary_kernel", "causal_conv1d": "_causal_conv1d_fwd_kernel",
           "causal_conv1d_backward": "_causal_conv1d_bwd_kernel", "layer_norm": "_layer_norm_fwd_kernel",
           "add_layer_norm": "_layer_norm_fwd_kernel", "layer_norm_backward": "_layer_norm_bwd_kernel"}


def _model(name, dtype):
    import copy

    if name in ("llama", "gpt_neox"):
        from tiny_models import build

        model = build(name, dtype)[0]
    else:
        from test_causal_conv1d import _mamba

        model = _mamba("mamba", dtype, layers=1)
    return model.cuda().train(), copy.deepcopy(model).cuda().double().train()


@pytest.mark.skipif(not CUDA, reason="Inductor launches Triton kernels on GPUs only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["llama", "mamba", "gpt_neox"])
def test_every_bundled_kernel_of_a_training_step_is_launched_by_inductor(name, dtype, fresh):
    """By default on a GPU: every replaced call of a training step, forward and backward,
    is a kernel launch in Inductor's code (no hubcompile op left), with the loss and the
    gradients against float64 as the eager model's."""
    from torch._inductor.utils import run_and_get_code

    from tiny_models import replaced

    model, ref = _model(name, dtype)
    ids = torch.randint(3, 64, (2, 11), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def step(m, run):
        m.zero_grad(set_to_none=True)
        loss = run(ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    eager = step(model, model)
    ref_loss, ref_grads = step(ref, ref)
    compiled = torch.compile(model, backend="hubkernels", options={"perf_guard": "off"})
    (loss, grads), codes = run_and_get_code(lambda: step(model, compiled))
    code = "\n".join(codes)
    launches = {}
    for record in fresh:
        for op, ways in record.launches.items():
            for how, n in ways.items():
                launches.setdefault(op, {}).setdefault(how, 0)
                launches[op][how] += n
    assert replaced(fresh), "nothing replaced"
    assert all(set(ways) == {"Inductor"} for op, ways in launches.items() if op in KERNELS), launches
    # (Mamba's conv is replaced in its forward; its backward stays Inductor's convolution_backward.)
    expected = {"mamba": {"causal_conv1d", "rms_norm", "rms_norm_backward"},
                "gpt_neox": {"layer_norm", "add_layer_norm", "layer_norm_backward", "rotary"},
                "llama": {"rms_norm", "rms_norm_backward", "gated_activation", "gated_activation_backward", "rotary"}}
    assert {op for op in launches if op in KERNELS} >= expected[name]
    for op in launches:
        if op in KERNELS:
            assert KERNELS[op] in code, (op, KERNELS[op])
            assert f"hubcompile_direct.{op}.default" not in code and f"hubcompile.{op}.default" not in code
    assert_close_to_reference(loss, eager[0], ref_loss, dtype, "loss")
    for pname, g in grads.items():
        assert_close_to_reference(g, eager[1][pname], ref_grads[pname], dtype, pname)
