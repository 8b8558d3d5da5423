"""Compile time of a whole model, cold and warm, each in a fresh process.

    python bench/compile_time.py --out DIR [--attn eager|sdpa] [--mode train|prefill]
                                 [--impls inductor,hubkernels-noguard,hubkernels] [--repeats 3]

What a user pays at the first call of a compiled model (Dynamo, AOTAutograd, Inductor,
and for hubkernels its passes, numerical guards and, where on, the performance guard):

- cold: a new machine. Each process gets empty Inductor, Triton and hubcompile caches
  (traced patterns, guard results, decisions), its own, so no implementation reads what
  another left;
- warm: the next process on that machine, the same compile with the caches the cold
  process left on disk (Inductor's FX-graph and AOTAutograd caches answer; hubcompile's
  passes do not run then, and their records are read back).

Repeats interleave the implementations (cold A, warm A, cold B, warm B, ...), so a slow
stretch of the machine falls on all of them. Each process also reports where its first
call spent its time (seconds inside a few named functions).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMPLS = ("inductor", "hubkernels-noguard", "hubkernels")

# Where the first call's time goes: (label, module, attribute path), the seconds spent
# inside each (outermost calls only), timed by wrapping it: a profiler would slow the
# Python-heavy parts (pattern tracing) far more than the rest.
PHASES = (
    ("backend (all)", "hubcompile.backend", "hubkernels"),
    # the compile waiting for the pattern-tracing workers (started before AOTAutograd)
    ("hub: wait for trace workers", "hubcompile.patterns.trace_cache", "Tracing.finish"),
    ("hub: register patterns", "hubcompile.passes.pipeline", "register"),
    ("hub: dynamo-graph families", "hubcompile.passes.pipeline", "rewrite_dynamo_graph"),
    ("hub: joint pass", "hubcompile.passes.pipeline", "HubcompilePass.__call__"),
    ("hub: numerical guard", "hubcompile.guards.numerical", "check"),
    ("hub: inline pass", "hubcompile.passes.inline", "InlinePass.__call__"),
    ("hub: performance guard", "hubcompile.guards.performance", "choose"),
    ("hub: pass uuid", "hubcompile.passes.pipeline", "HubcompilePass.uuid"),
    ("inductor compile_fx", "torch._inductor.compile_fx", "compile_fx"),
    # Triton compiles in this process: kernels run at their first call (the numerical
    # guard's runs of the bundled kernels), not Inductor's, which compile in its workers.
    ("triton compile (in process)", "triton.compiler", "compile"),
)


def time_phases() -> dict:
    """Wrap each phase's function so that its outermost calls add up their seconds."""
    import functools
    import importlib

    spent = {}
    for label, module, path in PHASES:
        owner = importlib.import_module(module)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        fn = getattr(owner, name)
        depth = [0]

        @functools.wraps(fn)
        def timed(*a, __fn=fn, __label=label, __depth=depth, **k):
            __depth[0] += 1
            start = time.perf_counter()
            try:
                return __fn(*a, **k)
            finally:
                __depth[0] -= 1
                if not __depth[0]:
                    spent[__label] = spent.get(__label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)
    return spent


def child(args) -> None:
    """One process: build the model, time the first call, print one JSON line."""
    import torch

    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    import hubcompile
    from whole_model import BUILDERS, make_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = BUILDERS["llama"](args.layers, args.attn, args.vocab, args.small)
    batch, seq = (2, 17) if args.small else ((4, 2048) if args.mode == "prefill" else (4, 1024))
    ids = torch.randint(3, args.vocab, (batch, seq), device=device, generator=torch.Generator(device).manual_seed(0))
    model.train(args.mode == "train")
    # torch's and the GPU's one-time start-up out of the number, as whole_model.py does
    with torch.no_grad():
        torch.compile(lambda x: torch.nn.functional.silu(x) * 2)(torch.randn(8, device=device))
    if args.impl == "inductor":
        fn = torch.compile(model)
    else:
        fn = torch.compile(model, backend="hubkernels",
                           options={"perf_guard": "on" if args.impl == "hubkernels" else "off"})
    step = make_step(model, fn, args.mode, ids)
    spent = time_phases()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    phases = {label: round(s, 3) for label, s in spent.items()}
    replaced = {}
    for record in hubcompile.RECORDS:
        for family, n in record.replaced.items():
            if n:
                replaced[family] = replaced.get(family, 0) + n
    print("RESULT " + json.dumps({"impl": args.impl, "seconds": round(seconds, 3), "phases": phases,
                                  "replaced": replaced,
                                  "from_cache": any(getattr(r, "from_cache", False) for r in hubcompile.RECORDS)}))


def run_child(args, impl: str, caches: Path) -> dict:
    # Inductor's FX-graph and AOTAutograd caches as users have them: on.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "1", "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
           "TRITON_CACHE_DIR": str(caches / "triton"), "HUBCOMPILE_CACHE_DIR": str(caches / "hubcompile")}
    env.pop("HUBCOMPILE_PATTERN_CACHE_DIR", None)
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--attn", args.attn, "--mode", args.mode,
           "--layers", str(args.layers), "--vocab", str(args.vocab)] + (["--small"] if args.small else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"impl": impl, "error": (proc.stdout + proc.stderr)[-2000:]}
    return json.loads(lines[-1][len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    parser.add_argument("--mode", default="train", choices=["train", "prefill"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--impls", default="inductor,hubkernels-noguard")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=900, help="seconds for one process")
    parser.add_argument("--small", action="store_true", help="tiny sizes on CPU: a smoke test of this script")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    impls = args.impls.split(",")
    unknown = set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown --impls {', '.join(sorted(unknown))}; choose from {', '.join(IMPLS)}")
    os.makedirs(args.out, exist_ok=True)
    out = Path(args.out) / "compile_time.jsonl"
    workload = {"name": f"llama-{args.layers}L-{args.attn}-v{args.vocab}-{args.mode}", "small": args.small}
    results = {(impl, kind): [] for impl in impls for kind in ("cold", "warm")}
    for repeat in range(1, args.repeats + 1):
        for impl in impls:
            with tempfile.TemporaryDirectory(prefix="compile-time-") as caches:
                for kind in ("cold", "warm"):
                    row = {"run": "compile_time", **run_child(args, impl, Path(caches)), "kind": kind,
                           "repeat": repeat, "wl": workload}
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{impl:20} {kind} #{repeat}: " + (f"{row['seconds']:.1f} s  {row['phases']}"
                          if "seconds" in row else "FAILED " + row["error"][-500:]), flush=True)
                    if "seconds" in row:
                        results[(impl, kind)].append(row["seconds"])
    print(f"\n{workload['name']}: median seconds of {args.repeats} processes (min-max)")
    base = {kind: sorted(results.get(("inductor", kind)) or [float("nan")]) for kind in ("cold", "warm")}
    for (impl, kind), times in results.items():
        if not times:
            continue
        times.sort()
        median = times[len(times) // 2]
        ratio = median / base[kind][len(base[kind]) // 2]
        print(f"{impl:20} {kind}: {median:7.1f} s ({times[0]:.1f}-{times[-1]:.1f})  {ratio:.2f}x Inductor")


if __name__ == "__main__":
    main()
