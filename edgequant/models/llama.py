"""The LLaMA family: llama, mistral, qwen2 (q/k/v biases) and SmolLM, which share the pre-norm block
norm -> q/k/v -> rotary attention (grouped-query) -> o, norm -> gate/up -> SiLU-gated -> down.
"""
from .family import Family, LetPair, Linear, LinearGroup, Norm

_Q, _K, _V, _O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
_GATE, _UP, _DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"

LLAMA_FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    layers_path="model.layers",
    pre_block=("model.embed_tokens", "model.rotary_emb"),
    linears=(
        Linear(_Q, ("q",), "hidden"), Linear(_K, ("kv",), "hidden"), Linear(_V, ("kv",), "hidden"),
        Linear(_O, ("hidden",), "q"),
        # OWQ's recipe: fewer weak columns in the (larger) MLP
        Linear(_GATE, ("intermediate",), "hidden", 0.375), Linear(_UP, ("intermediate",), "hidden", 0.375),
        Linear(_DOWN, ("hidden",), "intermediate", 0.375),
    ),
    groups=(LinearGroup((_Q, _K, _V)), LinearGroup((_O,)), LinearGroup((_GATE, _UP)), LinearGroup((_DOWN,))),
    norms=(Norm("input_layernorm"), Norm("post_attention_layernorm")),
    let_pairs=(
        LetPair("qkv", "norm", "input_layernorm", (_Q, _K, _V)),
        LetPair("fc1", "norm", "post_attention_layernorm", (_GATE, _UP)),
        LetPair("vo", "attn_v", _V, (_O,)),
        LetPair("qk", "rope_qk", _K, (_Q,)),
        LetPair("down", "rows", _UP, (_DOWN,)),   # exact: the MLP is silu(gate) * up, linear in up
    ),
    # export stacks q/k/v and gate/up into one linear each (same K, same scheme), so a block runs four matmuls
    export_fusions={"self_attn.qkv_proj": (_Q, _K, _V), _O: (_O,), "mlp.gate_up_proj": (_GATE, _UP), _DOWN: (_DOWN,)},
    fixed_biases={"qwen2": (_Q, _K, _V)},
    bias_flags={"llama": ("attention_bias", "mlp_bias")},
    gated_mlp=(_GATE, _UP, "mlp.act_fn"),
)
