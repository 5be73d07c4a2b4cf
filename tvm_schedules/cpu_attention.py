"""Attention kernels of the paged KV cache for CPUs (llvm): the self-attention of a prefill chunk ("ragged"), a later
chunk's queries over the keys already cached ("paged" prefill) and the decode attention over the cache pages,
multi-threaded and vectorised along the head dimension, in place of TVM 0.27's CPU kernels (`tvm.relax.frontend.nn.llm`
`_attention_prefill_ragged_cpu`, `_attention_prefill_cpu`, `_attention_decode_cpu`).

Why: TVM's CPU kernels run every (query, key) pair as a serial scalar loop over the head dimension on one thread, with
an inline-RoPE select in the innermost loop. On SmolLM2-135M (30 layers, 9 query / 3 KV heads of 64) a 128-token
prefill spent 39% of its time there (307 of 790 ms, 2 threads) and a decode step after 128 tokens 20%: more than
all four int8 GEMMs of the MLP. The stock paged prefill also walks the whole page pool for every query row: past
one 256-token chunk SmolLM2's prefill fell from ~1,600 to 384 tok/s (512 tokens); with `paged_prefill_func`, 1,369.

Each kernel keeps the stock kernel's signature, arguments and results (output and its log2-sum-exp `lse`, which the
cache runtime merges across chunks), so `replace_in` swaps them by name in the exported module. Per (query row,
head): scores q.k of every visible key (fp32, q pre-scaled by sm_scale * log2 e, 16-lane partial sums reduced as a
tree), their max, exp2 and sum, then the weighted sum of V rows (D lanes), written once. As in the stock kernels the
softmax starts from a phantom score of -5e4 with weight 1 (an empty row gives 0 and lse -5e4).
Work split: the prefill pairs row r with row n-1-r of one head so that every parallel item has the same causal
work; decode runs one item per (sequence, query head). Only the cache's RoPE modes that rotate before the kernel
(`rotary_mode` 0: RopeMode.NORMAL / NONE, which every edgequant family uses) are covered; the kernel asserts it.
"""
from __future__ import annotations

import math
from .tvmscript import parse_tir

LOG2E = math.log2(math.exp(1))
NEG = -5e4      # the stock kernels' "minus infinity" (fp16-safe)
LANES = 16      # fp32 lanes of one AVX-512 register: partial sums of q.k before the tree reduction

# the stock kernels' names in a module exported for llvm (their global symbols; kv_cache.py's TIRPagedKVCache)
RAGGED, DECODE = "batch_prefill_ragged_kv", "batch_decode_paged_kv_cpu"
PAGED = "batch_prefill_paged_kv_cpu"   # a later prefill chunk's queries over the keys already in the cache
ROPE, ROPE_BLOCK = "fused_rope", "llama_fused_rope"   # the cache's q/k/v split + RoPE (position_embedding.py)


def supports(head_dim: int, dtype: str) -> bool:
    return head_dim % LANES == 0 and dtype == "float16"


def attention_np(q, k, v, causal: bool, sm_scale: float):
    """NumPy model of one sequence: q [n, Hq, D], k/v [m, Hkv, D] (m >= n; the last n keys are the queries' own)
    -> (out [n, Hq, D] fp32, lse [n, Hq] in log2 units), with the kernels' phantom -5e4 score."""
    import numpy as np
    n, hq, _ = q.shape
    m, hkv, _ = k.shape
    g = hq // hkv
    kk = np.repeat(k.astype(np.float32), g, axis=1)
    vv = np.repeat(v.astype(np.float32), g, axis=1)
    s = np.einsum("nhd,mhd->hnm", q.astype(np.float32), kk) * np.float32(sm_scale * LOG2E)
    if causal:
        vis = np.arange(m)[None, :] < (m - n + np.arange(n) + 1)[:, None]
        s = np.where(vis[None], s, -np.inf)
    mx = np.maximum(s.max(axis=2, initial=NEG), NEG)
    p = np.exp2(s - mx[..., None])
    den = p.sum(axis=2) + np.exp2(NEG - mx)
    out = np.einsum("hnm,mhd->nhd", p / den[..., None], vv)
    return out, (mx + np.log2(den)).T


def _row_attention(D: int, q_at: str, k_at, v_at, n: str, out_at: str, lse_at: str, ind: str) -> list[str]:
    """TVMScript statements: attention of one query row over `n` keys; k_at(j)/v_at(j) index key j's row."""
    c = D // LANES
    qv = "qv[T.ramp(0, 1, %d)]" % D
    S = [f'{ind}{qv} = T.Cast("float32x{D}", {q_at}) * T.broadcast(sm_scale * T.float32({LOG2E}), {D})',
         f"{ind}mx[0] = T.float32({NEG})",
         f"{ind}for j in T.serial({n}):"]
    parts = " + ".join(f'qv[T.ramp({i * LANES}, 1, {LANES})] * T.Cast("float32x{LANES}", '
                       f'{k_at("j", f"T.ramp({i * LANES}, 1, {LANES})")})' for i in range(c))
    S += [f"{ind}    acc[T.ramp(0, 1, {LANES})] = {parts}"]
    w = LANES // 2
    while w > 1:
        S.append(f"{ind}    acc[T.ramp(0, 1, {w})] = acc[T.ramp(0, 1, {w})] + acc[T.ramp({w}, 1, {w})]")
        w //= 2
    S += [f"{ind}    sc[j] = acc[0] + acc[1]",
          f"{ind}    mx[0] = T.max(mx[0], sc[j])",
          f"{ind}den[0] = T.exp2(T.float32({NEG}) - mx[0])",
          f"{ind}for j in T.serial({n}):",
          f"{ind}    sc[j] = T.exp2(sc[j] - mx[0])",
          f"{ind}    den[0] = den[0] + sc[j]",
          f"{ind}{qv} = T.broadcast(T.float32(0), {D})",     # qv is free again: the output accumulator
          f"{ind}for j in T.serial({n}):",
          f'{ind}    {qv} = {qv} + T.broadcast(sc[j], {D}) * T.Cast("float32x{D}", {v_at("j", f"T.ramp(0, 1, {D})")})',
          f'{ind}{out_at} = T.Cast("float16x{D}", {qv} * T.broadcast(T.float32(1) / den[0], {D}))',
          f"{ind}{lse_at} = mx[0] + T.log2(den[0])"]
    return S


def _scratch(D: int, scores: str, ind: str) -> list[str]:
    return [f'{ind}qv = T.alloc_buffer(({D},), "float32")', f'{ind}acc = T.alloc_buffer(({LANES},), "float32")',
            f'{ind}sc = T.alloc_buffer(({scores},), "float32")', f'{ind}mx = T.alloc_buffer((1,), "float32")',
            f'{ind}den = T.alloc_buffer((1,), "float32")']


def ragged_prefill_func(h_kv: int, h_q: int, d: int, dtype: str = "float16"):
    """Causal (or full) self-attention of the chunk's own q, k, v: TVM's `batch_prefill_ragged_kv` signature."""
    g = h_q // h_kv
    S = ["@T.prim_func",
         "def batch_prefill_ragged_kv(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle, "
         "var_kv_indptr: T.handle, var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle, "
         "var_output: T.handle, var_lse: T.handle, causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, "
         "rope_theta: T.float32, sm_scale: T.float32):",
         '    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})',
         "    batch_size = T.int32()", "    qo_len = T.int32()", "    kv_len = T.int32()",
         "    qi_off = T.int32()", "    ki_off = T.int32()", "    qr_off = T.int32()", "    kr_off = T.int32()",
         f'    q = T.match_buffer(var_q, (qo_len, {h_q}, {d}), "{dtype}")',
         '    q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=qi_off)',
         f'    k = T.match_buffer(var_k, (kv_len, {h_kv}, {d}), "{dtype}")',
         f'    v = T.match_buffer(var_v, (kv_len, {h_kv}, {d}), "{dtype}")',
         '    kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=ki_off)',
         '    q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=qr_off)',
         '    k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=kr_off)',
         f'    output = T.match_buffer(var_output, (qo_len, {h_q}, {d}), "{dtype}")',
         f'    lse = T.match_buffer(var_lse, (qo_len, {h_q}), "float32")',
         '    assert rotary_mode == 0, "edgequant CPU attention: RoPE must be applied before the kernel"',
         # item = (pair of rows p and qo_len-1-p, head): equal causal work per item
         f"    for it in T.parallel((qo_len + 1) // 2 * {h_q}):",
         '        bs = T.alloc_buffer((1,), "int32")']
    S += _scratch(d, "kv_len", "        ")
    S += ["        for s in T.serial(2):",
          f"            row = T.Select(s == 0, it // {h_q}, qo_len - 1 - it // {h_q})",
          f"            h = it % {h_q}",
          f"            if s == 0 or row != it // {h_q}:",
          "                bs[0] = 0",
          "                for bb in T.serial(batch_size):",
          "                    if q_indptr[bb] <= row:",
          "                        bs[0] = bb",
          "                b = bs[0]",
          "                qlen = q_indptr[b + 1] - q_indptr[b]",
          "                klen = kv_indptr[b + 1] - kv_indptr[b]",
          "                n = T.max(T.Select(causal > 0, T.min(klen - qlen + row - q_indptr[b] + 1, klen), klen), 0)",
          "                kb = kv_indptr[b]"]
    S += _row_attention(d, f"q[row, h, T.ramp(0, 1, {d})]",
                        lambda j, r: f"k[kb + {j}, h // {g}, {r}]", lambda j, r: f"v[kb + {j}, h // {g}, {r}]",
                        "n", f"output[row, h, T.ramp(0, 1, {d})]", "lse[row, h]", " " * 16)
    return _parse(S)


def decode_func(h_kv: int, h_q: int, d: int, dtype: str = "float16", page_size: int = 16):
    """One query row per sequence over its cache pages (non-sliding): TVM's `batch_decode_paged_kv` signature."""
    g = h_q // h_kv
    S = ["@T.prim_func",
         "def batch_decode_paged_kv(Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle, "
         "page_table_values_handle: T.handle, var_length_info: T.handle, k_rope_pos_offset_handle: T.handle, "
         "q_rope_position_handle: T.handle, output_handle: T.handle, lse_handle: T.handle, rotary_mode: T.int32, "
         "rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):",
         '    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})',
         "    B = T.int32()", "    nnz_pages = T.int32()", "    max_num_pages = T.int32()",
         "    pi_off = T.int32()", "    pv_off = T.int32()", "    kr_off = T.int32()", "    qr_off = T.int32()",
         "    li_off = T.int32()",
         f'    Q = T.match_buffer(Q_handle, (B, {h_q}, {d}), "{dtype}")',
         f'    pages = T.match_buffer(pages_handle, (max_num_pages, 2, {h_kv}, {page_size}, {d}), "{dtype}")',
         '    page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=pi_off)',
         '    page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=pv_off)',
         '    k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=kr_off)',
         '    q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=qr_off)',
         f'    output = T.match_buffer(output_handle, (B, {h_q}, {d}), "{dtype}")',
         f'    lse = T.match_buffer(lse_handle, (B, {h_q}), "float32")',
         '    length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=li_off)',
         '    assert rotary_mode == 0, "edgequant CPU attention: RoPE must be applied before the kernel"',
         f"    for it in T.parallel(B * {h_q}):"]
    S += _scratch(d, f"max_num_pages * {page_size}", "        ")
    S += [f"        b = it // {h_q}",
          f"        h = it % {h_q}",
          "        p0 = page_table_indptr[b]",
          "        np_ = page_table_indptr[b + 1] - p0",
          f"        n = T.Select(np_ > 0, (np_ - 1) * {page_size} + length_info[b], 0)"]
    page = lambda j, kv, r: (f"pages[page_table_values[p0 + {j} // {page_size}], {kv}, h // {g}, "  # noqa: E731
                             f"{j} % {page_size}, {r}]")
    S += _row_attention(d, f"Q[b, h, T.ramp(0, 1, {d})]", lambda j, r: page(j, 0, r),
                        lambda j, r: page(j, 1, r), "n", f"output[b, h, T.ramp(0, 1, {d})]", "lse[b, h]", " " * 8)
    return _parse(S)


def paged_prefill_func(h_kv: int, h_q: int, d: int, dtype: str = "float16", page_size: int = 16):
    """The query rows of a prefill chunk over their sequence's cache pages (non-sliding; causal or not, aligned to
    the cache's end as the stock kernel's mask): TVM's `batch_prefill_paged_kv_cpu` signature. The stock kernel walks
    every slot of the whole page pool (max_num_pages x page_size) for each query row and head on one thread, skipping
    those past the sequence: a second 256-token chunk of SmolLM2 ran at ~4x the first's time."""
    g = h_q // h_kv
    S = ["@T.prim_func",
         "def batch_prefill_paged_kv_cpu(var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, "
         "var_page_indptr: T.handle, var_page_values: T.handle, var_length_info: T.handle, "
         "var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle, "
         "causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):",
         '    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})',
         "    B = T.int32()", "    total_len = T.int32()", "    nnz_pages = T.int32()", "    max_num_pages = T.int32()",
         "    qi_off = T.int32()", "    pi_off = T.int32()", "    pv_off = T.int32()", "    kr_off = T.int32()",
         "    qr_off = T.int32()", "    li_off = T.int32()",
         f'    q = T.match_buffer(var_q, (total_len, {h_q}, {d}), "{dtype}")',
         '    q_indptr = T.match_buffer(var_q_indptr, (B + 1,), "int32", elem_offset=qi_off)',
         f'    pages = T.match_buffer(var_pages, (max_num_pages, 2, {h_kv}, {page_size}, {d}), "{dtype}")',
         '    page_indptr = T.match_buffer(var_page_indptr, (B + 1,), "int32", elem_offset=pi_off)',
         '    page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=pv_off)',
         '    length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=li_off)',
         '    k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (B,), "int32", elem_offset=kr_off)',
         '    q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=qr_off)',
         f'    output = T.match_buffer(var_output, (total_len, {h_q}, {d}), "{dtype}")',
         f'    lse = T.match_buffer(var_lse, (total_len, {h_q}), "float32")',
         '    assert rotary_mode == 0, "edgequant CPU attention: RoPE must be applied before the kernel"',
         f"    for it in T.parallel(total_len * {h_q}):"]
    S += _scratch(d, f"max_num_pages * {page_size}", "        ")
    S += ['        seq = T.alloc_buffer((1,), "int32")',
          f"        t = it // {h_q}",
          f"        h = it % {h_q}",
          "        seq[0] = 0",
          "        for i in T.serial(B):",     # the sequence of query row t: rows q_indptr[b] .. q_indptr[b + 1]
          "            if q_indptr[i + 1] <= t:",
          "                seq[0] = i + 1",
          "        b = seq[0]",
          "        p0 = page_indptr[b]",
          "        np_ = page_indptr[b + 1] - p0",
          f"        kv = T.Select(np_ > 0, (np_ - 1) * {page_size} + length_info[b], 0)",
          "        qo = q_indptr[b + 1] - q_indptr[b]",
          "        n = T.Select(causal > 0, T.max(T.min(kv - qo + (t - q_indptr[b]) + 1, kv), 0), kv)"]
    page = lambda j, kv, r: (f"pages[page_values[p0 + {j} // {page_size}], {kv}, h // {g}, "  # noqa: E731
                             f"{j} % {page_size}, {r}]")
    S += _row_attention(d, f"q[t, h, T.ramp(0, 1, {d})]", lambda j, r: page(j, 0, r),
                        lambda j, r: page(j, 1, r), "n", f"output[t, h, T.ramp(0, 1, {d})]", "lse[t, h]", " " * 8)
    return _parse(S)


def _parse(lines: list[str]):
    return parse_tir("\n".join(lines) + "\n")


def replace_in(mod):
    """`mod` with TVM's CPU ragged-prefill, paged-prefill and decode attention kernels (found by name) replaced by
    these ones, their head counts and sizes read from the stock kernels' buffers (a kernel of a shape not covered
    stays), and its split + RoPE kernel parallel over tokens x heads."""
    out = mod
    for gv in list(mod.get_global_vars()):
        if gv.name_hint == ROPE:
            fn = hoisted_rope(mod[gv]) or parallel_rope(mod[gv])
            if fn is not None:
                out = mod.clone() if out is mod else out
                out[gv] = fn
        if gv.name_hint not in (RAGGED, DECODE, PAGED):
            continue
        shp = _shapes(mod[gv], gv.name_hint)
        if shp is None or shp[4] is None or not supports(shp[2], shp[3]) or shp[1] % shp[0]:
            continue
        h_kv, h_q, d, dtype, page = shp
        fn = ragged_prefill_func(h_kv, h_q, d, dtype) if gv.name_hint == RAGGED else \
            decode_func(h_kv, h_q, d, dtype, page) if gv.name_hint == DECODE else \
            paged_prefill_func(h_kv, h_q, d, dtype, page)
        if out is mod:
            out = mod.clone() if hasattr(mod, "clone") else mod
        out[gv] = fn.with_attr("global_symbol", gv.name_hint)
    return out


def _rope_params(func):
    """(theta, scale, head_dim, q heads, kv heads, dtype) of the cache's split + RoPE kernel when it is exactly TVM's
    `llama_rope_with_position_map` with default RoPE (no scaling type, rotary_dim = head_dim) for them: the kernel is
    rebuilt from the numbers read off it and compared structurally; None otherwise."""
    import re

    import tvm_ffi
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map
    try:
        bufs = list(func.params)
        qkv, q, k = bufs[0], bufs[2], bufs[3]
        d, hq, hkv, dtype = int(q.shape[2]), int(q.shape[1]), int(k.shape[1]), str(q.dtype)
        text = func.script()
        theta = re.search(r"T\.pow\(T\.float32\(([-+.e\d]+)\)", text)
        scale = re.search(r'T\.Cast\("float32", position_map\[s\]\) \* T\.float32\(([-+.e\d]+)\)', text)
        if theta is None:
            return None
        params = (float(theta.group(1)), float(scale.group(1)) if scale else 1.0, d, hq, hkv, dtype)
        stock = llama_rope_with_position_map(*params[:5], dtype, {})
        if int(qkv.shape[1]) != hq + 2 * hkv or not tvm_ffi.structural_equal(stock, func):
            return None
        return params
    except Exception:  # noqa: BLE001 - another TVM's or family's kernel: keep it as it is
        return None


def hoisted_rope(func):
    """The cache's split + RoPE kernel with each token's cos and sin computed once for all its heads and the pow once
    per call (TVM's kernel computes a pow, a cos and a sin per element: 15 times per (token, dimension) on SmolLM2,
    7% of a 128-token prefill and ~0.5 ms of CPU per decoded token) by the stock expression, the rotation of q and k
    heads vectorised over the head dimension, tokens in parallel: the same float32 operations per element, so the
    same fp16 results (tests compare them bit for bit). None where the kernel is not the stock default-RoPE one
    (`_rope_params`)."""
    params = _rope_params(func)
    if params is None:
        return None
    theta, scale, d, hq, hkv, dtype = params
    h = d // 2
    pos = 'T.Cast("float32", position_map[s])' + (f" * T.float32({scale!r})" if scale != 1.0 else "")
    V = f"T.ramp(0, 1, {d})"
    # the stock rotation: -x[d + D/2] for the first half, x[d - D/2] for the second
    rot = lambda src: (f'T.Shuffle([{src}[s, hh, T.ramp({h}, 1, {h})] * '  # noqa: E731
                       f'T.broadcast(T.{dtype}(-1.0), {h}), {src}[s, hh, T.ramp(0, 1, {h})]], {list(range(d))})')
    S = ["@T.prim_func",
         "def fused_rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle, "
         "var_v: T.handle, apply_rope: T.int64):",
         '    T.func_attr({"op_pattern": 8, "tir.noalias": True, "tirx.is_scheduled": True})',
         "    seq_len = T.int32()", "    pm_off = T.int32()",
         f'    qkv = T.match_buffer(var_qkv, (seq_len, {hq + 2 * hkv}, {d}), "{dtype}")',
         '    position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=pm_off)',
         f'    q = T.match_buffer(var_q, (seq_len, {hq}, {d}), "{dtype}")',
         f'    k = T.match_buffer(var_k, (seq_len, {hkv}, {d}), "{dtype}")',
         f'    v = T.match_buffer(var_v, (seq_len, {hkv}, {d}), "{dtype}")',
         f'    pw = T.alloc_buffer(({d},), "float32")',
         f"    for dd in T.serial({d}):",    # the pow of the stock expression depends on the dimension only
         f'        pw[dd] = T.pow(T.float32({theta!r}), T.Cast("float32", dd * 2 % {d}) / T.float32({float(d)!r}))',
         "    for s in T.parallel(seq_len):",
         f'        cs = T.alloc_buffer(({d},), "float32")',
         f'        sn = T.alloc_buffer(({d},), "float32")',
         "        if apply_rope > T.int64(0):",
         f"            for dd in T.serial({d}):",
         f"                freq: T.float32 = {pos} / pw[dd]",
         "                cs[dd] = T.cos(freq)",
         "                sn[dd] = T.sin(freq)",
         f"        for hh in T.serial({hkv}):",
         f"            v[s, hh, {V}] = qkv[s, hh + {hq + hkv}, {V}]"]
    for out, first, n in (("q", 0, hq), ("k", hq, hkv)):
        src = f"qkv[s, hh + {first}, {V}]"
        rsrc = rot("qkv").replace("[s, hh,", f"[s, hh + {first},")
        S += [f"        for hh in T.serial({n}):",
              "            if apply_rope > T.int64(0):",
              f'                {out}[s, hh, {V}] = T.Cast("{dtype}x{d}", cs[{V}] * T.Cast("float32x{d}", {src}) + '
              f'sn[{V}] * T.Cast("float32x{d}", {rsrc}))',
              "            else:",
              f"                {out}[s, hh, {V}] = {src}"]
    return _parse(S)


def parallel_rope(func):
    """The cache's split + RoPE kernel (TVM's serial loop nest over tokens x heads x head_dim, a cos, sin and pow per
    element) with its tokens x heads loop run by the thread pool; None where its loop nest is not the expected one."""
    from tvm import s_tir
    if func.attrs is not None and func.attrs.get("tirx.is_scheduled"):
        return None
    try:
        sch = s_tir.Schedule(func)
        loops = sch.get_loops(sch.get_sblock(ROPE_BLOCK))
        if len(loops) != 3:
            return None
        sch.parallel(sch.fuse(loops[0], loops[1]))
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    except Exception:  # noqa: BLE001 - another TVM's kernel: keep it as it is
        return None


def _shapes(func, name: str):
    """(h_kv, h_q, d, dtype, page_size or 0) from the stock kernel's buffers (None where it is not the expected
    kernel: symbolic head counts, sliding window, K and V of different sizes)."""
    try:
        bufs = list(func.params)   # TVM 0.27: a PrimFunc's tensor parameters are its buffers
        if name == RAGGED:
            q, k, v = bufs[0], bufs[2], bufs[3]
            if int(v.shape[2]) != int(k.shape[2]) or int(q.shape[2]) != int(k.shape[2]):
                return None
            return int(k.shape[1]), int(q.shape[1]), int(q.shape[2]), str(q.dtype), 0
        q, pages, info = (bufs[0], bufs[2], bufs[5]) if name == PAGED else (bufs[0], bufs[1], bufs[4])
        if len(info.shape) != 1:      # [3, B]: the sliding-window variant
            return None
        return int(pages.shape[2]), int(q.shape[1]), int(q.shape[2]), str(q.dtype), int(pages.shape[3])
    except (TypeError, ValueError, IndexError, AttributeError):
        return None
