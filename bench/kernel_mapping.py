"""One kernel mapping, two ways to use it (issue: Hub layers and the kernel-mapping vocabulary).

A Llama-3.2-1B-shaped model (8 layers, sdpa, bf16, random weights) with the mapping
``{"RMSNorm": "<liger-kernels repo>:LigerRMSNorm"}`` (transformers' default for RMSNorm on
CUDA is that layer), given to transformers' ``use_kernels`` (``kernelize``), eager and
under Inductor, and to ``backend="hubkernels"`` as ``options={"kernel_mapping": ...}``:
with only the rmsnorm family (the same scope as kernelize) and with every family.
Prefill 4x2048 and a training step 4x1024 (grads set to None): p50 latency (CUDA events,
L2 flushed), peak memory of one plain step, compile time, the replacements of each.

The repo is ``bench/hub_repos/liger-kernels`` (a wrapper of the liger-kernel package from
PyPI), named by its local path (``KernelConfig(use_local_kernel=True)``): the GPU machine
has no Hub access.

    python bench/kernel_mapping.py --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("LOCAL_KERNELS",
                      f"kernels-community/liger-kernels={ROOT / 'bench' / 'hub_repos' / 'liger-kernels'}")

import hubcompile  # noqa: E402
from common import Records, bench_ms, peak_of_one_step  # noqa: E402
from whole_model import build  # noqa: E402

# A local repo path (KernelConfig's use_local_kernel form): kernelize resolves a Hub
# version online even when LOCAL_KERNELS points at a local copy.
MAPPING = {"RMSNorm": f"{ROOT / 'bench' / 'hub_repos' / 'liger-kernels'}:LigerRMSNorm"}


def kernel_config():
    from transformers import KernelConfig

    return KernelConfig(kernel_mapping=dict(MAPPING), use_local_kernel=True)


def kernelized_modules(model) -> dict:
    """Modules whose forward kernelize swapped (instance forward != class forward)."""
    counts = {}
    for m in model.modules():
        fwd = getattr(m, "forward", None)
        if getattr(fwd, "__func__", None) is not None and fwd.__func__ is not type(m).forward:
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts


def replacements() -> dict:
    out = {}
    for r in hubcompile.RECORDS:
        for fam, items in r.spellings.items():
            for _, kernel in items:
                key = f"{fam} ({kernel})"
                out[key] = out.get(key, 0) + 1
    return out


def run(impl, mode, args, records):
    torch._dynamo.reset()
    hubcompile.RECORDS.clear()
    gc.collect()
    torch.cuda.empty_cache()
    model = build(args.layers, "sdpa", args.vocab, False).train(mode == "train")
    batch, seq = (4, 2048) if mode == "prefill" else (4, 1024)
    ids = torch.randint(3, args.vocab, (batch, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    replaced = {}
    options = {"kernel_mapping": kernel_config()}
    if impl == "hubkernels+mapping-rmsnorm-only":
        options["patterns"] = ["rmsnorm"]
    fn = {
        "eager": model, "use_kernels": model,
        "inductor": lambda: torch.compile(model),
        "use_kernels+inductor": lambda: torch.compile(model),
        "hubkernels": lambda: torch.compile(model, backend="hubkernels"),
        "hubkernels+mapping": lambda: torch.compile(model, backend="hubkernels", options=options),
        "hubkernels+mapping-rmsnorm-only": lambda: torch.compile(model, backend="hubkernels", options=options),
    }[impl]

    if mode == "prefill":
        def step():
            with torch.no_grad():
                return fn(input_ids=ids, use_cache=False).logits
    else:
        def step():
            for p in model.parameters():
                p.grad = None
            loss = fn(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            return loss.detach()

    wl = {"name": f"llama1b-{args.layers}L-sdpa-v{args.vocab}-{mode}", "B": batch, "S": seq}
    try:
        if impl.startswith("use_kernels"):
            model.set_use_kernels(True, kernel_config())
            replaced = {f"kernelize {k}": v for k, v in kernelized_modules(model).items()}
        fn = fn() if callable(fn) and not isinstance(fn, torch.nn.Module) else fn
        start = time.perf_counter()
        out = step()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        step()
        peak = peak_of_one_step(step)
        lat = bench_ms(step, reps_ms=1500)
        replaced.update(replacements())
        value = out.float().mean().item() if mode == "prefill" else out.item()
        records.add(impl, wl, lat, mode=mode, compile_ms=compile_s * 1e3, peak_bytes=peak, replaced=replaced,
                    value=value, ok=bool(torch.isfinite(torch.tensor(value))))
        print(f"{wl['name']:34} {impl:32} {lat['p50']:8.2f} ms  peak {peak / 2**30:5.2f} GiB  compile "
              f"{compile_s:5.1f} s  {'loss' if mode == 'train' else 'mean logit'} {value:.5f}  {replaced}", flush=True)
    except Exception as e:  # noqa: BLE001 - a failing variant is a result too
        records.add(impl, wl, None, mode=mode, ok=False, err=repr(e)[:800])
        print(f"{wl['name']:34} {impl:32} FAILED {e!r}"[:800], flush=True)
    finally:
        del model
        torch._dynamo.reset()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--modes", default="prefill,train")
    parser.add_argument("--impls", default="eager,inductor,use_kernels,use_kernels+inductor,hubkernels,"
                                           "hubkernels+mapping-rmsnorm-only,hubkernels+mapping")
    args = parser.parse_args()
    import kernels
    import transformers

    print(f"transformers {transformers.__version__}, kernels {kernels.__version__}, "
          f"LOCAL_KERNELS={os.environ['LOCAL_KERNELS']}", flush=True)
    records = Records(os.path.join(args.out, "kernel_mapping.jsonl"), run="kernel_mapping")
    for mode in args.modes.split(","):
        for impl in args.impls.split(","):
            run(impl, mode, args, records)


if __name__ == "__main__":
    main()
