"""Tiny random configs of the families beyond the LLaMA originals (conftest's `tiny_config` falls back to these):
Llama 3.x (llama3 RoPE scaling, tied embeddings), Qwen3 (per-head q/k norms, head_dim != hidden / heads) and Phi-3
(fused qkv_proj / gate_up_proj, longrope with distinct short and long factors)."""
from __future__ import annotations

FAMILY_ARCHS = ("llama3", "qwen3", "phi3")


def tiny_family_config(arch: str, common: dict):
    from transformers import LlamaConfig, Phi3Config, Qwen3Config
    if arch == "llama3":
        # original_max_position_embeddings small enough that the scaling moves most of head_dim 16's frequencies
        return LlamaConfig(**{**common, "tie_word_embeddings": True},
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=32)   # q: 4 heads x 32 = 128 channels, hidden 64
    if arch == "phi3":
        half = common["hidden_size"] // common["num_attention_heads"] // 2
        return Phi3Config(**common, original_max_position_embeddings=256, pad_token_id=0, bos_token_id=0,
                          eos_token_id=0,
                          rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.15 * i for i in range(half)],
                                        "long_factor": [3.0 + i for i in range(half)]})
    raise ValueError(arch)
