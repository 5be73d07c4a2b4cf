"""Tiny random Gemma 2 / Gemma 3 (text) models for tests: explicit head_dim (unlike hidden / heads), a
query_pre_attn_scalar unlike head_dim, small soft-caps (Gemma 2) so they bite, a short sliding window alternating
with global layers, Gemma 3's separate local RoPE base, and random (1 + weight) norm weights."""
from __future__ import annotations

import torch

from conftest import VOCAB

SLIDING_WINDOW = 12   # prompts in the tests run past it
GEMMA_ARCHS = ("gemma2", "gemma3_text")


def tiny_gemma_config(arch: str, soft_caps: bool = True, attn_cap: bool = True, window: int = SLIDING_WINDOW):
    from transformers import Gemma2Config, Gemma3TextConfig
    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, query_pre_attn_scalar=24, sliding_window=window,
                  tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh", attn_implementation="eager",
                  pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if arch == "gemma2":   # layer_types default: sliding, global, sliding
        return Gemma2Config(**common, attn_logit_softcapping=4.0 if soft_caps and attn_cap else None,
                            final_logit_softcapping=8.0 if soft_caps else None)
    if arch == "gemma3_text":
        return Gemma3TextConfig(**common, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                                 "full_attention": {"rope_type": "default", "rope_theta": 1e4}})
    raise ValueError(arch)


def make_tiny_gemma(arch: str, seed: int = 0, soft_caps: bool = True, attn_cap: bool = True,
                    window: int = SLIDING_WINDOW):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_gemma_config(arch, soft_caps, attn_cap, window), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.08)
            elif "norm" in name:   # (1 + weight): random offsets, so a missing "+ 1" cannot pass
                p.normal_(0, 0.3)
            elif "embed_tokens" in name:
                p.normal_(0, 0.05)
    return model
