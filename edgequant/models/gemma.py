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

from .family import Norm
from .llama import LLAMA_FAMILY

_NORMS = (Norm("input_layernorm"), Norm("post_attention_layernorm"), Norm("pre_feedforward_layernorm"),
          Norm("post_feedforward_layernorm"))
# LLaMA's pairs, in its order, but gate/up read the pre-feedforward norm
_PAIRS = tuple(replace(p, producer="pre_feedforward_layernorm") if p.name == "fc1" else p
               for p in LLAMA_FAMILY.let_pairs)


def _every_nth_full(default: int, key: str | None = None):
    """Layer kinds where config.json lists none, as transformers' Gemma configs fill them in: every n-th layer full,
    the others sliding (Gemma 2: n = 2; Gemma 3: n = `sliding_window_pattern`, 6 by default). A model folder without
    layer_types was exported with Gemma 2's rule: the tokens were not transformers' (fourteenth re-run, S38)."""
    def kinds(c: dict) -> list[str]:
        n = c.get(key, default) if key else default
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else default
        return ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(int(c["num_hidden_layers"]))]
    return kinds


# the linears, their groups and export's fusions are LLaMA's: only norms and LET pairs differ
GEMMA2_FAMILY = replace(
    LLAMA_FAMILY, name="gemma2", model_types=("gemma2",), bias_flags={"gemma2": ("attention_bias",)}, norms=_NORMS,
    norm_weight_offset=1.0, let_pairs=_PAIRS, default_layer_types=_every_nth_full(2))

GEMMA3_FAMILY = replace(
    LLAMA_FAMILY, name="gemma3", model_types=("gemma3_text",), bias_flags={"gemma3_text": ("attention_bias",)},
    norm_weight_offset=1.0, default_layer_types=_every_nth_full(6, "sliding_window_pattern"),
    norms=_NORMS + (Norm("self_attn.q_norm", "head_dim"), Norm("self_attn.k_norm", "head_dim")),
    let_pairs=tuple(p for p in _PAIRS if p.kind != "rope_qk"))
