"""Small transformers models with random weights (no downloads) and the number of
pattern instances each one has."""

import torch
import transformers as T

# Llama-style configs: head_dim 12, 4 query heads over 2 key/value heads (grouped-query).
LLAMA_LIKE = dict(
    vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# Older configs (GPT-NeoX, GPT-J): multi-head attention, their own parameter names.
MHA = dict(vocab_size=96, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# causal_mask: each eager attention's mask is causal, so it runs the kernel's causal mode.
LLAMA_FAMILIES = {"rmsnorm": 5, "silu_gate": 2, "attention": 2, "rotary": 4, "causal_mask": 2}

# name: (config class, model class, config, {family: instances in 2 layers}, compile options)
MODELS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, LLAMA_LIKE, LLAMA_FAMILIES, None),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, LLAMA_LIKE, LLAMA_FAMILIES, None),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, LLAMA_LIKE, LLAMA_FAMILIES, None),
    # Qwen3 adds an RMSNorm on each head of q and k: 2 more per layer.
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {**LLAMA_LIKE, "head_dim": 12}, {**LLAMA_FAMILIES, "rmsnorm": 9},
              None),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, {**LLAMA_LIKE, "head_dim": 12},
              {"rmsnorm": 5, "gelu_tanh_gate": 2, "attention": 2, "rotary": 4, "causal_mask": 2}, None),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, LLAMA_LIKE, LLAMA_FAMILIES, None),
    # GPT-NeoX: two LayerNorms per layer (parallel residual), a GELU MLP (not a family),
    # partial rotary (6 of 12 dims), q/k/v cut from one fused projection. Inductor's vectorized CPU code for its bf16
    # backward does not compile (a duplicate `at_BFloat16_tmp_acc0_vec` declaration),
    # with or without hubcompile: scalar CPU code there.
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM,
                 {**MHA, "hidden_size": 48, "intermediate_size": 80, "rotary_pct": 0.5, "max_position_embeddings": 64},
                 {"layer_norm": 5, "attention": 2, "rotary": 4, "causal_mask": 2}, {"cpp.simdlen": 1}),
    # GPT-J: one LayerNorm per layer feeding attention and MLP, interleaved partial rotary
    # (8 of 12 dims), attention upcast to fp32 and divided by sqrt(head_dim).
    "gptj": (T.GPTJConfig, T.GPTJForCausalLM, {**MHA, "n_embd": 48, "n_inner": 80, "rotary_dim": 8, "n_positions": 64},
             {"layer_norm": 3, "attention": 2, "rotary": 4, "causal_mask": 2}, None),
    # NanoChat: RMSNorm without a weight everywhere (one more before the layers), q/k
    # normed after a rotation that turns the other way (rotate_half = cat(x2, -x1)), a
    # ReLU^2 MLP (not a family), soft-capped logits.
    "nanochat": (T.NanoChatConfig, T.NanoChatForCausalLM, {**LLAMA_LIKE, "head_dim": 12},
                 {"rmsnorm": 10, "attention": 2, "rotary": 4, "causal_mask": 2}, None),
    # Llama 4 (text, dense MLPs): layer 0 rotates q/k as complex numbers (not a family) and
    # L2-norms them (RMSNorm without a weight) under a chunked mask (not causal: kept);
    # layer 1 is global with no position encoding (q scaled by a temperature). Its
    # attention's softmax runs in q's dtype, its own spelling in bf16 training.
    "llama4": (T.Llama4TextConfig, T.Llama4ForCausalLM,
               {**LLAMA_LIKE, "head_dim": 12, "intermediate_size_mlp": 80, "moe_layers": [],
                "no_rope_layers": [1, 0], "attention_chunk_size": 8},
               {"rmsnorm": 7, "silu_gate": 2, "attention": 2, "causal_mask": 1}, None),
}


# FalconMamba: its mixer norms of dt, B and C (sliced from one projection) have no weight, 3
# per layer, beside the 2 block norms and the final one (tests/test_spellings.py).
FALCON_MAMBA = dict(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                    time_step_rank=4, pad_token_id=0, use_mambapy=False)


def build(name, dtype=torch.float32, seed=0):
    config_cls, model_cls, config, expected, _ = MODELS[name]
    torch.manual_seed(seed)
    config = config_cls(**config)
    config._attn_implementation = "eager"
    model = model_cls(config).to(dtype).eval()
    return model, expected


def compile_options(name):
    """Inductor options the model needs on this machine (None: the defaults)."""
    options = MODELS[name][4]
    return options if options and not torch.cuda.is_available() else None


def input_ids(batch=2, seq=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, LLAMA_LIKE["vocab_size"], (batch, seq), generator=g)


def replaced(records):
    """{family: matches replaced} over hubcompile GraphRecords, families with none left out."""
    totals = {}
    for record in records:
        for family, count in record.replaced.items():
            if count:
                totals[family] = totals.get(family, 0) + count
    return totals


def train_steps(model, run, batches, lr=0.1):
    """SGD steps of a causal LM through ``run`` (the model, or a compiled or wrapped form of
    it) on each batch of ids; returns (losses, {parameter: norm of its last gradient})."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        loss = run(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP2 shards
            grads[name] = grad.double().norm().item()
    return losses, grads
