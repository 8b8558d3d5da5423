"""End-to-end benchmark on a GPU: transformers models with random weights under eager,
Inductor, backend="hubkernels" (performance guard on, the default, and off) and Liger's
model patch, prefill and a training step, with latency, peak memory and compile time.

    python bench/whole_model.py --out bench/results [--arch llama|lfm2|mamba2|gpt_neox]
                                [--attn sdpa|eager]
                                [--vocab 32000] [--layers 8] [--modes prefill,train]

Models: a Llama-3.2-1B-shaped model (eager or sdpa attention), an LFM2-1.2B-shaped hybrid
(short causal convolutions and attention), Mamba2, and a Pythia-1B-shaped GPT-NeoX
(LayerNorm). Prefill runs 4x2048 under no_grad, the training step 4x1024 with grads set to
None each step.

Compile time is the first call (Dynamo, AOTAutograd, Inductor, and for hubkernels the
passes, the numerical guards and the performance guard's timing), each in fresh Inductor
and Triton caches (``torch._inductor.utils.fresh_cache``): "cold" with an empty
hubcompile cache (the patterns traced, the guards run), "warm" when the traced patterns
and the guards' decisions are already on disk (a second process compiling the same
model).

A replaced op is opaque to Inductor and loses the fusions around it, so per-op numbers
alone do not say whether a model gets faster: this does.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hubcompile  # noqa: E402
from common import LOCAL_RMSNORM, Records, bench_ms, peak_of_one_step  # noqa: E402
from hubcompile import patterns  # noqa: E402
from hubcompile.guards import performance as perf_guard  # noqa: E402
from hubcompile.guards import numerical as guards  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# hubkernels-noguard: the performance guard off, so the lowering itself is judged;
# hubkernels-ops: that, with every replacement called through its op (inline_kernels=False).
# hubkernels-local: the bundled RMSNorm given as a local repo (a kernel that did not come
# with hubcompile, so runtime-checked on its first calls, then sampled: issue 25);
# hubkernels-local-nochecks: the same with runtime_checks=0, the cost of the checks' baseline.
IMPLS = ("eager", "inductor", "hubkernels", "hubkernels-noguard", "hubkernels-ops", "hubkernels-local",
         "hubkernels-local-nochecks", "liger")
BASELINES: dict = {}  # workload name -> eager's result, what every impl is compared with


def _finish(model):
    torch.manual_seed(0)
    return model.to(device=DEVICE, dtype=torch.bfloat16)


def build(layers: int, attn: str, vocab: int, small: bool):
    """Llama-3.2-1B-shaped (tied embeddings), ``layers`` deep."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16) if small else dict(hidden_size=2048, intermediate_size=8192,
                                                 num_attention_heads=32, num_key_value_heads=8, head_dim=64)
    config = LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=4096,
                         rope_theta=500000.0, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, **dims)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return _finish(LlamaForCausalLM(config))


def build_lfm2(layers: int, attn: str, vocab: int, small: bool):
    """LFM2-1.2B-shaped: short causal depthwise convolutions (kernel 3) in most layers,
    GQA attention with q/k RMSNorm in the rest (the real model: 10 of 16 are convolutions)."""
    from transformers import Lfm2Config, Lfm2ForCausalLM

    dims = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2) if small \
        else dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8)
    types = ["full_attention" if i % 3 == 2 else "conv" for i in range(layers)]
    config = Lfm2Config(vocab_size=vocab, num_hidden_layers=layers, layer_types=types, conv_L_cache=3,
                        max_position_embeddings=4096, block_auto_adjust_ff_dim=False, tie_word_embeddings=True,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, **dims)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return _finish(Lfm2ForCausalLM(config))


def build_mamba2(layers: int, attn: str, vocab: int, small: bool):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    dims = dict(hidden_size=32, state_size=8, num_heads=4, head_dim=16, chunk_size=8) if small else \
        dict(hidden_size=2048, state_size=128, num_heads=64, head_dim=64, chunk_size=256)
    config = Mamba2Config(vocab_size=vocab, num_hidden_layers=layers, expand=2, conv_kernel=4, n_groups=1,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, **dims)
    torch.manual_seed(0)
    return _finish(Mamba2ForCausalLM(config))


def build_gpt_neox(layers: int, attn: str, vocab: int, small: bool):
    """Pythia-1B-shaped GPT-NeoX: LayerNorm with bias, one norm pair per block feeding
    attention and the MLP side by side (parallel residual), rotary on a quarter of each
    head, a GELU MLP (issue 23's LayerNorm model)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    dims = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4) if small \
        else dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=8)
    config = GPTNeoXConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=4096,
                           use_parallel_residual=True, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, **dims)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return _finish(GPTNeoXForCausalLM(config))


BUILDERS = {"llama": build, "lfm2": build_lfm2, "mamba2": build_mamba2, "gpt_neox": build_gpt_neox}


def _liger_patch(arch: str):
    """Liger's model patch for ``arch``, or None (with why) where it has none or is missing."""
    try:
        import liger_kernel.transformers as liger
    except Exception as e:  # noqa: BLE001
        return None, f"liger-kernel not importable ({type(e).__name__}: {e})"
    patch = getattr(liger, f"apply_liger_kernel_to_{arch}", None)
    return (patch, None) if patch else (None, f"liger-kernel has no patch for {arch}")


def _compiled(model, impl: str):
    if impl in ("eager", "liger"):
        return model  # Liger under torch.compile returned a wrong loss (results/README.md)
    if impl == "inductor":
        return torch.compile(model)
    options = {"hubkernels": {"perf_guard": "on"}, "hubkernels-noguard": {"perf_guard": "off"},
               "hubkernels-ops": {"perf_guard": "off", "inline_kernels": False},
               "hubkernels-local": {"perf_guard": "off", "kernels": LOCAL_RMSNORM},
               "hubkernels-local-nochecks": {"perf_guard": "off", "kernels": LOCAL_RMSNORM, "runtime_checks": 0}}[impl]
    return torch.compile(model, backend="hubkernels", options=options)


def make_step(model, fn, mode: str, ids):
    """One step of ``fn`` (``model``, compiled or not): prefill under no_grad, returning the
    logits, or a training step with grads set to None, returning the loss."""
    def step():
        if mode == "prefill":
            with torch.no_grad():
                return fn(ids, use_cache=False).logits
        for p in model.parameters():
            p.grad = None
        out = fn(ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out.loss.detach()

    return step


# --inductor-cache warm: the first call uses Inductor's and Triton's caches as they are on
# disk (a later process of a repeated run), so only the first process pays the compiles.
FRESH_CACHES = True


def _first_call_s(step) -> float:
    """Seconds of the first call (the compile), in fresh Inductor/Triton caches unless
    --inductor-cache warm."""
    import contextlib

    from torch._inductor.utils import fresh_cache

    with fresh_cache() if FRESH_CACHES else contextlib.nullcontext():
        start = time.perf_counter()
        step()
        torch.cuda.synchronize() if DEVICE == "cuda" else None
        return time.perf_counter() - start


def _forget_hubcompile_cache() -> None:
    """An empty hubcompile cache: a new directory, and no decisions or traced patterns
    held in memory."""
    os.environ["HUBCOMPILE_CACHE_DIR"] = tempfile.mkdtemp(prefix="hubcompile-cache-")
    os.environ.pop("HUBCOMPILE_PATTERN_CACHE_DIR", None)
    perf_guard.clear_cache()
    guards.clear_cache()
    patterns.forget_traced()


def run_workload(args, records: Records, mode: str, impls: list[str], rows: list) -> None:
    model = BUILDERS[args.arch](args.layers, args.attn, args.vocab, args.small)
    batch, seq = (2, 17) if args.small else ((4, 2048) if mode == "prefill" else (4, 1024))
    ids = torch.randint(3, args.vocab, (batch, seq), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    attn = f"-{args.attn}" if args.arch != "mamba2" else ""
    wl = {"name": f"{args.arch}-{args.layers}L{attn}-v{args.vocab}-{mode}", "B": batch, "S": seq,
          "arch": args.arch, "layers": args.layers, "attn": args.attn, "vocab": args.vocab, "mode": mode}
    model.train(mode == "train")
    for impl in impls:
        # The last row's logits and their fp32 copy would count in this row's peak (prefill
        # rows after the first were 1 GiB too high at vocabulary 32000 until 2026-12-07).
        result = baseline = None
        torch._dynamo.reset()
        hubcompile.RECORDS.clear()
        _forget_hubcompile_cache()
        if impl == "liger":
            patch, why = _liger_patch(args.arch)
            if patch is None:
                print(f"{wl['name']} liger: skipped, {why}", flush=True)
                records.add(impl, wl, None, ok=False, err=why, skipped=True)
                continue
            model = BUILDERS[args.arch](args.layers, args.attn, args.vocab, args.small).train(mode == "train")
            patch(model=model)
        fn = _compiled(model, impl)
        step = make_step(model, fn, mode, ids)

        try:
            compile_s = _first_call_s(step)
            decisions = [d.describe() for d in perf_guard.DECISIONS]
            # the guard's predicted speedup per graph, to set beside the measured one
            guard_dicts = [d.to_dict() for d in perf_guard.DECISIONS]
            warm_s = None
            if impl.startswith("hubkernels") and FRESH_CACHES:
                # The same compile again, as a second process would: fresh Inductor caches,
                # the traced patterns and the guards' decisions on disk. (With
                # --inductor-cache warm it would be a cache hit of Inductor's: not measured.)
                torch._dynamo.reset()
                perf_guard.DECISIONS.clear()
                patterns.forget_traced()  # loaded from the pattern cache, as in a new process
                hubcompile.RECORDS.clear()  # count the replacements of this compile only
                step = make_step(model, _compiled(model, impl), mode, ids)
                warm_s = _first_call_s(step)
            result = step()
            # The compiles' and the guard's leftovers must not reach the timing (a
            # fragmented cache allocator costs every row after them).
            gc.collect()
            torch.cuda.empty_cache() if DEVICE == "cuda" else None
            peak = peak_of_one_step(step)
            lat = bench_ms(step, reps_ms=2000)
            replaced, kept, launched = {}, [], {}
            for r in hubcompile.RECORDS:
                for fam, n in r.replaced.items():
                    if n:
                        replaced[fam] = replaced.get(fam, 0) + n
                # by Inductor, or as an op (and why); between runtime checks where they differ
                for prefix, launches in (("", r.launches), ("between checks: ", r.launches_between_checks)):
                    for op, ways in launches.items():
                        for how, n in ways.items():
                            launched[f"{prefix}{op} {how}"] = launched.get(f"{prefix}{op} {how}", 0) + n
                for fam, refusals in r.refused.items():  # guard failures and other refusals
                    kept += [f"{fam} {spelling}: {reason[:200]}" for spelling, reason in refusals]
            if impl == "eager":
                BASELINES[wl["name"]] = result.float()
            baseline = BASELINES.get(wl["name"], result.float())
            diff = (result.float() - baseline).abs().max().item()
            records.add(impl, wl, lat, compile_ms=compile_s * 1e3, compile_warm_ms=warm_s and warm_s * 1e3,
                        peak_bytes=peak, ok=bool(torch.isfinite(result).all()), max_abs_diff_vs_eager=diff,
                        replaced=replaced, launched=launched, kept=kept, perf_guard=decisions,
                        perf_guard_decisions=guard_dicts)
            rows.append((wl["name"], impl, lat["p50"], compile_s, warm_s, peak, diff, replaced, decisions))
            print(f"{wl['name']} {impl}: {lat['p50']:.2f} ms, compile {compile_s:.1f} s"
                  + (f" (warm {warm_s:.1f} s)" if warm_s is not None else "")
                  + f", peak {(peak or 0) / 2**30:.2f} GiB, max|diff| vs eager {diff:.3g}, replaced {replaced}",
                  flush=True)
            for line in sorted(launched):
                print(f"  launched {line}: {launched[line]}", flush=True)
            for line in kept[:20]:
                print(f"  kept {line}", flush=True)
            for line in decisions:  # the replaced counts above are those in effect after it
                print(f"  perf guard: {line}", flush=True)
        except Exception as e:  # noqa: BLE001 - a failing variant is a result too
            records.add(impl, wl, None, ok=False, err=repr(e)[:500])
            print(f"{wl['name']} {impl}: FAILED {e!r}"[:500], flush=True)
    del model
    torch.cuda.empty_cache() if DEVICE == "cuda" else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--arch", default="llama", choices=sorted(BUILDERS))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--modes", default="prefill,train")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    parser.add_argument("--small", action="store_true", help="tiny sizes on CPU: a smoke test of this script")
    parser.add_argument("--inductor-cache", default="fresh", choices=["fresh", "warm"],
                        help="fresh: each first call compiles in empty Inductor/Triton caches (compile times); "
                             "warm: the caches on disk, for the repeat processes of a median-of-N run")
    args = parser.parse_args()
    global FRESH_CACHES
    FRESH_CACHES = args.inductor_cache == "fresh"
    unknown = set(args.impls.split(",")) - set(IMPLS)
    if unknown:
        parser.error(f"unknown --impls {', '.join(sorted(unknown))}; choose from {', '.join(IMPLS)}")
    records = Records(os.path.join(args.out, "whole_model.jsonl"), run="whole_model")
    # Inductor's one-time start-up (imports, CUDA and Triton set-up) out of the first
    # compile time measured; hubcompile's pattern tracing stays in each cold one, as users pay it.
    with torch.no_grad():
        torch.compile(lambda x: torch.nn.functional.silu(x) * 2)(torch.randn(8, device=DEVICE))
    rows: list = []
    # runtime_checks=0 switches the checks off for the rest of the process (the kernels'
    # runtime checks are process-wide), so the checked row runs before the unchecked one.
    impls = sorted(args.impls.split(","), key=lambda i: i == "hubkernels-local-nochecks")
    # Liger patches transformers' classes for the whole process, so its rows run last.
    for group in ([i for i in impls if i != "liger"], [i for i in impls if i == "liger"]):
        for mode in args.modes.split(",") if group else ():
            run_workload(args, records, mode, group, rows)
    print(f"\n{'workload':36} {'impl':18} {'p50 ms':>8} {'x Ind.':>6} {'compile s':>9} {'warm s':>6} {'peak GiB':>8}")
    inductor = {name: ms for name, impl, ms, *_ in rows if impl == "inductor"}
    for name, impl, ms, cs, ws, peak, diff, replaced, decisions in rows:
        ratio = f"{inductor[name] / ms:6.2f}" if name in inductor else "     -"
        warm = f"{ws:6.1f}" if ws is not None else "     -"
        print(f"{name:36} {impl:18} {ms:8.2f} {ratio} {cs:9.1f} {warm} {(peak or 0) / 2**30:8.2f}")


if __name__ == "__main__":
    main()
