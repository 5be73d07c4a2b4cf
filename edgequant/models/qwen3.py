"""The Qwen3 family (dense Qwen3 0.6B-32B): the LLaMA block without q/k/v biases, plus a per-head RMSNorm on q and k
before RoPE (`q_norm`, `k_norm`, one weight of head_dim shared by all heads) and an explicit `head_dim` that may
differ from hidden / heads.

LET: the norm pairs (input norms -> q/k/v, post-attention norm -> gate/up), v -> o and up -> down are exact as in
LLaMA. The q/k pair (`rope_qk`, k rows / s, q rows * s) is left out: RMSNorm(k / s) is not RMSNorm(k) / s, so a scale
on the projection's rows does not pass through the per-head norms (OmniQuant, Shao et al. 2024, section 3.3, assumes
q and k reach the attention product directly).
"""
from dataclasses import replace

from .family import Norm
from .llama import LLAMA_FAMILY

# the linears, their groups and export's fusions are LLaMA's
QWEN3_FAMILY = replace(
    LLAMA_FAMILY, name="qwen3", model_types=("qwen3",), bias_flags={"qwen3": ("attention_bias",)},
    norms=LLAMA_FAMILY.norms + (Norm("self_attn.q_norm", "head_dim"), Norm("self_attn.k_norm", "head_dim")),
    let_pairs=tuple(p for p in LLAMA_FAMILY.let_pairs if p.kind != "rope_qk"))
