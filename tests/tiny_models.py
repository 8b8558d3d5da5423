"""Small transformers models with random weights (no downloads) and the number of
pattern instances each one has."""

import torch
import transformers as T

COMMON = dict(
    vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

# name: (config class, model class, extra config, {family: instances in 2 layers})
MODELS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}, {"rmsnorm": 5, "silu_gate": 2, "attention": 2}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {}, {"rmsnorm": 5, "silu_gate": 2, "attention": 2}),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}, {"rmsnorm": 5, "silu_gate": 2, "attention": 2}),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, {"head_dim": 12}, {"rmsnorm": 5, "gelu_tanh_gate": 2, "attention": 2}),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {}, {"rmsnorm": 5, "silu_gate": 2, "attention": 2}),
}


def build(name, dtype=torch.float32, seed=0):
    config_cls, model_cls, extra, expected = MODELS[name]
    torch.manual_seed(seed)
    config = config_cls(**COMMON, **extra)
    config._attn_implementation = "eager"
    model = model_cls(config).to(dtype).eval()
    return model, expected


def input_ids(batch=2, seq=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, COMMON["vocab_size"], (batch, seq), generator=g)
