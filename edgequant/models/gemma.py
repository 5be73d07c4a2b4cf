"""The Gemma 2 and Gemma 3 (text) families (Gemma Team, arXiv 2408.00118 and 2503.19786). Their blocks have the
LLaMA family's seven linears, read in the same groups, but four (1 + weight) RMSNorms: before and after attention,
before and after the GeGLU MLP (`pre_feedforward_layernorm` feeds gate/up; the two post-norms read o's and down's
outputs). Gemma 3 adds per-head RMSNorms on q and k before RoPE.

LET pairs, and why each is exact (or left out):
- `qkv` (input_layernorm -> q/k/v) and `fc1` (pre_feedforward_layernorm -> gate/up): the norm's effective weight
  1 + w becomes (1 + w) / s (`norm_weight_offset`), consumers' columns * s. The post-norms read o's and down's
  *outputs*, and an RMSNorm divides by its input's RMS, so no scale passes through them: they pair with nothing.
- `vo` (v -> o) and `down` (up -> down): attention mixes tokens, not channels, and gelu_tanh(gate) * up is linear
  in up, so both hold as in LLaMA. Soft-capping (Gemma 2) acts on q.k, which neither changes.
- `qk` (q rows * s, k rows / s): exact for Gemma 2, whose q.k is unchanged by it (soft-capping and the
  query_pre_attn_scalar scale act on that product). Not for Gemma 3: q_norm/k_norm divide each head by its RMS,
  which undoes a per-channel scale on q_proj's rows, so there the pair is absent.
"""
from dataclasses import replace

from .family import LetPair, Norm
from .llama import LLAMA_FAMILY

_Q, _K, _V, _O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
_GATE, _UP, _DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"

_NORMS = (Norm("input_layernorm"), Norm("post_attention_layernorm"), Norm("pre_feedforward_layernorm"),
          Norm("post_feedforward_layernorm"))
_QKV = LetPair("qkv", "norm", "input_layernorm", (_Q, _K, _V))
_FC1 = LetPair("fc1", "norm", "pre_feedforward_layernorm", (_GATE, _UP))
_VO = LetPair("vo", "attn_v", _V, (_O,))
_DOWN_PAIR = LetPair("down", "rows", _UP, (_DOWN,))

# the linears, their groups and export's fusions are LLaMA's: only norms and LET pairs differ
GEMMA2_FAMILY = replace(
    LLAMA_FAMILY, name="gemma2", model_types=("gemma2",), norms=_NORMS, norm_weight_offset=1.0,
    let_pairs=(_QKV, _FC1, _VO, LetPair("qk", "rope_qk", _K, (_Q,)), _DOWN_PAIR))

GEMMA3_FAMILY = replace(
    LLAMA_FAMILY, name="gemma3", model_types=("gemma3_text",), norm_weight_offset=1.0,
    norms=_NORMS + (Norm("self_attn.q_norm", "head_dim"), Norm("self_attn.k_norm", "head_dim")),
    let_pairs=(_QKV, _FC1, _VO, _DOWN_PAIR))
