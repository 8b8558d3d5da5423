"""The demo: compile a small Llama-style transformers model with backend="hubkernels"
and print what was replaced and how accurate the result is.

    python -m hubcompile demo [--dtype bfloat16] [--train] [--layers 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from .records import RECORDS
from .config import FAMILIES
from .explain import format_table


def _model(layers: int, dtype: torch.dtype, device: str, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def run(layers: int = 2, dtype: str = "float32", train: bool = False, device: str | None = None,
        attn: str = "eager") -> int:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype)
    model = _model(layers, torch_dtype, device, attn).train(train)
    ref_model = copy.deepcopy(model).double()
    ids = torch.randint(3, 512, (2, 37), device=device)
    print(f"hubcompile demo: LlamaForCausalLM, {layers} layers, {attn} attention, {dtype}, {device}, "
          f"{'training step' if train else 'inference'}, input {tuple(ids.shape)}")

    RECORDS.clear()
    compiled = torch.compile(model, backend="hubkernels")
    start = time.perf_counter()
    # On an Inductor cache hit the passes do not run and there would be nothing to show.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False), torch.set_grad_enabled(train):
        out = compiled(ids, labels=ids)
        if train:
            out.loss.backward()
    compile_s = time.perf_counter() - start
    with torch.set_grad_enabled(False):
        eager_out, ref_out = model(ids, labels=ids), ref_model(ids, labels=ids)
        eager, ref = eager_out.logits, ref_out.logits

    print(f"compiled in {compile_s:.1f} s ({len(RECORDS)} graph(s) rewritten)\n")
    rows = [["family", "replaced", "kept (reason)"]]
    for family in FAMILIES:
        replaced = sum(r.replaced.get(family, 0) for r in RECORDS)
        refused = [reason for r in RECORDS for _, reason in r.refused.get(family, [])]
        disabled = any(family in r.disabled for r in RECORDS)
        kept = "disabled by config" if disabled else (f"{len(refused)} ({refused[0]})" if refused else "0")
        rows.append([family, str(replaced), kept])
    print(format_table(rows, indent=""))

    new = out.logits.detach()
    err_new = (new.double() - ref).abs().max().item()
    err_eager = (eager.double() - ref).abs().max().item()
    diff = (new.double() - eager.double()).abs().max().item()
    print(f"\nlogits, max abs error: hubkernels vs eager {diff:.3g}; "
          f"vs float64 reference: hubkernels {err_new:.3g}, eager {err_eager:.3g}")
    loss_ref = ref_out.loss.item()
    print(f"loss, abs error vs float64 reference: hubkernels {abs(out.loss.item() - loss_ref):.3g}, "
          f"eager {abs(eager_out.loss.item() - loss_ref):.3g}")
    if train:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        print(f"backward: {len(grads)} parameter gradients, all finite: "
              f"{all(torch.isfinite(g).all().item() for g in grads)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hubcompile demo", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--train", action="store_true", help="compile a training step (forward+backward)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--attn", choices=["eager", "sdpa"], default="eager",
                        help="the model's attention implementation (eager attention is a pattern hubcompile replaces)")
    args = parser.parse_args(argv)
    return run(args.layers, args.dtype, args.train, args.device, args.attn)
