"""Gemma 2 and Gemma 3 (text) as a relax.frontend.nn model with the TIR paged KV cache (Gemma Team,
arXiv 2408.00118 and 2503.19786).

The block is LLaMA's with these differences: (1 + weight) RMSNorms, before and after attention and the MLP; a GeGLU
MLP (tanh GELU); embeddings scaled by sqrt(hidden) (in fp16, the export's dtype, as transformers scales in the
model's dtype); an explicit head_dim and attention scaled by query_pre_attn_scalar**-0.5; Gemma 3's per-head q/k
norms before RoPE; final logit soft-capping (Gemma 2); sliding-window layers alternating with global ones.

What TVM 0.27's paged KV cache (`tvm.relax.frontend.nn.llm.kv_cache`) offers, and how each need is met:
- Sliding window. The cache takes a per-layer attention kind ("mha_sliding", with `layer_sliding_window_size`): for
  those layers it hands its attention kernels only the pages of the last `window` keys. What went wrong with it
  before (logits off by ~100% of their range past the window on a tiny model, NaN for some prefill chunkings such as
  24 tokens as 11 + 11 + 2 with a window of 12) has two causes, both in the kernels, not in the page bookkeeping
  (this wheel passes the window to the runtime; the hard-coded 1024 of older runtime sources is gone): (1) the
  ragged kernel, which runs a prefill chunk's attention to itself for every layer, has no window mask; (2) the CPU
  paged-prefill kernel, which runs the chunk's queries against the cached keys, leaves its running softmax maximum
  unset when a query's first keys are masked, which happens exactly for sliding layers past the window
  (tvm_schedules/workarounds.py `own_attention`, bug 4; reproduced: NaN logits with 12-token chunks). So: every
  prefill chunk stays within the window (export/build.py `prefill_chunk`), where a query's in-chunk keys are all in
  its window; and every export runs edgequant's own attention kernels (tvm_schedules/paged_attention_cpu.py on cpu
  targets, paged_attention_gpu.py on GPU and mobile ones), exact past the window over the model's whole context (a
  query sees the `window` latest keys, itself included: transformers' mask).
- RoPE: the cache applies one RoPE (one base) to every layer. Gemma 3's local layers use another base
  (`rope_local_base_freq`), so where the bases differ the cache runs with RopeMode.NONE and the graph rotates q and
  k itself (`_rotate`, positions from the cache's `get_query_positions`), with each layer's own base.
- Attention logit soft-capping (Gemma 2's `attn_logit_softcapping`, cap * tanh(score / cap) before the softmax): the
  scores never leave the cache's kernels, so the cap goes inside them: TVM's stock kernels lack it, edgequant's take
  it on every target. The final logit soft-cap is an ordinary op on the logits.
"""
from __future__ import annotations

import numpy as np
from dataclasses import dataclass

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from edgequant.errors import EdgequantError
from edgequant.models import family_for

from . import llama as _llama
from .llama import ArchConfig, LlamaForCausalLM

FAMILIES = ("gemma2", "gemma3")   # the edgequant.models families this graph implements
_ACTS = ("gelu_pytorch_tanh", "gelu_tanh")


@dataclass(frozen=True)
class GemmaArchConfig(ArchConfig):
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None
    qk_norm: bool = False                                   # Gemma 3's per-head q/k norms
    layer_types: tuple = ()                                 # "sliding_attention" / "full_attention" per layer
    rope_local_theta: float | None = None                   # local layers' RoPE base where it differs (Gemma 3)
    rope_local_scale: float = 1.0

    @classmethod
    def _from_hf(cls, c: dict) -> "GemmaArchConfig":
        mt = c.get("model_type")
        if family_for(mt).name not in FAMILIES:
            raise EdgequantError(f"the Gemma graph exports gemma2 and gemma3_text models, not '{mt}'")
        act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in _ACTS:
            raise EdgequantError(f"hidden_activation '{act}' is not supported by export (only {', '.join(_ACTS)})")
        rp = dict(c.get("rope_parameters") or {})
        if "full_attention" in rp or "sliding_attention" in rp:   # Gemma 3: one RoPE per layer type
            glob, local = _rope(rp.get("full_attention") or {}), _rope(rp.get("sliding_attention") or {})
        else:
            glob = local = _rope({**rp, **({"rope_theta": c["rope_theta"]} if "rope_theta" in c else {})})
        n = int(c["num_hidden_layers"])
        # the family's (transformers') layer kinds; their shape and window are checked with the config
        # (checkpoint.check_model_config) before a config reaches export
        types = tuple(family_for(mt).layer_types(c))
        sw = c.get("sliding_window")
        if c.get("use_bidirectional_attention"):
            raise EdgequantError("bidirectional Gemma models (use_bidirectional_attention) are not causal LMs; "
                                 "export supports causal ones")
        d = family_for(mt).dims(c)
        return cls(model_type=mt, vocab_size=int(c["vocab_size"]), hidden_size=int(d.hidden),
                   intermediate_size=int(d.intermediate), num_layers=n, num_heads=int(d.heads),
                   num_kv_heads=int(d.kv_heads), head_dim=int(d.head_dim),
                   rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=glob[0], rope_scale=glob[1],
                   tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
                   context_window=int(c.get("max_position_embeddings", 8192)),
                   sliding_window=int(sw) if "sliding_attention" in types else None,
                   sliding_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
                   query_pre_attn_scalar=float(c.get("query_pre_attn_scalar") or d.head_dim),
                   final_logit_softcapping=c.get("final_logit_softcapping"),
                   attn_logit_softcapping=c.get("attn_logit_softcapping"),
                   qk_norm=family_for(mt).name == "gemma3", layer_types=types,
                   rope_local_theta=None if local == glob else local[0],
                   rope_local_scale=1.0 if local == glob else local[1])

    @property
    def graph_rope(self) -> bool:
        """Whether the graph applies RoPE (two bases) instead of the cache (one)."""
        return self.rope_local_theta is not None

    def layer_rope(self, i: int) -> tuple[float, float]:
        local = self.layer_types[i] == "sliding_attention" and self.graph_rope
        return (self.rope_local_theta, self.rope_local_scale) if local else (self.rope_theta, self.rope_scale)


def _rope(p: dict) -> tuple[float, float]:
    """(base, position scale) of one RoPE: default, or linear (positions / factor)."""
    rtype = p.get("rope_type", p.get("type", "default"))
    theta = float(p.get("rope_theta", 10000.0))
    if rtype == "default":
        return theta, 1.0
    if rtype == "linear":
        return theta, 1.0 / float(p["factor"])
    raise EdgequantError(f"RoPE scaling '{rtype}' is not supported by the Gemma export (default, linear)")


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaling by (1 + weight); `weight` is stored as the checkpoint holds it."""

    def __init__(self, dim: int, eps: float):
        self.weight = nn.Parameter((dim,), "float16")
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return op.rms_norm(x, self.weight + 1.0, axes=[-1], epsilon=self.eps)


def _rotate(qkv: Tensor, pos: Tensor, heads: int, theta: float, scale: float) -> Tensor:
    """HF rotate-half RoPE on the first `heads` heads of qkv [b, s, F, D] (q and k); v passes unchanged. `pos`
    holds each row's position in its sequence (b * s,)."""
    d = qkv.shape[-1]
    half = d // 2

    def compute(x, p):
        s = x.shape[1]   # the TE tensor's own (bound) sequence length, not the relax one

        def fn(i, j, h, k):
            t = p[i * s + j].astype("float32") * tirx.const(scale, "float32")
            inv = tirx.const(1.0, "float32") / tirx.power(tirx.const(theta, "float32"),
                                                           ((k % half) * 2).astype("float32") / float(d))
            ang = t * inv
            xf = x[i, j, h, k].astype("float32")
            other = tirx.if_then_else(k < half, -x[i, j, h, k + half], x[i, j, h, k - half]).astype("float32")
            rot = (xf * tirx.cos(ang) + other * tirx.sin(ang)).astype(x.dtype)
            return tirx.if_then_else(h < heads, rot, x[i, j, h, k])
        return te.compute(x.shape, fn, name="gemma_rope")
    return op.tensor_expr_op(compute, "gemma_rope", [qkv, pos])


class GemmaAttention(_llama.Attention):
    def _head_norm(self) -> nn.Module:
        return GemmaRMSNorm(self.c.head_dim, self.c.rms_norm_eps)

    def _rope(self, qkv: Tensor, pos: Tensor, layer_id: int) -> Tensor:
        theta, scale = self.c.layer_rope(layer_id)
        return _rotate(qkv, pos, self.c.num_heads + self.c.num_kv_heads, theta, scale)

    def _sm_scale(self) -> float:
        return self.c.query_pre_attn_scalar ** -0.5


class GemmaMLP(_llama.MLP):
    def _act(self, gate: Tensor) -> Tensor:
        return op.gelu(gate, approximate="tanh")


class GemmaDecoderLayer(nn.Module):
    def __init__(self, c: GemmaArchConfig, plans, i, gpu_gemv):
        prefix = family_for(c.model_type).layer_prefix(i)
        self.self_attn = GemmaAttention(c, plans, prefix, gpu_gemv)
        self.mlp = GemmaMLP(c, plans, prefix, gpu_gemv)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, GemmaRMSNorm(c.hidden_size, c.rms_norm_eps))

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), kv, layer_id))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, c: GemmaArchConfig, plans, gpu_gemv):
        self.embed_tokens = _llama.embedding_for(c, plans)
        self.layers = nn.ModuleList([GemmaDecoderLayer(c, plans, i, gpu_gemv) for i in range(c.num_layers)])
        self.norm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)


class GemmaForCausalLM(LlamaForCausalLM):
    """LLaMA's functions (prefill, decode, prefill_logits, the spec) over Gemma's blocks; parameter names mirror
    the HF checkpoint."""

    MODEL = GemmaModel

    def embed(self, input_ids: Tensor):
        # transformers scales in the model's dtype: sqrt(hidden) rounded to fp16 here
        return self.model.embed_tokens(input_ids) * float(np.float16(self.c.hidden_size ** 0.5))

    def _logits(self, h: Tensor) -> Tensor:
        logits = super()._logits(h)
        cap = self.c.final_logit_softcapping
        return op.tanh(logits / cap) * cap if cap else logits
