"""Whole-model benchmark on a GPU: a Llama-3.2-1B-shaped transformers model (random
weights) under eager, Inductor and backend="hubkernels", prefill and a training step.

    python bench/whole_model.py --out bench/results [--layers 8] [--attn sdpa]

A replaced op is opaque to Inductor and loses the fusions around it, so per-op numbers
alone do not say whether a model gets faster: this does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hubcompile  # noqa: E402
from common import Records, bench_ms  # noqa: E402


def build_mamba2(layers: int, vocab: int, small: bool):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    dims = dict(hidden_size=32, state_size=8, num_heads=4, head_dim=16, chunk_size=8) if small else \
        dict(hidden_size=2048, state_size=128, num_heads=64, head_dim=64, chunk_size=256)
    config = Mamba2Config(vocab_size=vocab, num_hidden_layers=layers, expand=2, conv_kernel=4, n_groups=1,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, **dims)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Mamba2ForCausalLM(config).to(device=device, dtype=torch.bfloat16)


def build(layers: int, attn: str, vocab: int, small: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16) if small else dict(hidden_size=2048, intermediate_size=8192,
                                                 num_attention_heads=32, num_key_value_heads=8, head_dim=64)
    config = LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=4096,
                         rope_theta=500000.0, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, **dims)
    config._attn_implementation = attn
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--modes", default="prefill,train")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--arch", default="llama", choices=["llama", "mamba2"])
    args = parser.parse_args()
    records = Records(os.path.join(args.out, "whole_model.jsonl"), run="whole_model")
    model = build(args.layers, args.attn, args.vocab, args.small) if args.arch == "llama" else \
        build_mamba2(args.layers, args.vocab, args.small)
    device = next(model.parameters()).device
    rows = []
    for mode in args.modes.split(","):
        batch, seq = ((2, 17) if args.small else ((4, 2048) if mode == "prefill" else (4, 1024)))
        ids = torch.randint(3, args.vocab, (batch, seq), device=device)
        arch = f"llama1b-{args.layers}L-{args.attn}" if args.arch == "llama" else f"mamba2-2048-{args.layers}L"
        wl = {"name": f"{arch}-v{args.vocab}-{mode}", "B": batch, "S": seq}
        model.train(mode == "train")
        baseline = None
        for impl in ("eager", "inductor", "hubkernels"):
            torch._dynamo.reset()
            hubcompile.RECORDS.clear()
            fn = model if impl == "eager" else torch.compile(
                model, backend=hubcompile.hubkernels if impl == "hubkernels" else "inductor")

            def step():
                if mode == "prefill":
                    with torch.no_grad():
                        return fn(ids, use_cache=False).logits
                for p in model.parameters():
                    p.grad = None
                out = fn(ids, labels=ids, use_cache=False)
                out.loss.backward()
                return out.loss.detach()

            try:
                start = time.perf_counter()
                result = step()
                compile_s = time.perf_counter() - start
                torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
                lat = bench_ms(step, reps_ms=2000)
                peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
                replaced = {}
                for r in hubcompile.RECORDS:
                    for fam, n in r.replaced.items():
                        replaced[fam] = replaced.get(fam, 0) + n
                    for fam, refusals in r.refused.items():  # guard failures and other refusals
                        for spelling, reason in refusals:
                            print(f"  kept {fam} {spelling}: {reason[:300]}", flush=True)
                if baseline is None:
                    baseline = result.float()
                diff = (result.float() - baseline).abs().max().item()
                records.add(impl, wl, lat, compile_ms=compile_s * 1e3, peak_bytes=peak, ok=bool(torch.isfinite(result).all()),
                            max_abs_diff_vs_eager=diff, replaced=replaced)
                rows.append((wl["name"], impl, lat["p50"], compile_s, peak, diff, replaced))
                print(f"{wl['name']} {impl}: {lat['p50']:.2f} ms (compile {compile_s:.1f} s), peak "
                      f"{(peak or 0) / 2**30:.2f} GiB, max|diff| vs eager {diff:.3g}, replaced {replaced}", flush=True)
            except Exception as e:  # noqa: BLE001
                records.add(impl, wl, None, ok=False, err=repr(e)[:500])
                print(f"{wl['name']} {impl}: FAILED {e!r}"[:400], flush=True)
    print(f"\n{'workload':36} {'impl':11} {'p50 ms':>8} {'compile s':>9} {'peak GiB':>8}  replaced")
    for name, impl, ms, cs, peak, diff, replaced in rows:
        print(f"{name:36} {impl:11} {ms:8.2f} {cs:9.1f} {(peak or 0) / 2**30:8.2f}  {replaced}")


if __name__ == "__main__":
    main()
