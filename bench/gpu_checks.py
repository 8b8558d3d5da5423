"""GPU-only robustness checks (issue: robustness), run on the lent H100:

  1. mode="reduce-overhead", and mode="max-autotune" (autotuning plus CUDA graphs): the
     replaced ops are captured in CUDA graphs (no cudagraph skips), and the outputs match
     eager over several calls;
  2. a model compiled on CPU, then moved to CUDA, recompiles once with CUDA kernels;
  3. FSDP2 (`fully_shard`, one process, NCCL) training for 3 steps with
     backend="hubkernels": the same losses and gradients as eager FSDP2, with the
     replaced ops in the compiled code.

    python bench/gpu_checks.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import hubcompile  # noqa: E402
from tiny_models import build, input_ids, replaced, train_steps  # noqa: E402


def reduce_overhead(mode: str = "reduce-overhead") -> dict:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    hubcompile.RECORDS.clear()
    counters.clear()
    model, _ = build("llama", torch.bfloat16)
    model = model.cuda()
    compiled = torch.compile(model, backend="hubkernels", mode=mode)
    worst = 0.0
    with torch.no_grad():
        for step in range(5):
            ids = input_ids(seed=step).cuda()
            out = compiled(ids).logits.clone()
            worst = max(worst, (out.float() - model(ids).logits.float()).abs().max().item())
    skips = dict(counters["inductor"])
    skipped = {k: v for k, v in skips.items() if "cudagraph_skips" in k}
    return {"replaced": replaced(hubcompile.RECORDS), "max_abs_diff": worst, "cudagraph_skips": skipped,
            "ops_in_code": sum(r.code_after.count("torch.ops.hubcompile.") for r in hubcompile.RECORDS)}


def device_move() -> dict:
    """Compile on CPU, then move the model to CUDA: one recompile, CUDA kernels chosen."""
    torch._dynamo.reset()
    hubcompile.RECORDS.clear()
    model, _ = build("llama", torch.float32)
    compiled = torch.compile(model, backend="hubkernels")
    ids = input_ids()
    with torch.no_grad():
        cpu_diff = (compiled(ids).logits - model(ids).logits).abs().max().item()
        model.cuda()
        cuda_diff = (compiled(ids.cuda()).logits - model(ids.cuda()).logits).abs().max().item()
    kernels = sorted({k for r in hubcompile.RECORDS for fam in r.spellings.values() for _, k in fam})
    return {"graphs": len(hubcompile.RECORDS), "replaced_per_graph": [r.total for r in hubcompile.RECORDS],
            "cpu_max_abs_diff": cpu_diff, "cuda_max_abs_diff": cuda_diff, "kernels": kernels}


def fsdp2() -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        results = {}
        for mode in ("eager", "hubkernels"):
            torch._dynamo.reset()
            hubcompile.RECORDS.clear()
            model, _ = build("llama", torch.float32)
            model = model.cuda().train()
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            run = model if mode == "eager" else torch.compile(model, backend="hubkernels")
            losses, grads = train_steps(model, run, [input_ids(seed=step).cuda() for step in range(3)])
            results[mode] = {"losses": losses, "grads": grads, "replaced": replaced(hubcompile.RECORDS),
                             "ops_in_code": sum(r.code_after.count("torch.ops.hubcompile.")
                                                for r in hubcompile.RECORDS)}
        eager, hub = results["eager"], results["hubkernels"]
        results["max_loss_diff"] = max(abs(a - b) for a, b in zip(eager["losses"], hub["losses"]))
        results["max_grad_norm_rel_diff"] = max(abs(hub["grads"][n] - g) / max(g, 1e-6)
                                                for n, g in eager["grads"].items())
        return results
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    checks = (("reduce_overhead", reduce_overhead), ("max_autotune", lambda: reduce_overhead("max-autotune")),
              ("device_move", device_move), ("fsdp2", fsdp2))
    for name, fn in checks:
        try:
            report[name] = fn()
        except Exception as e:  # noqa: BLE001 - report and go on to the next check
            report[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(name, json.dumps(report[name], indent=1)[:3000], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_checks.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
