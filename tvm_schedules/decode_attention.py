"""Decode attention of one sequence on a contiguous KV cache, RoPE and the cache append in the same kernel: the
attention of the CUDA decode step that is captured whole as one CUDA graph (export/graph_decode.py).

TVM's paged KV cache runs three kernels per layer (RoPE split, transpose-append, paged decode attention) launched
by its C++ between the CUDA graphs relax captures, which left SmolLM2-135M's decode step bound by the host
(benchmarks/results/gpu-launch-smollm2-h200.md). Here the cache is one tensor [layers, 2, kv_heads, max_len,
head_dim] owned by the runner and the position is read from a device buffer, so no argument changes from one step
to the next and the whole step can be replayed.

`decode_attention_func`: `splits` thread blocks per query head, `THREADS` threads each, every block over its own
range of the keys 0..pos (below). Phase 0 rotates q and the new key (HF rotate-half with TVM's frequency formula,
`rope_np`) and, in the block whose range holds `pos`, writes the new key and value there (every such block of a kv
group writes the same bytes, so each reads its own write after the barrier); then the block's keys are walked in
tiles of `THREADS`: each thread scores one key (log2 units), thread 0 folds the tile into the running maximum and
denominator (online softmax, Milakov and Gimelshein, arXiv 1805.02867), and each thread accumulates the value
dimensions it owns. Phases are separate thread loops with the per-thread state in shared memory, so the CPU twin
(`gpu=False`) is the same text with serial loops: the test against `decode_attention_np` runs the very index math
of the GPU kernel. The split is flash-decoding's (Dao, Haziza, Massa and Sizov 2023; the graph uses SPLITS = 16):
(pos + 1) / splits keys per block rounded up to whole tiles (below 64 keys one block works and the others skip),
whose unnormalised partial results `decode_combine_func` merges, one more kernel per layer. One block per head had
left 32 of the H200's 132 SMs busy on LLaMA-7B (9 on SmolLM2), each walking all keys: whole-library decode of a
LLaMA-7B W4 g128 library 380 -> 554 tok/s after 512 tokens, 175 -> 441 after 2048, ~3% slower below 64 tokens
(benchmarks/results/gpu-e2e-split-attention-h200.md). `cache_fill_func` copies keys and values of a prefill (TVM's
cache `debug_get_kv` layout) into the contiguous cache from position `pos` on.
"""
from __future__ import annotations

import math

import numpy as np
from .tvmscript import parse_tir

THREADS = 64          # threads per block, also the keys per tile
_NEG = -3.0e38        # the running maximum before the first key
_LOG2E = 1.4426950408889634
SPLITS = 16           # blocks per query head in the one-graph decode step (flash-decoding; see decode_combine_func)
# keys per split block: (pos + 1) / splits rounded up to whole tiles, so short contexts use the first blocks only
SPLIT_CS = "(((pos[0] + {ns}) // {ns} + {nt} - 1) // {nt} * {nt})"


def supports(head_dim: int) -> bool:
    """Key rows are read 8 halves at a time."""
    return head_dim % 8 == 0 and head_dim >= 16


def _loops(gpu: bool) -> dict:
    return {"BLOCK": 'T.thread_binding({n}, thread="blockIdx.x")' if gpu else "T.serial({n})",
            "TLOOP": f'T.thread_binding({THREADS}, thread="threadIdx.x")' if gpu else f"T.serial({THREADS})",
            "SH": '"shared"' if gpu else '"global"', "LOC": '"local"' if gpu else '"global"'}


def _rope(x: str, head: str, d: str, theta: float, scale: float, dim: int) -> str:
    """TVMScript of RoPE on x[0, 0, head, d] at position pos[0] in float32: TVM's `rope_freq_default` frequency
    (position * scale / theta^((2d mod dim) / dim)), HF's rotate-half pairing."""
    half = dim // 2
    freq = (f"(T.Cast(\"float32\", pos[0]) * T.float32({scale!r}) / T.pow(T.float32({theta!r}), "
            f"T.Cast(\"float32\", ({d} * 2) % {dim}) / T.float32({dim})))")
    # the partner x[d +- half] through one index and a sign, not a select of two loads (a branch on the GPU)
    other = (f"(T.Select({d} < {half}, T.float32(-1), T.float32(1)) * "
             f"T.Cast(\"float32\", {x}[0, 0, {head}, ({d} + {half}) % {dim}]))")
    return f"(T.cos({freq}) * T.Cast(\"float32\", {x}[0, 0, {head}, {d}]) + T.sin({freq}) * {other})"


def decode_attention_func(layers: int, h_q: int, h_kv: int, dim: int, theta: float, rope_scale: float,
                          sm_scale: float, gpu: bool = True, dtype: str = "float16", pdl: bool = False,
                          splits: int = SPLITS):
    """prim func (qkv [1, 1, h_q + 2 h_kv, dim], cache [layers, 2, h_kv, max_len, dim] (the new key and value
    written at pos[0]), pos [1] int32, layer: int32, part [h_q, splits, dim + 2] float32); keys 0..pos[0] are
    attended.
    `pdl` (sm_90+, export/pdl.py): the kernel waits for the qkv GEMV's end first thing and lets the o_proj GEMV
    launch at once (its blocks load their weights on the SMs this kernel's few blocks leave idle, then wait).

    `splits` blocks per query head, each over its own range of the keys 0..pos[0] (`SPLIT_CS` keys each), write
    their unnormalised partial results to part (the value sums, then the running maximum in log2 units and the
    denominator); `decode_combine_func` merges a head's partials into the output. Only the block whose range holds
    pos appends the new key and value, and no block reads past its own range, so none reads a row another block is
    writing."""

    nt, g, ns = THREADS, h_q // h_kv, splits
    dpt = -(-dim // nt)
    lp = _loops(gpu)
    tl, sh, loc = lp["TLOOP"], lp["SH"], lp["LOC"]
    scale2 = float(sm_scale) * _LOG2E
    sync = ['            T.tvm_storage_sync("shared")'] if gpu else []
    dd = f"c * {nt} + tx"
    # block b: head h, keys lo .. hi - 1 of its range lo .. end - 1; past hi a key reads row hi - 1 and scores _NEG
    cs = SPLIT_CS.format(ns=ns, nt=nt)
    h, lo, end = f"(b // {ns})", f"(b % {ns}) * {cs}", f"(b % {ns} + 1) * {cs}"
    hi = f"T.min({end}, pos[0] + 1)"
    # a block without keys (short contexts: all but the first few) skips its work (not its barriers, which TVM
    # keeps out of conditions) and writes nothing: the merge reads only the blocks that had keys
    busy = f"{lo} <= pos[0]"
    L = ["@T.prim_func",
         f'def main(qkv: T.Buffer((1, 1, {h_q + 2 * h_kv}, {dim}), "{dtype}"), var_cache: T.handle, '
         f'pos: T.Buffer((1,), "int32"), layer: T.int32, part: T.Buffer(({h_q}, {ns}, {dim + 2}), "float32")):',
         '    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})',
         "    max_len = T.int32()",
         f'    cache = T.match_buffer(var_cache, ({layers}, 2, {h_kv}, max_len, {dim}), "{dtype}")',
         f"    for b in {lp['BLOCK'].format(n=h_q * ns)}:",
         *([f'        T.evaluate(T.call_extern("void", "{w}"))' for w in
            ("cudaGridDependencySynchronize", "cudaTriggerProgrammaticLaunchCompletion")] if pdl and gpu else []),
         f'        q_s = T.alloc_buffer(({dim},), "float32", scope={sh})',
         f'        s_s = T.alloc_buffer(({nt},), "float32", scope={sh})',
         f'        acc_s = T.alloc_buffer(({dpt}, {nt}), "float32", scope={sh})',
         # per thread: running maximum, denominator, this tile's rescale of what was summed before
         f'        st_s = T.alloc_buffer((3, {nt}), "float32", scope={sh})',
         # phase 0: rotated q into shared memory; the rotated new key and the new value into the cache at pos (by
         # the block whose keys hold pos)
         f"        for tx in {tl}:",
         f"            for c in T.serial({dpt}):",
         f"                if {dd} < {dim} and {busy}:",
         f'                    q_s[{dd}] = T.Cast("float32", T.Cast("{dtype}", '
         f"{_rope('qkv', h, dd, theta, rope_scale, dim)}))",
         f"                    if pos[0] < {end}:",
         f"                        cache[layer, 0, {h} // {g}, pos[0], {dd}] = T.Cast(\"{dtype}\", "
         f"{_rope('qkv', f'{h_q} + {h} // {g}', dd, theta, rope_scale, dim)})",
         f"                        cache[layer, 1, {h} // {g}, pos[0], {dd}] = "
         f"qkv[0, 0, {h_q + h_kv} + {h} // {g}, {dd}]",
         "                acc_s[c, tx] = T.float32(0)",
         f"            st_s[0, tx] = T.float32({_NEG})",
         "            st_s[1, tx] = T.float32(0)",
         *[s_[4:] for s_ in sync],
         f"        for tile in T.serial(T.max({hi} - {lo} + {nt - 1}, 0) // {nt}):",
         # phase A: one key per thread, its score in log2 units (keys past hi read key hi - 1 and score _NEG: no
         # branch around the loads; four partial sums shorten the chain of dependent adds)
         f"            for tx in {tl}:",
         f'                dot = T.alloc_buffer((4,), "float32", scope={loc})',
         f'                kr = T.alloc_buffer((8,), "{dtype}", scope={loc})',
         "                for j in T.unroll(4):",
         "                    dot[j] = T.float32(0)",
         f"                for i0 in T.{'unroll' if gpu else 'serial'}({dim // 8}):",
         "                    for i1 in T.vectorized(8):",
         f"                        kr[i1] = cache[layer, 0, {h} // {g}, T.min({lo} + tile * {nt} + tx, {hi} - 1), "
         f"i0 * 8 + i1]",
         "                    for i1 in T.unroll(8):",
         '                        dot[i1 % 4] = dot[i1 % 4] + q_s[i0 * 8 + i1] * T.Cast("float32", kr[i1])',
         f"                s_s[tx] = T.Select({lo} + tile * {nt} + tx < {hi}, "
         f"((dot[0] + dot[1]) + (dot[2] + dot[3])) * T.float32({scale2!r}), T.float32({_NEG}))",
         *sync,
         # phase B: every thread loads the value rows of the dimensions it owns (issued first, so their latency
         # overlaps the rest), folds the tile into its copy of the running state (the same numbers in every thread:
         # no reduction, no barrier) and accumulates. Keys past hi have the score _NEG, so their weight is
         # exp2(_NEG - max) = 0, and they read row hi - 1 (rows past pos were never written: uninitialised memory,
         # which a weight of 0 would not cancel if it held a NaN; rows of other blocks' ranges may be being written).
         # Every loop over the tile is unrolled (registers, independent loads issued back to back, no branch), and
         # its maximum, sum and products run as four partial chains.
         f"            for tx in {tl}:",
         f'                mx = T.alloc_buffer((4,), "float32", scope={loc})',
         f'                a = T.alloc_buffer((4,), "float32", scope={loc})',
         f'                w = T.alloc_buffer(({nt},), "float32", scope={loc})',
         f'                vr = T.alloc_buffer(({dpt}, {nt}), "{dtype}", scope={loc})',
         f"                for c in T.unroll({dpt}):",
         f"                    for t in T.unroll({nt}):",
         f"                        vr[c, t] = cache[layer, 1, {h} // {g}, T.min({lo} + tile * {nt} + t, {hi} - 1), "
         f"T.min({dd}, {dim - 1})]",
         "                for j in T.unroll(4):",
         "                    mx[j] = st_s[0, tx]",
         f"                for t in T.unroll({nt}):",
         "                    mx[t % 4] = T.max(mx[t % 4], s_s[t])",
         "                mx[0] = T.max(T.max(mx[0], mx[1]), T.max(mx[2], mx[3]))",
         "                for j in T.unroll(4):",
         "                    a[j] = T.float32(0)",
         f"                for t in T.unroll({nt}):",
         "                    w[t] = T.exp2(s_s[t] - mx[0])",
         "                    a[t % 4] = a[t % 4] + w[t]",
         "                st_s[2, tx] = T.exp2(st_s[0, tx] - mx[0])",
         "                st_s[1, tx] = st_s[1, tx] * st_s[2, tx] + ((a[0] + a[1]) + (a[2] + a[3]))",
         "                st_s[0, tx] = mx[0]",
         f"                for c in T.unroll({dpt}):",
         f"                    if {dd} < {dim}:",
         "                        for j in T.unroll(4):",
         "                            a[j] = T.float32(0)",
         f"                        for t in T.unroll({nt}):",
         '                            a[t % 4] = a[t % 4] + w[t] * T.Cast("float32", vr[c, t])',
         "                        acc_s[c, tx] = acc_s[c, tx] * st_s[2, tx] + ((a[0] + a[1]) + (a[2] + a[3]))",
         *sync,
         f"        for tx in {tl}:",
         f"            for c in T.serial({dpt}):",
         f"                if {dd} < {dim} and {busy}:",
         f"                    part[{h}, b % {ns}, {dd}] = acc_s[c, tx]",
         f"            if tx == 0 and {busy}:", f"                part[{h}, b % {ns}, {dim}] = st_s[0, 0]",
         f"                part[{h}, b % {ns}, {dim + 1}] = st_s[1, 0]"]
    return parse_tir("\n".join(L) + "\n")


def decode_combine_func(h_q: int, splits: int, dim: int, gpu: bool = True, dtype: str = "float16",
                        pdl: bool = False):
    """prim func (part [h_q, splits, dim + 2] float32 from `decode_attention_func(..., splits)`, pos [1] int32, out
    [1, 1, h_q, dim]): each head's partial results merged, out = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s
    with m the largest m_s, over the blocks that had keys (those below (pos + 1) / keys per block). One block per
    head, THREADS threads, each the dimensions it owns."""
    nt, dpt, lp = THREADS, -(-dim // THREADS), _loops(gpu)
    dd = f"c * {nt} + tx"
    cs = SPLIT_CS.format(ns=splits, nt=nt)
    active = f"(pos[0] + {cs}) // {cs}"   # the blocks that had keys
    L = ["@T.prim_func",
         f'def main(part: T.Buffer(({h_q}, {splits}, {dim + 2}), "float32"), pos: T.Buffer((1,), "int32"), '
         f'out: T.Buffer((1, 1, {h_q}, {dim}), "{dtype}")):',
         # op_pattern 8 (opaque): relax's FuseOps must not look into (or fuse into) a hand-scheduled kernel
         '    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
         f"    for h in {lp['BLOCK'].format(n=h_q)}:",
         *([f'        T.evaluate(T.call_extern("void", "{w}"))' for w in
            ("cudaGridDependencySynchronize", "cudaTriggerProgrammaticLaunchCompletion")] if pdl and gpu else []),
         f"        for tx in {lp['TLOOP']}:",
         f'            m = T.alloc_buffer((3,), "float32", scope={lp["LOC"]})',
         f"            m[0] = T.float32({_NEG})",
         f"            for s in T.serial({active}):",
         f"                m[0] = T.max(m[0], part[h, s, {dim}])",
         "            m[1] = T.float32(0)",
         f"            for s in T.serial({active}):",
         f"                m[1] = m[1] + T.exp2(part[h, s, {dim}] - m[0]) * part[h, s, {dim + 1}]",
         f"            for c in T.serial({dpt}):",
         f"                if {dd} < {dim}:",
         "                    m[2] = T.float32(0)",
         f"                    for s in T.serial({active}):",
         f"                        m[2] = m[2] + T.exp2(part[h, s, {dim}] - m[0]) * part[h, s, {dd}]",
         f'                    out[0, 0, h, {dd}] = T.Cast("{dtype}", m[2] / m[1])']
    return parse_tir("\n".join(L) + "\n")


def cache_fill_func(layers: int, h_kv: int, dim: int, gpu: bool = True, dtype: str = "float16"):
    """prim func (k [layers, n, h_kv, dim], v [same], cache [layers, 2, h_kv, max_len, dim] (written), pos [1]
    int32): cache[l, 0/1, h, pos + t] = k/v[l, t, h]."""
    per = layers * h_kv * dim
    blocks = f"T.ceildiv(n * {per}, 256)"
    blk = f'T.thread_binding({blocks}, thread="blockIdx.x")' if gpu else f"T.serial({blocks})"
    thr = 'T.thread_binding(256, thread="threadIdx.x")' if gpu else "T.serial(256)"
    L = ["@T.prim_func",
         "def main(var_k: T.handle, var_v: T.handle, var_cache: T.handle, pos: T.Buffer((1,), \"int32\")):",
         '    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})',
         "    n = T.int32()",
         "    max_len = T.int32()",
         f'    k = T.match_buffer(var_k, ({layers}, n, {h_kv}, {dim}), "{dtype}")',
         f'    v = T.match_buffer(var_v, ({layers}, n, {h_kv}, {dim}), "{dtype}")',
         f'    cache = T.match_buffer(var_cache, ({layers}, 2, {h_kv}, max_len, {dim}), "{dtype}")',
         f"    for b in {blk}:",
         f"        for tx in {thr}:",
         f"            if b * 256 + tx < n * {per}:",
         # i = ((l * n + t) * h_kv + hh) * dim + d, the source's order
         f"                cache[(b * 256 + tx) // (n * {h_kv * dim}), 0, (b * 256 + tx) // {dim} % {h_kv}, "
         f"pos[0] + (b * 256 + tx) // {h_kv * dim} % n, (b * 256 + tx) % {dim}] = "
         f"k[(b * 256 + tx) // (n * {h_kv * dim}), (b * 256 + tx) // {h_kv * dim} % n, "
         f"(b * 256 + tx) // {dim} % {h_kv}, (b * 256 + tx) % {dim}]",
         f"                cache[(b * 256 + tx) // (n * {h_kv * dim}), 1, (b * 256 + tx) // {dim} % {h_kv}, "
         f"pos[0] + (b * 256 + tx) // {h_kv * dim} % n, (b * 256 + tx) % {dim}] = "
         f"v[(b * 256 + tx) // (n * {h_kv * dim}), (b * 256 + tx) // {h_kv * dim} % n, "
         f"(b * 256 + tx) // {dim} % {h_kv}, (b * 256 + tx) % {dim}]"]
    return parse_tir("\n".join(L) + "\n")


# ----------------------------------------------------------------------------------------------- NumPy reference
def rope_np(x: np.ndarray, pos: int, theta: float, scale: float) -> np.ndarray:
    """RoPE of x [..., dim] at one position (float32 arithmetic, TVM's frequencies, HF's rotate-half)."""
    dim = x.shape[-1]
    d = np.arange(dim)
    freq = np.float32(pos * scale) / np.power(np.float32(theta), ((d * 2) % dim).astype(np.float32) / np.float32(dim),
                                               dtype=np.float32)
    x = x.astype(np.float32)
    rot = np.concatenate([-x[..., dim // 2:], x[..., :dim // 2]], axis=-1)
    return np.cos(freq) * x + np.sin(freq) * rot


def decode_attention_np(qkv: np.ndarray, cache: np.ndarray, pos: int, layer: int, h_q: int, h_kv: int,
                        theta: float, rope_scale: float, sm_scale: float):
    """(out [1, 1, h_q, dim] float16, the cache after the append): what `decode_attention_func` computes."""
    cache = cache.copy()
    x = qkv[0, 0]
    q = rope_np(x[:h_q], pos, theta, rope_scale).astype(np.float16).astype(np.float64)
    cache[layer, 0, :, pos] = rope_np(x[h_q:h_q + h_kv], pos, theta, rope_scale).astype(np.float16)
    cache[layer, 1, :, pos] = x[h_q + h_kv:]
    g = h_q // h_kv
    out = np.zeros((1, 1, h_q, x.shape[-1]), np.float16)
    for h in range(h_q):
        k = cache[layer, 0, h // g, :pos + 1].astype(np.float64)
        v = cache[layer, 1, h // g, :pos + 1].astype(np.float64)
        s = k @ q[h] * sm_scale
        p = np.exp(s - s.max())
        out[0, 0, h] = (p @ v / p.sum()).astype(np.float16)
    return out, cache


def default_sm_scale(dim: int) -> float:
    return 1.0 / math.sqrt(dim)
