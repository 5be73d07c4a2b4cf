"""The LLaMA-shaped families (llama, mistral, qwen2 with q/k/v biases, SmolLM, Llama 3.x; qwen3 with per-head q/k norms;
phi3 with q/k/v and gate/up stored fused) as a relax.frontend.nn model with the TIR paged KV cache.

Functions follow MLC-LLM's model-library names: `embed`, `prefill` (last-token logits), `decode`,
`create_paged_kv_cache`, plus `prefill_logits` (logits of every position, for perplexity) and `_metadata` (added by
the builder). q/k/v and gate/up are fused into one linear each (the family's `export_fusions`, rows concatenated by
`export/params.py`), so a block runs four matmul kernels. CUDA decode also runs the RMSNorms, the SiLU-gated product
and the residual adds inside those four GEMVs (`DECODE_FUSIONS`, `_linear`): decode is launch-bound at batch 1. CUDA
libraries also carry `argmax` (greedy sampling on the device; CPU ones its twin, for tests). RoPE (HF rotate-half,
theta and scaling from the config) is applied inside the cache for default, linear and llama3 (Llama 3.x) scaling. longrope/su (Phi-3) is applied by
the graph before the cache (`_rope_longrope`: TVM 0.27's own longrope kernel does not build), at the cache's query
positions, with transformers' two factor sets: short while the sequence is within original_max_position_embeddings,
long past it. `prefill` and `decode` pick them by the call's last position (transformers' rule per forward), and
`prefill_long` / `prefill_logits_long` take the long ones at every position: the runner re-encodes the sequence
with them when it first grows past original_max_position_embeddings, as transformers' Phi-3 `generate` drops its
cache there (export/runtime.py), so no key rotated with the short factors stays in the cache of a long sequence.
A sliding window (mistral, phi3: the same window on every layer) is exact past the window on every target, where
edgequant's attention kernels apply it (tvm_schedules/paged_attention_cpu.py and paged_attention_gpu.py, through
tvm_schedules/workarounds.py own_attention); the context is the model's.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from edgequant.errors import EdgequantError
from edgequant.models import FAMILIES, family_for

from edgequant.tvm_schedules.workarounds import own_attention

from .. import graph_decode, pdl
from ..quant_linear import DenseLinear, Embedding, QuantEmbedding, QuantLinear, quant_matmul

FAMILY_NAMES = ("llama", "qwen3", "phi3")   # the edgequant.models families this graph implements
# targets whose libraries carry `argmax` (greedy sampling on the device; CUDA's kernel uses 32-lane warp shuffles;
# CPU libraries carry its serial twin, which the CPU runner leaves to tests: np.argmax is faster there; other GPU
# targets have neither yet)
ARGMAX_TARGETS = ("cuda", "llvm")


def _sliding_layers(c: dict, n: int) -> tuple[int | None, tuple[int, ...]]:
    """(window, the layers attending through it) as transformers' forward computes them for this model type: mistral
    and phi3 apply `sliding_window` to every layer unless it is null (their models ignore `layer_types`); qwen2 and
    qwen3 only under `use_sliding_window`, on the layers `layer_types` names, else on those from `max_window_layers`
    on; llama's model has no window at all. `layer_types` itself, and the combinations no transformers model runs
    (sliding layers without a window, on llama/phi3, any on mistral), are refused by `checkpoint.check_model_config`
    before a config reaches export."""
    mt, window = c["model_type"], c.get("sliding_window")
    if mt in ("mistral", "phi3"):
        return (window, tuple(range(n))) if window else (None, ())
    if mt not in ("qwen2", "qwen3"):
        return None, ()
    window = window if c.get("use_sliding_window") else None
    types = c.get("layer_types") or ["sliding_attention" if window and i >= c.get("max_window_layers", 28)
                                     else "full_attention" for i in range(n)]
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return (window, sliding) if sliding and window else (None, ())


@dataclass(frozen=True)
class ArchConfig:
    """What the exported graph needs from a HF config.json."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scale: float = 1.0
    rope_scaling: dict = field(default_factory=dict)   # TVM's form (llama3), {} for default/linear
    tie_word_embeddings: bool = False
    context_window: int = 2048
    sliding_window: int | None = None
    qk_norm: bool = False                  # per-head RMSNorm on q and k before RoPE (qwen3)
    rope_short_factors: tuple = ()         # longrope: one frequency divisor per RoPE pair (applied by the graph)
    rope_long_factors: tuple = ()          # longrope: the same, for calls reaching past rope_original_context
    rope_original_context: int = 0         # longrope: original_max_position_embeddings
    attention_factor: float = 1.0          # longrope: the scale of cos and sin
    # run in the cache as "mha_sliding" with `sliding_window` (exact past the window, see
    # tvm_schedules/workarounds.py own_attention); empty: every layer full attention
    sliding_layers: tuple = ()
    attn_logit_softcapping: float | None = None   # cap * tanh(score / cap) in the cache's kernels

    @classmethod
    def from_hf(cls, c: dict) -> "ArchConfig":
        try:
            return cls._from_hf(c)
        except (KeyError, TypeError, ValueError) as e:
            raise EdgequantError(f"config.json lacks or mistypes a field export needs ({type(e).__name__}: {e}); "
                                 "restore the model's config.json") from None

    @classmethod
    def _from_hf(cls, c: dict) -> "ArchConfig":
        types = sorted(t for t, f in FAMILIES.items() if f.name in FAMILY_NAMES)
        if c.get("model_type") not in types:
            raise EdgequantError(f"export supports {', '.join(types)} models, not '{c.get('model_type')}'")
        if c.get("hidden_act", "silu") != "silu":
            raise EdgequantError(f"hidden_act '{c['hidden_act']}' is not supported by export (only silu)")
        rp = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = float(rp.get("rope_theta", c.get("rope_theta", 10000.0)))
        rtype = rp.get("rope_type", rp.get("type", "default"))
        if float(rp.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))) != 1.0:
            raise EdgequantError("partial_rotary_factor other than 1 is not supported by export yet")
        ctx = int(c.get("max_position_embeddings", 2048))
        scale, scaling, ext, attn_factor, long, orig = 1.0, {}, (), 1.0, (), 0
        if rtype == "linear":
            scale = 1.0 / float(rp["factor"])
        elif rtype == "llama3":
            scaling = {k: rp[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                           "original_max_position_embeddings")}
            scaling["rope_type"] = "llama3"
        elif rtype in ("longrope", "su"):
            ext, long, attn_factor, orig = _longrope(c, rp, ctx)
        elif rtype != "default":
            raise EdgequantError(f"RoPE scaling '{rtype}' is not supported by export yet (default, linear, llama3, "
                                 "longrope/su)")
        sw, sliding = _sliding_layers(c, int(c["num_hidden_layers"]))
        family = family_for(c["model_type"])
        d = family.dims(c)
        return cls(model_type=c["model_type"], vocab_size=int(c["vocab_size"]), hidden_size=int(d.hidden),
                   intermediate_size=int(d.intermediate), num_layers=int(c["num_hidden_layers"]),
                   num_heads=int(d.heads), num_kv_heads=int(d.kv_heads), head_dim=int(d.head_dim),
                   rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scale=scale,
                   rope_scaling=scaling, tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                   context_window=ctx, sliding_window=int(sw) if sw else None,
                   qk_norm=any(n.name == "self_attn.q_norm" for n in family.norms), rope_short_factors=ext,
                   rope_long_factors=long, rope_original_context=orig, attention_factor=attn_factor,
                   sliding_layers=sliding)

    @property
    def graph_rope(self) -> bool:
        """Whether the graph applies RoPE instead of the cache (longrope: `_rope_longrope`)."""
        return bool(self.rope_short_factors)

    @property
    def own_attention(self) -> bool:
        """Whether the cache needs edgequant's attention kernels (a window, or a soft-cap): TVM's stock kernels are
        kept where neither is (tvm_schedules/workarounds.py own_attention)."""
        return bool(self.sliding_layers or self.attn_logit_softcapping)


def _longrope(c: dict, rp: dict, ctx: int) -> tuple[tuple, tuple, float, int]:
    """(short factors, long factors, attention factor, original_max_position_embeddings) of a longrope/su config, as
    transformers' `_compute_longrope_parameters` computes them."""
    orig = int(rp.get("original_max_position_embeddings") or c.get("original_max_position_embeddings") or ctx)
    factor = float(rp.get("factor") or ctx / orig)
    af = rp.get("attention_factor")
    af = float(af) if af is not None else (math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0)
    d = family_for(c["model_type"]).dims(c)
    factors = []
    for key in ("short_factor", "long_factor"):
        f = [float(x) for x in rp[key]]
        if len(f) != d.head_dim // 2:
            raise EdgequantError(f"longrope {key} needs head_dim / 2 = {d.head_dim // 2} values, not {len(f)}; "
                                 "restore the model's config.json")
        factors.append(tuple(f))
    return factors[0], factors[1], af, orig


def decode_fusions_enabled() -> bool:
    """Decode's RMSNorms, SiLU-gated products and residual adds inside the GEMVs (one kernel per linear, four per
    block instead of nine); `DECODE_FUSIONS = False` or EDGEQUANT_DECODE_FUSE=0 at export time keeps separate
    kernels. Only where the decode GEMV runs (CUDA, or its CPU twin in tests)."""
    import os
    return DECODE_FUSIONS and os.environ.get("EDGEQUANT_DECODE_FUSE", "1") != "0"


DECODE_FUSIONS = True


def _fused(lin, x: Tensor, norm=None, **kw) -> Tensor | None:
    """`QuantLinear.decode_fused` of a quantized linear with the decode fusions on; None where it does not apply."""
    return lin.decode_fused(x, norm, **kw) if isinstance(lin, QuantLinear) and decode_fusions_enabled() else None


def _linear(lin, x: Tensor, norm=None, glu: bool = False, residual: Tensor | None = None) -> Tensor:
    """lin(norm(x)) or lin(silu(gate) * up) (x = [gate | up]), plus `residual`: one decode GEMV kernel where
    `QuantLinear.decode_fused` applies, else the separate ops (prefill, dense or OWQ linears, fusions off)."""
    y = _fused(lin, x, norm, glu=glu, residual=residual)
    if y is not None:
        return y
    if norm is not None:
        x = norm(x)
    if glu:
        gate, up = op.split(x, 2, axis=-1)
        x = op.silu(gate) * up
    y = lin(x)
    return residual + y if residual is not None else y


# Tests set this to route CPU decode through the GEMV's serial twin (same index and bit math, no thread bindings),
# which checks the CUDA decode wiring (arguments, zero points, outlier columns, bias) against PyTorch without a GPU.
DECODE_GEMV_TWIN_ON_CPU = False


def _make_linear(plan, gpu_gemv: str | None):
    if plan.spec is None:
        return DenseLinear(plan.k, plan.n, bias=plan.bias, decode_gemv=gpu_gemv)
    return QuantLinear(plan.spec, n_outliers=plan.n_outliers, bias=plan.bias, decode_gemv=gpu_gemv)


class Attention(nn.Module):
    """A family's graph that subclasses this one overrides the hooks: its head norm, graph RoPE and softmax scale."""

    def __init__(self, c: ArchConfig, plans, prefix, gpu_gemv: str | None):
        self.c = c
        self.qkv_proj = _make_linear(plans[f"{prefix}.self_attn.qkv_proj"], gpu_gemv)
        self.o_proj = _make_linear(plans[f"{prefix}.self_attn.o_proj"], gpu_gemv)
        if c.qk_norm:
            self.q_norm, self.k_norm = self._head_norm(), self._head_norm()

    def _head_norm(self) -> nn.Module:
        return nn.RMSNorm(self.c.head_dim, -1, self.c.rms_norm_eps, bias=False, dtype="float16")

    # longrope: True while the model traces its `*_long` functions (LlamaForCausalLM._body sets it)
    rope_long = False

    def _rope(self, qkv: Tensor, pos: Tensor, layer_id: int) -> Tensor:
        return _rope_longrope(self.c, qkv, pos, self.rope_long)

    def _sm_scale(self) -> float:
        return self.c.head_dim ** -0.5

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int, norm=None, residual: Tensor | None = None):
        """o_proj(attention(qkv_proj(x))), with `norm` applied to x first and `residual` added (see `_linear`)."""
        c = self.c
        b, s, _ = x.shape
        qkv = op.reshape(_linear(self.qkv_proj, x, norm), (b, s, c.num_heads + 2 * c.num_kv_heads, c.head_dim))
        if c.qk_norm:   # qwen3, Gemma 3: RMSNorm over each head's channels of q and k, before RoPE
            q, k, v = op.split(qkv, [c.num_heads, c.num_heads + c.num_kv_heads], axis=2)
            qkv = op.concat([self.q_norm(q), self.k_norm(k), v], dim=2)
        if c.graph_rope:
            qkv = self._rope(qkv, kv.get_query_positions(b * s), layer_id)
        o = kv.attention_with_fused_qkv(layer_id, qkv, c.num_heads, sm_scale=self._sm_scale())
        return _linear(self.o_proj, op.reshape(o, (b, s, c.num_heads * c.head_dim)), residual=residual)


class MLP(nn.Module):
    def __init__(self, c: ArchConfig, plans, prefix, gpu_gemv: str | None):
        self.gate_up_proj = _make_linear(plans[f"{prefix}.mlp.gate_up_proj"], gpu_gemv)
        self.down_proj = _make_linear(plans[f"{prefix}.mlp.down_proj"], gpu_gemv)

    def forward(self, x: Tensor, norm=None, residual: Tensor | None = None):
        """down(act(gate) * up) of gate_up(x), with `norm` applied to x first and `residual` added (`_linear`)."""
        silu = type(self)._act is MLP._act
        # SiLU: the gated product computed once, in gate_up's GEMV (its epilogue), so down reads a plain x; each of
        # down's blocks recomputing it for the whole row cost about two kernels per layer (H200, LLaMA-7B:
        # benchmarks/results/gpu-e2e-split-attention-h200.md)
        prod = _fused(self.gate_up_proj, x, norm, silu_out=True) if silu else None
        if prod is not None:
            return _linear(self.down_proj, prod, residual=residual)
        h = _linear(self.gate_up_proj, x, norm)
        if silu:   # where the epilogue does not apply, the gated product can ride in down_proj's GEMV
            return _linear(self.down_proj, h, glu=True, residual=residual)
        gate, up = op.split(h, 2, axis=-1)
        return _linear(self.down_proj, self._act(gate) * up, residual=residual)

    def _act(self, gate: Tensor) -> Tensor:
        return op.silu(gate)


class DecoderLayer(nn.Module):
    def __init__(self, c: ArchConfig, plans, i, gpu_gemv: str | None):
        prefix = family_for(c.model_type).layer_prefix(i)
        self.self_attn = Attention(c, plans, prefix, gpu_gemv)
        self.mlp = MLP(c, plans, prefix, gpu_gemv)
        self.input_layernorm = nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False, dtype="float16")
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False, dtype="float16")

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int):
        x = self.self_attn(x, kv, layer_id, norm=self.input_layernorm, residual=x)
        return self.mlp(x, norm=self.post_attention_layernorm, residual=x)


def embedding_for(c, plans) -> nn.Module:
    """The token table: quantized when it has a plan under its module name (`--embed-bits`, export/params.py)."""
    table = plans.get(family_for(c.model_type).embed)
    return QuantEmbedding(table.spec) if table is not None else Embedding(c.vocab_size, c.hidden_size, dtype="float16")


def head_for(c, plans, mode: str | None):
    """The untied output layer (quantized when it has a plan), or None when tied to the token table."""
    if c.tie_word_embeddings:
        return None
    head = plans.get(family_for(c.model_type).head)
    return QuantLinear(head.spec, decode_gemv=mode, out_dtype="float32") if head is not None else \
        DenseLinear(c.hidden_size, c.vocab_size, out_dtype="float32", decode_gemv=mode)


class LlamaModel(nn.Module):
    def __init__(self, c: ArchConfig, plans, gpu_gemv: str | None = None):
        self.embed_tokens = embedding_for(c, plans)
        self.layers = nn.ModuleList([DecoderLayer(c, plans, i, gpu_gemv) for i in range(c.num_layers)])
        self.norm = nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False, dtype="float16")


class LlamaForCausalLM(nn.Module):
    """Parameter names mirror the HF checkpoint (`model.layers.3.self_attn.qkv_proj.qweight`, ...)."""
    MODEL = LlamaModel   # the embedding, blocks and final norm; a family's graph that subclasses this one sets its own

    def __init__(self, c: ArchConfig, plans: dict, target):
        self.c = c
        # CUDA decode: quantized linears use the hand-scheduled GEMV (tvm_schedules/gemv.py), the rest dlight
        # (with programmatic dependent launch where every arch is sm_90+: export/pdl.py)
        mode = (("gpu-pdl" if pdl.supported(target) else "gpu") if target.kind.name == "cuda"
                else ("twin" if DECODE_GEMV_TWIN_ON_CPU else None))
        self.model = self.MODEL(c, plans, gpu_gemv=mode)
        self.gpu_gemv = mode
        self.lm_head = head_for(c, plans, mode)
        self.target = target  # read by TIRPagedKVCache: llvm selects its CPU kernels, anything else the GPU ones

    def _logits(self, h: Tensor) -> Tensor:
        emb = self.model.embed_tokens
        if self.lm_head is None and isinstance(emb, QuantEmbedding):   # tied and quantized: the same kernels as a linear
            return quant_matmul(emb.spec, h, emb.params(), self.gpu_gemv, out_dtype="float32")
        if self.lm_head is None:  # tied: the embedding table is the output projection
            return op.matmul(h, op.permute_dims(emb.weight), out_dtype="float32")
        return self.lm_head(h)

    def _body(self, x: Tensor, kv: PagedKVCache, rope_long: bool = False) -> Tensor:
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.rope_long = rope_long   # trace-time switch: the layers' forward stays one signature
            x = layer(x, kv, i)
        return self.model.norm(x)

    def embed(self, input_ids: Tensor):
        return self.model.embed_tokens(input_ids)

    def prefill(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        h = self._body(input_embed, paged_kv_cache)
        last = op.tensor_expr_op(_last_token, "index_last", [h])
        return self._logits(last), paged_kv_cache

    def prefill_logits(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self._body(input_embed, paged_kv_cache)), paged_kv_cache

    # longrope only: prefill and prefill_logits with the long factors at every position, which the runner uses once a
    # sequence is longer than original_max_position_embeddings (export/runtime.py says when)
    def prefill_long(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        h = self._body(input_embed, paged_kv_cache, rope_long=True)
        return self._logits(op.tensor_expr_op(_last_token, "index_last", [h])), paged_kv_cache

    def prefill_logits_long(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self._body(input_embed, paged_kv_cache, rope_long=True)), paged_kv_cache

    def decode(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self._body(input_embed, paged_kv_cache)), paged_kv_cache

    # CUDA decode of one sequence as one captured graph on a cache of our own (export/graph_decode.py)
    def decode_graph(self, token: Tensor, pos: Tensor, cache: Tensor, logits: Tensor):
        return graph_decode.decode_graph(self, token, pos, cache, logits)

    def graph_cache_fill(self, k: Tensor, v: Tensor, cache: Tensor, pos: Tensor):
        return graph_decode.cache_fill(self, k, v, cache, pos)

    def argmax(self, logits: Tensor):
        """Greedy sampling on the device (`tvm_schedules/sample.py`): the runner copies one token id per step
        instead of the logits."""
        from edgequant.tvm_schedules.sample import argmax_func
        f = argmax_func(self.c.vocab_size, gpu=self.target.kind.name == "cuda").without_attr("global_symbol")
        return op.tensor_ir_op(f, "argmax", [logits], Tensor.placeholder((1,), "int32"))

    def create_paged_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                              prefill_chunk_size: tirx.Var, page_size: tirx.Var,
                              support_sliding_window: tirx.Var) -> PagedKVCache:
        c = self.c
        every = len(c.sliding_layers) == c.num_layers   # one window for all: the kernels apply it (bug 5)
        kinds = ["mha_sliding" if i in c.sliding_layers else "mha" for i in range(c.num_layers)] \
            if c.sliding_layers and not every else "mha"
        with own_attention(c.attn_logit_softcapping, c.sliding_window if every else 0) if c.own_attention \
                else contextlib.nullcontext():
            return TIRPagedKVCache(
                attn_kind=kinds, layer_sliding_window_size=c.sliding_window if c.sliding_layers else 1024,
                max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
                prefill_chunk_size=prefill_chunk_size, page_size=page_size,
                support_sliding_window=support_sliding_window,
                layer_partition=rx.ShapeExpr([0, c.num_layers]), num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, qk_head_dim=c.head_dim,
                v_head_dim=c.head_dim, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
                # the graph has rotated q and k already where it applies RoPE itself
                rope_mode=RopeMode.NONE if c.graph_rope else RopeMode.NORMAL, rope_scale=c.rope_scale,
                rope_theta=c.rope_theta,
                rope_scaling=dict(c.rope_scaling), rope_ext_factors=rx.prim_value(0), rotary_dim=c.head_dim,
                enable_disaggregation=False, dtype="float16", target=self.target)

    def get_default_spec(self):
        packed = {"param_mode": "packed", "effect_mode": "none"}

        def step(seq):   # embeddings of `seq` tokens of one sequence through the blocks and the cache
            return {"input_embed": nn.spec.Tensor([1, seq, self.c.hidden_size], "float16"),
                    "paged_kv_cache": nn.spec.Object(object_type=PagedKVCache), "$": packed}
        long = {"prefill_long": step("seq_len"), "prefill_logits_long": step("seq_len")} \
            if self.c.rope_long_factors else {}
        return {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": step("seq_len"), "prefill_logits": step("seq_len"), **long,
            # one sequence per step, as MLC's `decode` (a static row lets the GEMV schedules apply)
            "decode": step(1),
            **({"argmax": {"logits": nn.spec.Tensor([1, 1, self.c.vocab_size], "float32"),
                           "$": {"param_mode": "none", "effect_mode": "none"}}}
               if self.target.kind.name in ARGMAX_TARGETS else {}),
            **(graph_decode.spec(self.c) if graph_decode.enabled(self.c, self.target) else {}),
            "create_paged_kv_cache": {"max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                                      "page_size": int, "support_sliding_window": int,
                                      "$": {"param_mode": "none", "effect_mode": "none"}},
        }


def _rope_longrope(c: ArchConfig, qkv: Tensor, positions: Tensor, long: bool = False) -> Tensor:
    """HF's rotate-half RoPE on the q and k heads of `qkv` [1, s, heads, head_dim] at `positions` [s], with
    frequencies theta^(-2j/head_dim) / factor[j] and cos, sin scaled by the attention factor; the factors are the long
    ones with `long`, or when the call's last position (its largest: one sequence per call) is at or past
    original_max_position_embeddings, as transformers picks them per forward; v passes unchanged."""
    half, rot_heads = c.head_dim // 2, c.num_heads + c.num_kv_heads
    inv = np.stack([longrope_inv_freq(c, c.rope_short_factors), longrope_inv_freq(c, c.rope_long_factors)])
    af = tirx.const(c.attention_factor, "float32")
    orig = c.rope_original_context

    def rope(x, pos, inv_freq):
        n = pos.shape[0]

        def f(b, s, h, d):
            table = 1 if long else tirx.if_then_else(pos[n - 1] >= orig, 1, 0)
            freq = pos[s].astype("float32") * inv_freq[table, d % half]
            other = tirx.if_then_else(d < half, -x[b, s, h, d + half], x[b, s, h, d - half]).astype("float32")
            rotated = (tirx.cos(freq) * x[b, s, h, d].astype("float32") + tirx.sin(freq) * other) * af
            return tirx.if_then_else(h < rot_heads, rotated.astype(x.dtype), x[b, s, h, d])
        return te.compute(x.shape, f, name="rope_longrope")

    return op.tensor_expr_op(rope, "rope_longrope", [qkv, positions, Tensor.from_const(inv)])


def longrope_inv_freq(c: ArchConfig, factors) -> np.ndarray:
    """float32 inverse frequencies 1 / (factor[j] * theta^(2j / head_dim)), transformers' formula."""
    j = np.arange(c.head_dim // 2, dtype=np.float32)
    return (1.0 / (np.array(factors, np.float32) * c.rope_theta ** (2 * j / c.head_dim))).astype("float32")


def _last_token(h):
    b, s, d = h.shape
    return te.compute((b, 1, d), lambda i, _, k: h[i, s - 1, k], name="index_last")
