"""Host time per call of the replaced ops, against Inductor's own kernel launches.

    python bench/host_cost.py --out DIR [--families rmsnorm,rotary] [--k 32] [--n 200] [--reps 5]
                              [--directions fwd,fwd+bwd] [--small]

Families: rmsnorm (Llama's spelling), add_rmsnorm (residual add, then that norm; returns
both), silu_gate (``F.silu(g) * u``), silu_gate_fused (``a, b = x.chunk(2, -1)``),
rotary (Llama's ``q * cos + rotate_half(q) * sin`` on q and k) and causal_conv1d
(depthwise conv1d, ``padding=W-1``, sliced back, then SiLU; W=4), each forward (under
no_grad) and forward+backward (``.sum().backward()``, grads set to None every step).

The trick: tiny shapes (1 token x 2048 for norms and gates, rotary q/k [1, 32, 1, 64], conv
[1, 64, 8]), so the GPU work of a kernel is negligible and a step is host-bound, and a
module that chains K copies of the op, so that per-call costs can be told from the step's
fixed costs (Dynamo's guards, the AOTAutograd wrappers, autograd's engine). The links share
their weights (see the modules below).

Timing, profiler-free: a step runs N times with one ``torch.cuda.synchronize()`` at the
end (none in between); step time = elapsed / N; median, min and max over ``--reps`` such
runs (``step_us``). Its ``host_median`` reads the same clock before that synchronize: where
it is well below the median, the GPU, not the host, was the bottleneck.

Calls are counted in the code Inductor generates for the step (every module, forward and
backward, caught as ``torch._inductor.utils.run_and_get_code`` catches them). In each
module: the kernels it defines (``NAME = async_compile.triton(...)``,
``.cpp_pybinding(...)``) and every call of one of them (``NAME.run(...)`` on GPU,
``NAME(...)`` on CPU), plus library calls (``extern_kernels.convolution(...)``) =
``launches``; ops called from the wrapper (``torch.ops.hubcompile_direct.rms_norm.default(...)``,
aten fallbacks) = ``op_calls``; kernel sources (triple-quoted) and comments skipped.
calls = launches + op_calls. On CUDA, ``kernels_profiled`` counts the kernels one step ran
on the device (torch.profiler): those an op launches inside too, and in training the few
of the loss's sum and its gradient, outside the graph.

Per call, with the step's fixed costs removed: every variant is compiled twice (after a
``torch._dynamo.reset()``), chains of K and 2K links, timed in turns, and what the K extra
links cost is divided by the calls they add:
us_per_call = (T(2K) - T(K)) / (calls(2K) - calls(K)), T the fastest rep of a chain (noise
on a host only adds time); us_per_link = the same over K.
(A difference against the family disabled would not do: Inductor's code for a chain is
one or two fused kernels, and a replaced conv1d + SiLU is one call where Inductor makes
two.) The variants:
  - inductor: ``torch.compile(m)``. It fuses a whole chain of norms, gates or rotations
    into one kernel, so its launches do not grow with the chain; its row's us_per_call
    (Inductor's µs per launch) comes from the same chain compiled with
    ``options={"max_fusion_size": 1}`` (every scheduler node its own kernel; in the row
    under ``unfused``). The row's own launches and us_per_link are the plain compile's.
    causal_conv1d has nothing to unfuse: a link is cuDNN's convolution
    (``extern_kernels.convolution``) and one Triton kernel either way, so its "launch" is
    the mean of the two;
  - hubkernels: ``{"perf_guard": "off", "inline_kernels": True, "min_elements": 0}``, Inductor launches the
    bundled Triton kernels itself;
  - hubkernels-ops: ``{"perf_guard": "off", "inline_kernels": False, "min_elements": 0}``, each replacement
    an op, called through its ``hubcompile_direct`` twin.
A call's cost includes what comes with it in the generated code (its output's
allocation) and, in training, what its link costs besides: the tensors it saves for the
backward pass through AOTAutograd and autograd, a cost plain Inductor's fused code pays
per link too. ``us_per_call_net`` takes that out: (us_per_link - us_per_link(inductor)) /
(calls_per_link - calls_per_link(inductor)), where plain Inductor's links add under half
a call each (all but causal_conv1d). ``us_per_call_spread`` pairs the extremes of both
chains' reps; ``ratio_to_inductor_launch`` (``_net``) = us_per_call (``_net``) / Inductor's
µs per launch (``_net``) for the same family and direction.

Records (``DIR/host_cost.jsonl``, appended to): one per impl (inductor, hubkernels,
hubkernels-ops), family and direction, with the fields above, ``lat_ms`` the K chain's
step time, ``launches``/``op_calls``/``replaced`` its compile's, and under ``measured``
(and the inductor row's ``unfused``) both chains in full. A table at the end.

Cost: compiles dominate, a few minutes per family on an H200 (8 compiles each direction,
the plain Inductor backward of 64 links among the slowest); where one command may run 10
minutes, give each run two families with ``--families``: the runs append to one file.

On CPU (``--small``, a smoke test: K=3, N=5, 2 reps) Inductor cannot launch Triton
kernels, so both hubkernels rows go through the ops and the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

# A cached graph skips hubcompile's passes (nothing recorded as replaced) and the code
# generation that the calls are counted from. Set before torch is imported.
os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._inductor.graph import GraphLowering  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hubcompile  # noqa: E402
from common import Records  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16
if not CUDA:
    torch.set_num_threads(1)  # the smoke test's tiny C++ kernels: OpenMP's threads cost ms there, not µs
HIDDEN, HEADS, HEAD_DIM, CHANNELS, CONV_LEN, CONV_W = 2048, 32, 64, 64, 8, 4


# ------------------------------------------------------------------ the spellings


def rmsnorm(x, w, eps=1e-6):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _param(*shape, scale=1.0, offset=0.0):
    return torch.nn.Parameter(offset + scale * torch.randn(*shape, device=DEVICE, dtype=DTYPE))


# The links of a chain share their weights: each link's input differs, so no two links
# are alike, and weights of their own would add to every link costs that are not calls
# (a guard and an input each, and in training an AccumulateGrad and a .grad reset).


class RMSNormChain(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k, self.w = k, _param(HIDDEN, scale=0.1, offset=1.0)

    def forward(self, x):
        for _ in range(self.k):
            x = rmsnorm(x, self.w)
        return x


class AddRMSNormChain(torch.nn.Module):
    """The residual stream of a decoder: res = x + res; x = norm(res)."""

    def __init__(self, k):
        super().__init__()
        self.k, self.w = k, _param(HIDDEN, scale=0.1, offset=1.0)

    def forward(self, x, res):
        for _ in range(self.k):
            res = x + res
            x = rmsnorm(res, self.w)
        return x, res


class SiluGateChain(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k, self.u = k, _param(1, HIDDEN)

    def forward(self, g):
        for _ in range(self.k):
            g = F.silu(g) * self.u
        return g


class SiluGateFusedChain(torch.nn.Module):
    """The op halves its input, so its links cannot chain: link i takes row i of xs
    [K, 2 * HIDDEN], and the results are summed (Inductor fuses the adds into one kernel)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, xs):
        acc = None
        for i in range(self.k):
            a, b = xs[i : i + 1].chunk(2, -1)
            y = F.silu(a) * b
            acc = y if acc is None else acc + y
        return acc


class RotaryChain(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, D], as Llama broadcasts them
        for _ in range(self.k):
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        return q, k


class CausalConv1dChain(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k, self.w, self.b = k, _param(CHANNELS, 1, CONV_W, scale=0.5), _param(CHANNELS, scale=0.1)

    def forward(self, x):
        for _ in range(self.k):
            x = F.silu(F.conv1d(x, self.w, self.b, padding=CONV_W - 1, groups=CHANNELS)[..., : x.shape[-1]])
        return x


def _randn(*shape, grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE, requires_grad=grad)


# name -> (hubcompile's family, module class, inputs(k, grad) -> list, one op's input shape)
FAMILIES = {
    "rmsnorm": ("rmsnorm", RMSNormChain, lambda k, g: [_randn(1, HIDDEN, grad=g)], [1, HIDDEN]),
    "add_rmsnorm": ("rmsnorm", AddRMSNormChain,
                    lambda k, g: [_randn(1, HIDDEN, grad=g), _randn(1, HIDDEN, grad=g)], [1, HIDDEN]),
    "silu_gate": ("silu_gate", SiluGateChain, lambda k, g: [_randn(1, HIDDEN, grad=g)], [1, HIDDEN]),
    "silu_gate_fused": ("silu_gate", SiluGateFusedChain, lambda k, g: [_randn(k, 2 * HIDDEN, grad=g)],
                        [1, 2 * HIDDEN]),
    # cos/sin come from buffers without grad, as in the models (the op differentiates q, k only)
    "rotary": ("rotary", RotaryChain,
               lambda k, g: [_randn(1, HEADS, 1, HEAD_DIM, grad=g), _randn(1, HEADS, 1, HEAD_DIM, grad=g),
                             _randn(1, 1, HEAD_DIM), _randn(1, 1, HEAD_DIM)], [1, HEADS, 1, HEAD_DIM]),
    "causal_conv1d": ("causal_conv1d", CausalConv1dChain, lambda k, g: [_randn(1, CHANNELS, CONV_LEN, grad=g)],
                      [1, CHANNELS, CONV_LEN]),
}


# name -> options of every compile measured
VARIANTS = {
    "inductor": ("inductor", None),
    # every scheduler node its own kernel, so that Inductor's launches grow with the chain
    "inductor-unfused": ("inductor", {"max_fusion_size": 1}),
    # min_elements 0: the chains' tensors are tiny on purpose, and must still be replaced
    "hubkernels": ("hubkernels", {"perf_guard": "off", "inline_kernels": True, "min_elements": 0}),
    "hubkernels-ops": ("hubkernels", {"perf_guard": "off", "inline_kernels": False, "min_elements": 0}),
}


# ------------------------------------------------------------------ counting calls

_SOURCE = re.compile(r"r?'''.*?'''", re.DOTALL)  # kernel sources inside the module
_DEFINED = re.compile(r"^(\w+) = async_compile\.\w+\(", re.MULTILINE)
_EXTERN = re.compile(r"\bextern_kernels\.\w+\(")
_OP = re.compile(r"(?:\btorch\.ops\.(\w+)|(?<![\w.])(aten))\.\w+(?:\.\w+)?\(")  # also the wrapper's alias aten.


def count_calls(codes: list[str]) -> dict:
    """Kernel launches and op calls in Inductor's generated modules (the docstring says how)."""
    launches = op_calls = 0
    ops: dict[str, int] = {}
    for code in codes:
        names = set(_DEFINED.findall(code))
        body = "\n".join(line for line in _SOURCE.sub("''", code).splitlines() if not line.lstrip().startswith("#"))
        for name in names:
            launches += len(re.findall(rf"\b{re.escape(name)}(?:\.run)?\(", body))
        launches += len(_EXTERN.findall(body))
        for namespace in (a or b for a, b in _OP.findall(body)):
            op_calls += 1
            ops[namespace] = ops.get(namespace, 0) + 1
    return {"launches": launches, "op_calls": op_calls, "calls": launches + op_calls, "op_namespaces": ops,
            "graphs": len(codes)}


def kernels_profiled(step) -> int | None:
    """Kernels one step ran on the device (None off CUDA)."""
    if not CUDA:
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


# ------------------------------------------------------------------ timing


def make_step(module, fn, inputs: list, direction: str):
    if direction == "fwd":
        def step():
            with torch.no_grad():
                return fn(*inputs)
        return step
    leaves = [t for t in [*inputs, *module.parameters()] if t.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        out = fn(*inputs)
        loss = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
        loss.backward()
    return step


def sync():
    if CUDA:
        torch.cuda.synchronize()


def time_steps(steps: list, n: int, reps: int) -> list[dict]:
    """µs per step of each of ``steps`` over ``reps`` runs of ``n`` steps, one synchronize
    at the end of each run. The steps take turns, so that drift and the host's noise fall
    on all of them alike."""
    for step in steps:
        for _ in range(max(5, n // 4)):  # first calls: Triton's autotuning and lazy loads
            step()
    sync()
    walls: list[list[float]] = [[] for _ in steps]
    hosts: list[list[float]] = [[] for _ in steps]
    gc.collect()
    gc.disable()  # a collection inside a run would land on one of them
    try:
        for _ in range(reps):
            for i, step in enumerate(steps):
                start = time.perf_counter()
                for _ in range(n):
                    step()
                host = time.perf_counter()
                sync()
                end = time.perf_counter()
                walls[i].append((end - start) / n * 1e6)
                hosts[i].append((host - start) / n * 1e6)
    finally:
        gc.enable()
    return [{"median": statistics.median(w), "min": min(w), "max": max(w), "reps": w,
             "host_median": statistics.median(h)} for w, h in zip(walls, hosts)]


def compile_chain(fam: str, direction: str, variant: str, k: int):
    """(step, what its compile made) for a ``k``-link chain, compiled at its first call."""
    _, chain, make_inputs, _ = FAMILIES[fam]
    backend, options = VARIANTS[variant]
    torch.manual_seed(0)
    module = chain(k)
    inputs = make_inputs(k, direction == "fwd+bwd")
    # dynamic=False: the second chain length is a recompile, which must not turn dynamic
    fn = torch.compile(module, backend=backend, options=options, dynamic=False)
    step = make_step(module, fn, inputs, direction)
    before = len(hubcompile.RECORDS)
    codes: list[str] = []
    # What torch._inductor.utils.run_and_get_code does, without its Dynamo reset (the
    # other chain length stays compiled).
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        start = time.perf_counter()
        step()
        sync()
        compile_s = time.perf_counter() - start
    replaced: dict[str, int] = {}
    for record in hubcompile.RECORDS[before:]:
        for name, count in record.replaced.items():
            if count:
                replaced[name] = replaced.get(name, 0) + count
    return step, {"K": k, "compile_s": compile_s, "replaced": replaced, **count_calls(codes)}


def measure(fam: str, direction: str, variant: str, args) -> list[dict]:
    """One variant at both chain lengths, compiled after a Dynamo reset and timed in turns."""
    torch._dynamo.reset()
    hubcompile.RECORDS.clear()
    chains = [compile_chain(fam, direction, variant, k) for k in (args.k, 2 * args.k)]
    for (step, m), t in zip(chains, time_steps([step for step, _ in chains], args.n, args.reps)):
        m["step_us"], m["kernels_profiled"] = t, kernels_profiled(step)
        print(f"{fam:16} {direction:8} {variant:17} K={m['K']:<3} step {t['median']:9.1f} us "
              f"[{t['min']:.1f}, {t['max']:.1f}] (host {t['host_median']:.1f}), launches {m['launches']:3d}, "
              f"op calls {m['op_calls']:3d}, profiled {m['kernels_profiled']}, replaced {m['replaced']}, "
              f"compile {m['compile_s']:.1f} s", flush=True)
    return [m for _, m in chains]


def slope(short: dict, long: dict) -> dict:
    """What the links the long chain has over the short one cost: per link, and per call
    where they add calls. The step's fixed costs cancel. Each chain's fastest rep: on a
    host, noise only adds time. The spread pairs the extremes of both chains' reps."""
    links, calls = long["K"] - short["K"], long["calls"] - short["calls"]
    a, b = long["step_us"], short["step_us"]
    cost = {"us_per_link": (a["min"] - b["min"]) / links, "calls_per_link": calls / links,
            "us_per_call": None, "us_per_call_spread": None}
    if calls > 0:
        cost["us_per_call"] = (a["min"] - b["min"]) / calls
        cost["us_per_call_spread"] = [(a["min"] - b["max"]) / calls, (a["max"] - b["min"]) / calls]
    return cost


# ------------------------------------------------------------------ main


def net(cost: dict, plain: dict | None) -> float | None:
    """µs per call beyond what plain Inductor's code pays per link anyway (in training, the
    link's saved tensors); None where plain Inductor's links make calls too (conv1d)."""
    if plain is None or plain["calls_per_link"] >= 0.5:
        return None
    extra = cost["calls_per_link"] - plain["calls_per_link"]
    return (cost["us_per_link"] - plain["us_per_link"]) / extra if extra >= 0.5 else None


def run_case(fam: str, direction: str, args, records: Records, table: list) -> None:
    family, _, _, shape = FAMILIES[fam]
    wl = {"name": f"{fam}-{direction}-K{args.k}", "family": fam, "hubcompile_family": family,
          "direction": direction, "K": args.k, "K_long": 2 * args.k, "shape": shape,
          "dtype": str(DTYPE).removeprefix("torch."), "N": args.n, "reps": args.reps}
    done: dict = {}
    for variant in args.variants:
        try:
            pair = measure(fam, direction, variant, args)
            done[variant] = (pair, slope(*pair))
        except Exception as e:  # noqa: BLE001 - a failing variant is a result too
            print(f"{wl['name']} {variant}: FAILED {e!r}"[:500], flush=True)
            done[variant] = repr(e)[:500]
    costs = {variant: d[1] for variant, d in done.items() if isinstance(d, tuple)}
    plain, unfused = costs.get("inductor"), costs.get("inductor-unfused")
    launch = unfused and unfused["us_per_call"]
    launch_net = unfused and net(unfused, plain)
    row = {"family": fam, "direction": direction}
    for impl in ("inductor", "hubkernels", "hubkernels-ops"):
        if impl not in args.variants:
            continue
        if impl not in costs:
            records.add(impl, wl, None, ok=False, err=done[impl])
            continue
        (short, long), cost = done[impl]
        # Inductor's own row: its µs per launch, from the compile without fusion
        per = unfused if impl == "inductor" else cost
        us = per and per["us_per_call"]
        us_net = per and net(per, plain)
        ratio = us / launch if us is not None and launch else None
        ratio_net = us_net / launch_net if us_net is not None and launch_net else None
        if impl == "inductor":
            ok = us is not None
            extra = {"unfused": {"measured": done["inductor-unfused"][0], **unfused} if unfused
                     else done["inductor-unfused"]}
        else:
            ok, extra = us is not None and short["replaced"].get(family, 0) > 0, {}
        s = short["step_us"]
        lat = {"p50": s["median"] / 1e3, "min": s["min"] / 1e3, "max": s["max"] / 1e3, "reps": len(s["reps"])}
        records.add(impl, wl, lat, ok=ok, us_per_call=us, us_per_call_spread=per and per["us_per_call_spread"],
                    us_per_call_net=us_net, us_per_link=cost["us_per_link"], calls_per_link=cost["calls_per_link"],
                    launches=short["launches"], op_calls=short["op_calls"], replaced=short["replaced"],
                    ratio_to_inductor_launch=ratio, ratio_to_inductor_launch_net=ratio_net, measured=[short, long],
                    **extra)
        row[impl] = (us, ratio, us_net)
    table.append(row)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    parser.add_argument("--directions", default="fwd,fwd+bwd")
    parser.add_argument("--k", type=int, default=32, help="ops chained in one module")
    parser.add_argument("--n", type=int, default=200, help="steps per timed run")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)} (inductor's launch cost needs both of its own)")
    parser.add_argument("--small", action="store_true", help="CPU smoke test of this script: K=3, N=5, 2 reps")
    args = parser.parse_args()
    unknown = set(args.families.split(",")) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown --families {', '.join(sorted(unknown))}; choose from {', '.join(FAMILIES)}")
    args.variants = args.variants.split(",")
    if set(args.variants) - set(VARIANTS):
        parser.error(f"unknown --variants {', '.join(sorted(set(args.variants) - set(VARIANTS)))}; "
                     f"choose from {', '.join(VARIANTS)}")
    if args.small:
        args.k, args.n, args.reps = 3, 5, 2
    records = Records(os.path.join(args.out, "host_cost.jsonl"), run="host_cost")
    table: list = []
    for fam in args.families.split(","):
        for direction in args.directions.split(","):
            run_case(fam, direction, args, records, table)

    def cell(v, width=8):
        return f"{v:{width}.2f}" if v is not None else " " * (width - 1) + "-"

    print(f"\nhost us per call (chains of {args.k} and {2 * args.k} links, {args.n} steps x {args.reps} reps), "
          f"{records.env['gpu']}; net: less what plain Inductor pays per link")
    print(f"{'family':16} {'dir':8} {'Ind./launch':>11} {'hub/call':>8} {'x Ind.':>6} {'ops/call':>8} {'x Ind.':>6}"
          f" | {'net: Ind.':>9} {'hub':>8} {'ops':>8}")
    for r in table:
        ind, hub, ops = (r.get(impl, (None, None, None)) for impl in ("inductor", "hubkernels", "hubkernels-ops"))
        print(f"{r['family']:16} {r['direction']:8} {cell(ind[0], 11)} {cell(hub[0])} {cell(hub[1], 6)}"
              f" {cell(ops[0])} {cell(ops[1], 6)} | {cell(ind[2], 9)} {cell(hub[2])} {cell(ops[2])}")


if __name__ == "__main__":
    main()
