"""The Phi-3 family (Phi-3-mini, Phi-3.5-mini): the LLaMA block with q/k/v stored as one `qkv_proj` (rows q, k, v)
and gate/up as one `gate_up_proj` (rows gate, up). The fused linears are quantized as stored: one weight, one scheme,
one Hessian; OWQ's weak-column ratio follows each fused linear's parts (attention 1, MLP 0.375, as for LLaMA).

LET: only the two norm pairs (input norm -> qkv_proj, post-attention norm -> gate_up_proj). The v -> o, q/k (RoPE)
and up -> down pairs scale a slice of a fused linear's rows, which the LET algebra (`calibrate/omniquant/let.py`:
whole producers) does not express, so they are left out.
"""
from .family import Family, LetPair, Linear, LinearGroup, Norm

_QKV, _O = "self_attn.qkv_proj", "self_attn.o_proj"
_GATE_UP, _DOWN = "mlp.gate_up_proj", "mlp.down_proj"

PHI3_FAMILY = Family(
    name="phi3",
    model_types=("phi3",),
    layers_path="model.layers",
    pre_block=("model.embed_tokens", "model.rotary_emb"),
    linears=(
        Linear(_QKV, ("q", "kv", "kv"), "hidden"), Linear(_O, ("hidden",), "q"),
        Linear(_GATE_UP, ("intermediate", "intermediate"), "hidden", 0.375),
        Linear(_DOWN, ("hidden",), "intermediate", 0.375),
    ),
    groups=(LinearGroup((_QKV,)), LinearGroup((_O,)), LinearGroup((_GATE_UP,)), LinearGroup((_DOWN,))),
    norms=(Norm("input_layernorm"), Norm("post_attention_layernorm")),
    let_pairs=(LetPair("qkv", "norm", "input_layernorm", (_QKV,)),
               LetPair("fc1", "norm", "post_attention_layernorm", (_GATE_UP,))),
    # already stored fused in the order export's graph splits them (q, k, v; gate, up)
    export_fusions={n: (n,) for n in (_QKV, _O, _GATE_UP, _DOWN)},
)
