"""One kernel mapping, two ways to use it (issues: Hub layers and the kernel-mapping
vocabulary; serving MLP and ForCausalLMLoss).

The real ``kernels-community/liger-kernels`` layers, built at start from the liger-kernel
package (tests/liger_repo.py: the repo's noarch layout, its layers over liger's Triton
kernels; the GPU machine has no Hub access), named by local path
(``KernelConfig(use_local_kernel=True)``): transformers' names ``RMSNorm``,
``rotary_pos_emb``, ``MLP`` and ``ForCausalLMLoss`` mapped to ``LigerRMSNorm``,
``liger_rotary_pos_emb_layer``, ``LigerSwiGLUMLP`` and ``LigerForCausalLMLossLayer``.

Part 1 (``--modes prefill,train``): a Llama-3.2-1B-shaped model (8 layers, sdpa, bf16,
random weights, vocab 32000), prefill 4x2048 and a training step 4x1024 (grads set to
None). Rows: eager, Inductor, transformers' ``use_kernels`` with the same mapping (eager
and under Inductor; transformers takes only the names a class of the model registers,
RMSNorm and rotary_pos_emb, and refuses a KernelConfig that also names MLP or
ForCausalLMLoss for a Llama), hubkernels without a mapping, hubkernels with each name mapped alone
(``hubkernels+map:<name>``) and with all four (``hubkernels+map:all``). For each mapped
row the routing check: every match of the name's family runs the layer (the matches are
counted in the unmapped hubkernels row of the same mode). The performance guard is off in
the hubkernels rows: they measure the layers, not the guard's choice.

Part 2 (``--modes memory``): the 128256-token vocabulary training step, compiled whole
(the logits returned) and as a loss function (the loss only), with the loss computed by
hubcompile's own fused kernel (bundled) and by ``LigerForCausalLMLossLayer`` mapped as
ForCausalLMLoss, against Inductor: peak memory of one plain step and p50 latency.

Every row: p50 latency (CUDA events, L2 flushed), peak allocated memory of one plain step
(after the runtime checks' first calls), compile time, the loss or mean logit.

    python bench/kernel_mapping.py --out $OUT [--modes prefill,train,memory] [--impls ...]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))

import hubcompile  # noqa: E402
import liger_repo  # noqa: E402
from common import Records, bench_ms, peak_of_one_step  # noqa: E402
from whole_model import build  # noqa: E402

# transformers' layer name -> (the liger-kernels layer, the hubcompile family it serves)
LAYERS = {
    "RMSNorm": ("LigerRMSNorm", "rmsnorm"),
    "rotary_pos_emb": ("liger_rotary_pos_emb_layer", "rotary"),
    "MLP": ("LigerSwiGLUMLP", "silu_gate"),
    "ForCausalLMLoss": ("LigerForCausalLMLossLayer", "linear_cross_entropy"),
}
PART1 = ("eager,inductor,use_kernels,use_kernels+inductor,hubkernels,"
         + ",".join(f"hubkernels+map:{name}" for name in LAYERS) + ",hubkernels+map:all")
PART2 = "inductor,hubkernels,hubkernels+map:ForCausalLMLoss"
SUMMARY: list[str] = []  # one markdown row per run, printed at the end
# Calls before a peak is read: hubcompile compares the first calls of a non-bundled kernel
# with its reference (runtime checks), which at a 128k vocabulary holds float64 logits.
WARMUP_STEPS = 4


def mapping_for(repo: Path, names):
    from transformers import KernelConfig

    return KernelConfig(kernel_mapping={n: f"{repo}:{LAYERS[n][0]}" for n in names}, use_local_kernel=True)


def kernelized_modules(model) -> dict:
    """Modules whose forward kernelize swapped (instance forward != class forward),
    functions kernelized through use_kernelized_func included."""
    counts = {}
    for m in model.modules():
        funcs = [m, *getattr(m, "_kernel_funcs", {}).values()]
        for f in funcs:
            fwd = getattr(f, "forward", None)
            if getattr(fwd, "__func__", None) is not None and fwd.__func__ is not type(f).forward:
                counts[type(f).__name__] = counts.get(type(f).__name__, 0) + 1
    return counts


def replaced_by_kernel() -> dict:
    """{family: {kernel: matches}} over the compiled graphs."""
    out = {}
    for r in hubcompile.RECORDS:
        for fam, reps in r.replacements.items():
            for rep in reps:
                out.setdefault(fam, {}).setdefault(rep.kernel, 0)
                out[fam][rep.kernel] += 1
    return out


def refusals() -> list[str]:
    return [f"{fam} {spelling}: {reason[:300]}" for r in hubcompile.RECORDS for fam, items in r.refused.items()
            for spelling, reason in items]


def routing(impl: str, replaced: dict, matches: dict | None) -> dict | None:
    """For a mapped row: per mapped name, the matches of its family that ran the layer, of
    those the unmapped hubkernels row counted."""
    if not impl.startswith("hubkernels+map:"):
        return None
    names = list(LAYERS) if impl.endswith(":all") else [impl.split(":", 1)[1]]
    result = {}
    for name in names:
        layer, family = LAYERS[name]
        routed = sum(n for kernel, n in replaced.get(family, {}).items() if f":{layer}#" in kernel)
        total = sum((matches or {}).get(family, {}).values()) if matches else None
        result[name] = {"family": family, "routed": routed, "matches": total,
                        "ok": total is not None and routed == total and total > 0}
    return result


def workload(mode, args) -> dict:
    vocab = args.memory_vocab if mode.startswith("memory") else args.vocab
    batch, seq = (2, 16) if args.small else ((4, 2048) if mode == "prefill" else (4, 1024))
    return {"name": f"llama1b-{args.layers}L-sdpa-v{vocab}-{mode}", "B": batch, "S": seq, "vocab": vocab}


def prepare(impl, mode, args, repo, wl):
    """(model, step) of one row: ``step()`` runs prefill, or a training step (grads reset)
    and returns its loss."""
    how = mode.split("-", 1)[1] if mode.startswith("memory") else None  # memory-whole / memory-step
    model = build(args.layers, "sdpa", wl["vocab"], args.small).train(mode != "prefill")
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(0)
    ids = torch.randint(3, wl["vocab"], (wl["B"], wl["S"]), device=device, generator=gen)
    names = list(LAYERS) if impl.endswith(":all") else [impl.split(":", 1)[1]] if ":" in impl else list(LAYERS)
    options = {"perf_guard": "off"}
    if impl.startswith("hubkernels+map"):
        options["kernel_mapping"] = mapping_for(repo, names)
    if impl.startswith("use_kernels"):
        # transformers refuses a name no class of the model registers (a Llama's MLP and
        # ForCausalLMLoss): use_kernels gets the others.
        config = mapping_for(repo, names)
        config.store_registered_layer_names(model)
        registered = set(config.registered_layer_names.values())
        if set(names) - registered:
            print(f"    use_kernels: transformers takes no {sorted(set(names) - registered)} for this model "
                  "(not registered by any of its classes); mapped: " + ", ".join(sorted(set(names) & registered)),
                  flush=True)
        model.set_use_kernels(True, mapping_for(repo, [n for n in names if n in registered]))
    compiled = {"inductor": "inductor", "use_kernels+inductor": "inductor"}.get(impl, hubcompile.hubkernels)
    plain = impl in ("eager", "use_kernels")

    def compile_(fn):
        if plain:
            return fn
        if compiled == "inductor":
            return torch.compile(fn)
        return torch.compile(fn, backend=compiled, options=options)

    if mode == "prefill":
        fn = compile_(model)

        def step():
            with torch.no_grad():
                return fn(input_ids=ids, use_cache=False).logits
    else:
        if how == "step":  # the loss only: the logits never leave the graph
            fn = compile_(lambda x: model(input_ids=x, labels=x, use_cache=False).loss)
        else:
            whole = compile_(model)

            def fn(x):
                return whole(input_ids=x, labels=x, use_cache=False).loss

        def step():
            for p in model.parameters():
                p.grad = None
            loss = fn(ids)
            loss.backward()
            return loss.detach()

    return model, step


def run(impl, mode, args, repo, records, matches):
    """One row; returns {family: {kernel: n}} of its compile (the match counts of the
    unmapped hubkernels row)."""
    torch._dynamo.reset()
    hubcompile.RECORDS.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    wl = workload(mode, args)
    try:
        model, step = prepare(impl, mode, args, repo, wl)
        start = time.perf_counter()
        out = step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        for _ in range(WARMUP_STEPS - 1):
            step()
        peak = peak_of_one_step(step)
        lat = bench_ms(step, reps_ms=args.reps_ms)
        replaced = replaced_by_kernel()
        route = routing(impl, replaced, matches)
        kernelized = kernelized_modules(model) if impl.startswith("use_kernels") else None
        value = out.float().mean().item() if mode == "prefill" else out.item()
        records.add(impl, wl, lat, mode=mode, compile_ms=compile_s * 1e3, peak_bytes=peak, replaced=replaced,
                    routing=route, kernelized=kernelized, kept=refusals()[:20], value=value,
                    ok=bool(torch.isfinite(torch.tensor(value))) and all(r["ok"] for r in (route or {}).values()))
        print(f"{wl['name']:40} {impl:32} {lat['p50']:8.2f} ms  peak {(peak or 0) / 2**30:5.2f} GiB  compile "
              f"{compile_s:5.1f} s  {'mean logit' if mode == 'prefill' else 'loss'} {value:.5f}", flush=True)
        print(f"    replaced {replaced}" + (f"\n    kernelized {kernelized}" if kernelized else ""), flush=True)
        for name, r in (route or {}).items():
            print(f"    routing {name}: {r['routed']} of {r['matches']} {r['family']} matches ran "
                  f"{LAYERS[name][0]} -> {'ok' if r['ok'] else 'NOT ALL'}", flush=True)
        for line in refusals()[:8]:
            print(f"    kept {line}", flush=True)
        routed = " ".join(f"{n}:{r['routed']}/{r['matches']}" for n, r in (route or {}).items())
        SUMMARY.append(f"| {mode} | {impl} | {lat['p50']:.2f} | {(peak or 0) / 2**30:.2f} | {compile_s:.1f} | "
                       f"{value:.5f} | {routed or '-'} |")
        return replaced
    except Exception as e:  # noqa: BLE001 - a failing variant is a result too
        records.add(impl, wl, None, mode=mode, ok=False, err=repr(e)[:800])
        print(f"{wl['name']:40} {impl:32} FAILED {e!r}"[:800], flush=True)
        SUMMARY.append(f"| {mode} | {impl} | FAILED: {str(e)[:80]} | | | | |")
        return None
    finally:
        torch._dynamo.reset()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--memory-vocab", type=int, default=128256)
    parser.add_argument("--modes", default="prefill,train,memory",
                        help="prefill, train (part 1); memory = memory-whole,memory-step (part 2)")
    parser.add_argument("--impls", default=None, help=f"part 1: {PART1}; part 2: {PART2}")
    parser.add_argument("--reps-ms", type=int, default=1500)
    parser.add_argument("--repo-dir", default=None, help="where the liger-kernels repo is built (a temp dir)")
    parser.add_argument("--small", action="store_true", help="tiny sizes (a CPU smoke test of the script)")
    args = parser.parse_args()
    if args.small:
        args.layers, args.vocab, args.memory_vocab, args.reps_ms = 1, 96, 96, 1
    import kernels
    import liger_kernel
    import transformers

    repo = liger_repo.build(Path(args.repo_dir or tempfile.mkdtemp(prefix="hub-")) / "liger-kernels")
    print(f"transformers {transformers.__version__}, kernels {kernels.__version__}, liger-kernel "
          f"{getattr(liger_kernel, '__version__', '?')}, repo {repo}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    records = Records(os.path.join(args.out, "kernel_mapping.jsonl"), run="kernel_mapping")
    modes = [m for mode in args.modes.split(",")
             for m in (("memory-whole", "memory-step") if mode == "memory" else (mode,))]
    for mode in modes:
        impls = (args.impls or (PART2 if mode.startswith("memory") else PART1)).split(",")
        # the unmapped row first: it counts the matches each mapped row must route
        impls = sorted(impls, key=lambda i: i != "hubkernels")
        matches = None
        for impl in impls:
            replaced = run(impl, mode, args, repo, records, matches)
            if impl == "hubkernels":
                matches = replaced
    print("\n| mode | impl | p50 ms | peak GiB | compile s | loss / mean logit | routed (layer / matches) |\n"
          "|---|---|---|---|---|---|---|\n" + "\n".join(SUMMARY), flush=True)


if __name__ == "__main__":
    main()
