"""The LLaMA family: llama, mistral, qwen2 (q/k/v biases) and SmolLM, which share the pre-norm block
norm -> q/k/v -> rotary attention (grouped-query) -> o, norm -> gate/up -> SiLU-gated -> down.
"""
from .family import Family, LinearGroup

LLAMA_FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    layers_path="model.layers",
    groups=(
        LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), producer="input_layernorm"),
        LinearGroup(("self_attn.o_proj",), producer="self_attn.v_proj"),
        LinearGroup(("mlp.gate_proj", "mlp.up_proj"), producer="post_attention_layernorm"),
        LinearGroup(("mlp.down_proj",), producer="mlp.up_proj"),
    ),
    linear_ratio={"self_attn.q_proj": 1.0, "self_attn.k_proj": 1.0, "self_attn.v_proj": 1.0, "self_attn.o_proj": 1.0,
                  "mlp.gate_proj": 0.375, "mlp.up_proj": 0.375, "mlp.down_proj": 0.375},
)
