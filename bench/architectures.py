"""Which families hubkernels replaces in transformers architectures, on CPU.

    python bench/architectures.py --out DIR [--models Llama,Cohere,...] [--dtype float32|bfloat16]

Each model class is built from a tiny config (two layers, hidden size 48, random weights,
eager attention) and compiled for inference; its table row counts the norm, MLP and
attention modules it has beside what each family replaced, the reasons of what was kept,
and the compiled logits' largest difference from eager's (relative to their largest
value). A family that replaces fewer instances than the model has modules of its kind is
a miss to look at. No GPU needed: this checks what matches, not how fast it runs.
Writes ``architectures.jsonl`` and ``architectures.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, moe_intermediate_size=32, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
            shared_expert_intermediate_size=32)

# Architectures whose config needs more than TINY: {name: (config class name, extra settings)}
SPECIAL = {
    "Gemma3": ("Gemma3TextConfig", {}),
    "Qwen3Next": ("Qwen3NextConfig", {"layer_types": ["full_attention", "full_attention"]}),
}

MODELS = ("Llama Mistral Qwen2 Qwen3 Gemma Gemma2 Gemma3 Phi3 Apertus Arcee BitNet Cohere Cohere2 Cwm DiffLlama Doge "
          "Ernie4_5 Exaone4 Glm Glm4 Glm4Moe GptOss Granite Helium HunYuanDenseV1 Jais2 Lfm2 Ministral Mixtral Nemotron "
          "Olmo2 Olmo3 Olmoe Persimmon Qwen2Moe Qwen3Moe Qwen3Next SeedOss SmolLM3 GPTBigCode").split()
SMALL_MODELS = ("Llama", "Nemotron")  # --small: a smoke test of this script


def _modules(model) -> dict:
    """How many norm, MLP and attention modules the model has, by their class names."""
    counts = collections.Counter()
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            counts["RMSNorm"] += 1
        elif "LayerNorm" in name:
            counts["LayerNorm"] += 1
        elif name.endswith(("MLP", "FeedForward")):
            counts["MLP"] += 1
        elif name.endswith("Attention"):
            counts["attention"] += 1
    return dict(counts)


def check(name: str, dtype: torch.dtype) -> dict:
    import transformers

    import hubcompile

    config_name, extra = SPECIAL.get(name, (f"{name}Config", {}))
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, f"{name}ForCausalLM")
    known = config_cls().to_dict()
    config = config_cls(**{k: v for k, v in TINY.items() if k in known or k == "head_dim"}, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(config).to(dtype).eval()
    ids = torch.randint(3, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    hubcompile.RECORDS.clear()
    with torch.no_grad():
        eager = model(ids).logits.float()
        compiled = torch.compile(model, backend="hubkernels", options={"perf_guard": "off"})(ids).logits.float()
    replaced, kept = collections.Counter(), collections.defaultdict(collections.Counter)
    for record in hubcompile.RECORDS:
        replaced.update({f: n for f, n in record.replaced.items() if n})
        for family, refusals in record.refused.items():
            kept[family].update(why for _, why in refusals)
    return {"model": name, "modules": _modules(model), "replaced": dict(replaced),
            "kept": {f: dict(c) for f, c in kept.items() if c},
            "max_rel_diff": float((compiled - eager).abs().max() / eager.abs().max())}


def table(rows: list[dict]) -> str:
    lines = ["| model | modules | replaced | kept (why) | max rel. diff |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | failed: {r['error']} | |")
            continue
        mods = ", ".join(f"{k} {v}" for k, v in sorted(r["modules"].items()))
        done = ", ".join(f"{k} {v}" for k, v in sorted(r["replaced"].items()))
        kept = "; ".join(f"{f} {n} ({why})" for f, c in r["kept"].items() for why, n in c.items())
        lines.append(f"| {r['model']} | {mods} | {done} | {kept} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/architectures")
    parser.add_argument("--models", help="comma-separated transformers names (LlamaForCausalLM: Llama); "
                                          "default: every one this script knows")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--small", action="store_true", help="two models: a smoke test of this script")
    args = parser.parse_args()
    models = args.models.split(",") if args.models else (SMALL_MODELS if args.small else MODELS)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in models:
        try:
            row = check(name, getattr(torch, args.dtype))
        except Exception as e:  # noqa: BLE001 - one model's failure is its row
            row = {"model": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(Path(args.out) / "architectures.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    (Path(args.out) / "architectures.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
