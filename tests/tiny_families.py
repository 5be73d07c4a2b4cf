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


def write_gguf(model, tokenizer, path, rope_factors: bool = False, extra=None):
    """`model` (qwen3 or phi3) as an F32 GGUF with the metadata and byte-level BPE tokenizer transformers' reader
    needs; tensor names from gguf-py's map of the HF names. `rope_factors`: add the longrope factor tensors a Phi-3.5
    GGUF carries; `extra(writer)` adds more metadata."""
    import json

    import gguf
    import numpy as np
    c, arch = model.config, model.config.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if getattr(c, "head_dim", None):
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = sorted(tj["model"]["vocab"], key=tj["model"]["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL for t in tokens])
    for add in (w.add_bos_token_id, w.add_eos_token_id, w.add_pad_token_id):
        add(0)
    if extra:
        extra(w)
    names = gguf.get_tensor_name_map({"qwen3": gguf.MODEL_ARCH.QWEN3, "phi3": gguf.MODEL_ARCH.PHI3}[arch],
                                     c.num_hidden_layers)
    for k, v in model.state_dict().items():
        w.add_tensor(names.get_name(k, try_suffixes=(".weight", ".bias")), v.numpy().astype(np.float32))
    if rope_factors:
        half = c.hidden_size // c.num_attention_heads // 2
        w.add_tensor("rope_factors_short.weight", np.ones(half, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
