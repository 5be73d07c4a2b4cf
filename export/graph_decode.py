"""The decode step of one sequence as one CUDA graph: `decode_graph` (embed -> blocks -> norm -> head -> argmax) on a
KV cache of our own, so relax's CUDA-graph rewrite captures the whole step and the runner replays it per token.

TVM's paged KV cache runs RoPE, the append and the attention as three kernels per layer launched from its C++
between the graphs relax captures (the rewrite stops at `vm.builtin` calls), and its bookkeeping runs on the host
per step: ~25 us per layer, which kept SmolLM2-135M's CUDA decode near 1000 tok/s
(benchmarks/results/gpu-launch-smollm2-h200.md). Here every input of `decode_graph` is a tensor the runner owns for
the life of the sequence and never replaces: the token id [1], the position [1], the cache [layers, 2, kv_heads,
max_len, head_dim] and a logits buffer [1, 1, vocab]. Each layer's attention is two kernels
(tvm_schedules/decode_attention.py: RoPE, the append at the position read from the device and the attention, split
over the keys into SPLITS blocks per head; then the merge of each head's partial results), and the
last kernel (tvm_schedules/sample.py, `step=True`) copies the logits out, writes the argmax into the token input and
advances the position, all in place: the next replay needs nothing from the host. The function is marked with
`num_input = 0` (every argument fixed, as the weights are), which is what lets the rewrite capture kernels that read
them; the runner must therefore pass the same tensors on every call (export/runtime.py does).

Prefill still runs on the paged cache (its chunked kernels); `graph_cache_fill` copies what it wrote (TVM's
`debug_get_kv` layout) into our cache before the first graph step. Only where nothing needs the paged cache's own
features: no graph RoPE (longrope, Gemma's per-layer RoPE), no sliding window or soft-cap, default or linear RoPE
scaling; `EDGEQUANT_DECODE_GRAPH=0` at export leaves the function out, at run time makes the runner ignore it.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # the runner imports this module where only the TVM runtime is installed
    from tvm.relax.frontend.nn import Tensor

FUNC = "decode_graph"
FILL = "graph_cache_fill"
# tests set this to build decode_graph for llvm too (the kernels' serial twins), where no graph is captured but the
# function's arithmetic is the CUDA one
ON_CPU = False


def enabled(c, target) -> bool:
    """Whether a library for `target` carries `decode_graph` for the model of ArchConfig `c`."""
    from edgequant.tvm_schedules.decode_attention import supports
    kind = target.kind.name
    if os.environ.get("EDGEQUANT_DECODE_GRAPH", "1") == "0" or not (kind == "cuda" or (kind == "llvm" and ON_CPU)):
        return False
    return (not c.graph_rope and not c.own_attention and not c.rope_scaling and supports(c.head_dim)
            and c.num_heads % c.num_kv_heads == 0)


def cache_shape(c, max_len) -> tuple:
    return (c.num_layers, 2, c.num_kv_heads, max_len, c.head_dim)


class GraphKV:
    """Stands in for the paged cache in the blocks' `forward` (they call `attention_with_fused_qkv` only): each layer's
    attention kernel writes the cache in place, and the next layer takes that result, which orders the writes."""

    def __init__(self, c, cache: Tensor, pos: Tensor, gpu: bool, pdl: bool):
        self.c, self.cache, self.pos, self.gpu, self.pdl = c, cache, pos, gpu, pdl
        self._funcs = {}

    def attention_with_fused_qkv(self, layer_id: int, qkv: Tensor, num_qo_heads: int, sm_scale: float) -> Tensor:
        from tvm import relax as rx
        from tvm import tirx
        from tvm.relax.frontend.nn import Tensor, op
        from tvm.relax.frontend.nn.core import wrap_nested
        from edgequant.tvm_schedules.decode_attention import SPLITS, decode_attention_func, decode_combine_func
        c, ns, bb = self.c, SPLITS, rx.BlockBuilder.current()
        key = float(sm_scale)
        if key not in self._funcs:   # SPLITS blocks per head over the keys, then one per head merging them
            f = decode_attention_func(c.num_layers, num_qo_heads, c.num_kv_heads, c.head_dim, c.rope_theta,
                                      c.rope_scale, sm_scale, gpu=self.gpu, pdl=self.pdl, splits=ns)
            merge = decode_combine_func(num_qo_heads, ns, c.head_dim, gpu=self.gpu, pdl=self.pdl)
            self._funcs[key] = (bb.add_func(f.without_attr("global_symbol"), "decode_attention"),
                                merge.without_attr("global_symbol"))
        attend, merge = self._funcs[key]
        part = Tensor.placeholder((num_qo_heads, ns, c.head_dim + 2), "float32")
        out = Tensor.placeholder((1, 1, num_qo_heads, c.head_dim), "float16")
        # the layer as a scalar argument (one kernel for all layers): nn.op.tensor_ir_inplace_op takes no prim_value
        layer = rx.prim_value(tirx.IntImm("int32", layer_id))
        call = rx.call_tir_inplace(attend, [qkv._expr, self.cache._expr, self.pos._expr, layer],
                                   [1, -1], [self.cache._expr.ty, part._expr.ty])
        cache, p = wrap_nested(bb.emit(call), name="decode_attention")
        self.cache = cache
        return op.tensor_ir_op(merge, "decode_combine", [p, self.pos], out)


def decode_graph(model, token: Tensor, pos: Tensor, cache: Tensor, logits: Tensor) -> Tensor:
    """The body of `decode_graph` for a LlamaForCausalLM-shaped model: the next token id (the token input, updated)."""
    from tvm.relax.frontend.nn import op

    from edgequant.tvm_schedules.sample import argmax_func
    c = model.c
    gpu = model.target.kind.name == "cuda"
    x = op.reshape(model.embed(token), (1, 1, c.hidden_size))
    h = model._body(x, GraphKV(c, cache, pos, gpu, model.gpu_gemv == "gpu-pdl"))
    f = argmax_func(c.vocab_size, gpu=gpu, step=True).without_attr("global_symbol")
    _, tok, _ = op.tensor_ir_inplace_op(f, "argmax_step", [model._logits(h), logits, token, pos], [1, 2, 3],
                                        [logits, token, pos])
    return tok


def cache_fill(model, k: Tensor, v: Tensor, cache: Tensor, pos: Tensor) -> Tensor:
    from tvm.relax.frontend.nn import op

    from edgequant.tvm_schedules.decode_attention import cache_fill_func
    c = model.c
    f = cache_fill_func(c.num_layers, c.num_kv_heads, c.head_dim, gpu=model.target.kind.name == "cuda")
    return op.tensor_ir_inplace_op(f.without_attr("global_symbol"), "graph_cache_fill", [k, v, cache, pos], [2],
                                   cache)


def spec(c) -> dict:
    """The two functions' nn.spec entries."""
    from tvm.relax.frontend import nn
    shape = list(cache_shape(c, "max_len"))
    kv = [c.num_layers, "n", c.num_kv_heads, c.head_dim]
    return {
        FUNC: {"token": nn.spec.Tensor([1], "int32"), "pos": nn.spec.Tensor([1], "int32"),
               "cache": nn.spec.Tensor(shape, "float16"), "logits": nn.spec.Tensor([1, 1, c.vocab_size], "float32"),
               "$": {"param_mode": "packed", "effect_mode": "none"}},
        FILL: {"k": nn.spec.Tensor(kv, "float16"), "v": nn.spec.Tensor(kv, "float16"),
               "cache": nn.spec.Tensor(shape, "float16"), "pos": nn.spec.Tensor([1], "int32"),
               "$": {"param_mode": "none", "effect_mode": "none"}},
    }


def mark_static(mod):
    """`decode_graph` as the CUDA-graph rewrite needs it. Every argument fixed (see the module docstring). Each
    weight taken out of the parameter tuple right before its first use, not all at the top as nn's export emits
    them: after the first kernel they fall inside the captured region, so the replay's argument tuple holds the
    parameter tuple once instead of every weight (SmolLM2-135M: 272 fewer VM instructions building it, and as many
    `kill_object`s, ~0.1 ms of host time per step). And its result (the token input, updated in place by the step's
    last kernel) returned through a `vm.builtin.reshape` view, a call the rewrite leaves outside the graph: a result
    computed inside the captured region is not made an output of the capture function (TVM 0.27 emits the return
    of an undefined var, and VM codegen stops)."""
    from tvm import relax
    for gv, f in mod.functions_items():
        if gv.name_hint != FUNC or not isinstance(f, relax.Function):
            continue
        params = f.params[-1]
        blocks = [_late_unpack(b, params) for b in f.body.blocks]
        ty = f.body.body.ty
        out = relax.Var("next_token", ty)
        view = relax.call_pure_packed("vm.builtin.reshape", f.body.body, relax.ShapeExpr([1]), ty_args=[ty])
        seq = relax.SeqExpr([*blocks, relax.BindingBlock([relax.VarBinding(out, view)])], out)
        mod[gv] = relax.Function(f.params, seq, f.ret_ty, f.is_pure, f.attrs).with_attr("num_input", 0)
    return mod


def _late_unpack(block, params):
    """`block` with its `params[i]` bindings moved right before the first binding that uses them."""
    from tvm import relax
    unpack = {b.var: b for b in block.bindings
              if isinstance(b.value, relax.TupleGetItem) and b.value.tuple_value.same_as(params)}
    if not unpack:
        return block
    out = []
    for b in block.bindings:
        if b.var in unpack:
            continue
        for v in relax.analysis.free_vars(b.value):
            if v in unpack:
                out.append(unpack.pop(v))
        out.append(b)
    out += list(unpack.values())
    return type(block)(out)
