"""Training memory and time of the LM head + loss (issue: fused linear cross-entropy).

A Llama-3.2-1B-shaped model (8 layers, sdpa attention, bf16, random weights) with the
real 128256-token vocabulary, one training step 4x1024 with grads reset each step, in
two ways of compiling:

  * whole: ``torch.compile(model)``; the graph returns the logits beside the loss;
  * step:  ``torch.compile(lambda ids: model(ids, labels=ids).loss)``; it returns the loss only;

under eager, Inductor and backend="hubkernels", and Liger's model patch (eager and
Inductor) when liger-kernel is importable. Each row: p50 latency (CUDA events, L2
flushed), peak allocated memory of one plain step (outside the timing loop: its 256 MB
L2-flush buffer would add 0.24 GiB), compile time, the loss and its difference from eager.

    python bench/linear_cross_entropy.py --out bench/results/h100 [--vocab 128256] [--layers 8]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hubcompile  # noqa: E402
from common import Records, bench_ms, peak_of_one_step  # noqa: E402
from whole_model import build  # noqa: E402


def _liger():
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except Exception as e:  # noqa: BLE001
        print(f"liger-kernel not importable ({type(e).__name__}: {e}); its rows are skipped", flush=True)
        return None
    return apply_liger_kernel_to_llama


def _inductor_with_aten_embedding_backward(gm, example_inputs):
    """Plain Inductor with only hubcompile's embedding-backward rewrite (no pattern
    replaced): how much of hubkernels' saving comes from that change alone."""
    from torch._inductor.compile_fx import compile_fx

    from hubcompile.passes.embedding_backward import rewrite_embedding_backward

    return compile_fx(gm, example_inputs, config_patches={"joint_custom_post_pass": rewrite_embedding_backward})


def training_step(impl: str, how: str, args, ids, peaks: dict | None = None):
    """(model, step) of one implementation: ``step()`` resets the grads, runs the loss
    forward and backward and returns the loss; ``peaks["forward"]`` gets the peak at the
    end of the forward. how="whole" compiles the model, how="step" a loss function."""
    model = build(args.layers, "sdpa", args.vocab, getattr(args, "small", False)).train()
    if impl.startswith("liger"):
        _liger()(model=model)
    backend = {"inductor": "inductor", "liger+inductor": "inductor", "hubkernels": hubcompile.hubkernels,
               "hubkernels-noguard": hubcompile.hubkernels, "hubkernels-lce-only": hubcompile.hubkernels,
               "inductor+aten-embedding-bwd": _inductor_with_aten_embedding_backward}.get(impl)
    # The performance guard's own choice is the "hubkernels" row; the others keep the
    # replacements whatever the guard would say, so that their memory is measured.
    options = {"hubkernels-noguard": {"perf_guard": "off"},
               "hubkernels-lce-only": {"patterns": ["linear_cross_entropy"], "perf_guard": "off"}}.get(impl)

    def compiled(fn):
        return torch.compile(fn, backend=backend, options=options) if options else torch.compile(fn, backend=backend)

    if how == "whole":
        run = model if backend is None else compiled(model)

        def loss_of(x):
            return run(x, labels=x, use_cache=False).loss
    else:
        def step_loss(x):
            return model(x, labels=x, use_cache=False).loss

        loss_of = step_loss if backend is None else compiled(step_loss)

    def step():
        for p in model.parameters():
            p.grad = None
        loss = loss_of(ids)
        if peaks is not None and torch.cuda.is_available():
            peaks["forward"] = torch.cuda.max_memory_allocated()
        loss.backward()
        return loss.detach()

    return model, step


def run_one(impl: str, how: str, args, ids, records, eager_loss):
    torch._dynamo.reset()
    hubcompile.RECORDS.clear()
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    peaks = {}
    _, step = training_step(impl, how, args, ids, peaks)

    name = f"llama1b-{args.layers}L-sdpa-v{args.vocab}-train-{how}"
    wl = {"name": name, "B": ids.shape[0], "S": ids.shape[1]}
    try:
        start = time.perf_counter()
        loss = step()
        compile_s = time.perf_counter() - start
        step()
        peak = peak_of_one_step(step)
        forward_peak = peaks.get("forward")
        lat = bench_ms(step, reps_ms=2000)
        replaced = {}
        for r in hubcompile.RECORDS:
            for fam, n in r.replaced.items():
                if n:
                    replaced[fam] = replaced.get(fam, 0) + n
            for fam, refusals in r.refused.items():
                for spelling, reason in refusals:
                    print(f"  kept {fam} {spelling}: {reason[:300]}", flush=True)
        diff = abs(loss.item() - eager_loss) if eager_loss is not None else 0.0
        records.add(impl, wl, lat, how=how, compile_ms=compile_s * 1e3, peak_bytes=peak,
                    peak_forward_bytes=forward_peak, loss=loss.item(),
                    loss_diff_vs_eager=diff, replaced=replaced, ok=bool(torch.isfinite(loss)))
        print(f"{name} {impl}: {lat['p50']:.2f} ms, peak {(peak or 0) / 2**30:.2f} GiB (forward "
              f"{(forward_peak or 0) / 2**30:.2f}), compile {compile_s:.1f} s, "
              f"loss {loss.item():.5f} (|diff| vs eager {diff:.2g}), replaced {replaced}", flush=True)
        return loss.item(), (name, impl, lat["p50"], (peak or 0) / 2**30, compile_s, diff)
    except Exception as e:  # noqa: BLE001 - a failing variant is a result too
        records.add(impl, wl, None, how=how, ok=False, err=repr(e)[:500])
        print(f"{name} {impl}: FAILED {e!r}"[:500], flush=True)
        return None, (name, impl, float("nan"), float("nan"), float("nan"), float("nan"))
    finally:
        torch._dynamo.reset()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--small", action="store_true", help="a CPU smoke test of this script")
    parser.add_argument("--impls", default="eager,inductor,inductor+aten-embedding-bwd,hubkernels,hubkernels-lce-only,"
                                           "liger,liger+inductor")
    args = parser.parse_args()
    records = Records(os.path.join(args.out, "linear_cross_entropy.jsonl"), run="linear_cross_entropy")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, seq = (2, 17) if args.small else (4, 1024)
    ids = torch.randint(3, args.vocab, (batch, seq), device=device, generator=torch.Generator(device).manual_seed(0))
    impls = args.impls.split(",")
    if any(i.startswith("liger") for i in impls) and _liger() is None:
        impls = [i for i in impls if not i.startswith("liger")]
    rows, eager_loss = [], {}
    # Liger patches transformers' classes for the whole process: its rows go last.
    order = [(how, impl) for impl in impls for how in ("whole", "step")]
    order.sort(key=lambda hi: hi[1].startswith("liger"))
    for how, impl in order:
        loss, row = run_one(impl, how, args, ids, records, eager_loss.get(how))
        if impl == "eager":
            eager_loss[how] = loss
        rows.append(row)
    rows.sort(key=lambda r: (r[0], impls.index(r[1])))
    print(f"\n{'workload':44} {'impl':15} {'p50 ms':>8} {'peak GiB':>8} {'compile s':>9} {'|dloss|':>8}")
    for name, impl, ms, peak, cs, diff in rows:
        print(f"{name:44} {impl:15} {ms:8.2f} {peak:8.2f} {cs:9.1f} {diff:8.2g}")


if __name__ == "__main__":
    main()
