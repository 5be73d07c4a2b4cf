"""CPU attention kernels for TVM's paged KV cache (`TIRPagedKVCache` on llvm targets) with what Gemma needs and the
stock kernels lack or get wrong: attention logit soft-capping (Gemma 2, arXiv 2408.00118: cap * tanh(score / cap)
before the softmax) and sliding-window layers that stay exact past the window (Longformer's local attention,
arXiv 2004.05150, as Gemma 2/3 use it: a query sees the `window` latest keys, itself included).

The cache's runtime calls three kernels per layer, with the ABI of TVM 0.27's own CPU kernels
(`tvm.relax.frontend.nn.llm._prefill_kernels` / `_decode_kernels`), so these drop in where those are built
(`cpu_kernels_for`, used by export/models/llama.py through `workarounds.own_attention`; paged_attention_gpu.py
holds their GPU twins, which share the index rules below):
- ragged prefill: a prefill chunk's queries against the chunk's own keys (causal). It cannot tell layers apart,
  so it has no window: the export keeps every prefill chunk within the window (export/build.py `prefill_chunk`),
  where a query's in-chunk keys are all inside its window;
- paged prefill: the chunk's queries against the keys cached before the chunk. For sliding-window layers the runtime
  hands over only the pages of the last `window` past keys (length_info [3, b]: last page length, window offset,
  sink length) and sets `causal`; query row r of the chunk then sees the last window - r - 1 of them;
- decode: one query against the cached keys, the new one included (the runtime appends before a decode step).
A window on every layer (Mistral, Phi-3) comes instead as `every_window` for caches of plain "mha" layers: the
kernels then take each query's window from its position over all the pages (`cpu_kernels_for` says why).

Each query and head runs one online softmax (Milakov and Gimelshein, arXiv 1805.02867) over exactly its visible key
range, computed from the positions rather than masked key by key: the stock paged prefill kernel left its running
maximum unset when a query's first keys were masked (NaN or wrong logits for sliding layers past the window, in
a pattern depending on memory contents). Scores are kept in log2 units and `lse` is written as the stock kernels
write it (max + log2(sum)), which the runtime's merge kernel reads. RoPE is never applied here: the cache runs in
RopeMode NORMAL (k rotated before it is stored) or NONE (the graph rotates q and k), and the kernels assert it.
`attention_np` is the NumPy reference of all three.
"""
from __future__ import annotations

import math

import numpy as np

LOG2E = math.log2(math.e)
_NEG = -5e4   # the running maximum's start (log2 units): below any real score, and exp2 of it underflows to 0


def _score(dot, sm_scale, softcap: float | None):
    """A dot product of q and k as a log2-unit score: scaled, soft-capped where the model caps."""
    from tvm import tirx
    s = dot * sm_scale
    if softcap:
        s = tirx.tanh(s / tirx.const(softcap, "float32")) * tirx.const(softcap, "float32")
    return s * tirx.const(LOG2E, "float32")


def _macros(T, d_qk: int, d_v: int, group: int, softcap: float | None, page_size: int = 0, sliding: bool = False):
    """The kernels' shared steps as TVMScript macros (a prim func's signature must stay literal, its body need not):
    the running state's start, one key folded into it, the result written, and one cached key of the two paged
    kernels (prefill and decode read the cache the same way)."""

    @T.macro
    def start(m, den, acc):
        m[0] = T.float32(_NEG)
        den[0] = T.float32(0)
        for i in T.serial(d_v):
            acc[i] = T.float32(0)

    @T.macro
    def fold(m, den, s, p, sm_scale):
        # s: the key's dot product, made a score; p: the rescale of what is summed so far
        s[0] = _score(s[0], sm_scale, softcap)
        p[0] = T.exp2(m[0] - T.max(m[0], s[0]))
        m[0] = T.max(m[0], s[0])
        den[0] = den[0] * p[0] + T.exp2(s[0] - m[0])

    @T.macro
    def finish(output, lse, row, h, m, den, acc):
        for i in T.serial(d_v):
            output[row, h, i] = T.if_then_else(den[0] > 0, acc[i] / den[0], T.float32(0)).astype(output.dtype)
        lse[row, h] = T.if_then_else(den[0] > 0, m[0] + T.log2(den[0]), T.float32(_NEG))

    @T.macro
    def paged_key(q, row, h, pages, page_values, length_info, begin, b, j, sm_scale, m, den, s, p, acc):
        slot: T.let[T.int32] = _slot(length_info, b, j, sliding)
        page: T.let[T.int32] = page_values[begin + slot // page_size]
        s[0] = T.float32(0)
        for i in T.serial(d_qk):
            s[0] += q[row, h, i].astype("float32") * pages[page, 0, h // group, slot % page_size, i].astype("float32")
        fold(m, den, s, p, sm_scale)
        for i in T.serial(d_v):
            acc[i] = acc[i] * p[0] + T.exp2(s[0] - m[0]) * \
                pages[page, 1, h // group, slot % page_size, i].astype("float32")

    return start, fold, finish, paged_key


def ragged_prefill(h_kv: int, h_q: int, d_qk: int, d_v: int, dtype: str, softcap: float | None = None,
                   every_window: int = 0):
    """Replacement of `_attention_prefill_ragged_cpu` (same arguments); `every_window`: see `cpu_kernels_for`."""
    from tvm.script import tirx as T
    group = h_q // h_kv
    start, fold, finish, _ = _macros(T, d_qk, d_v, group, softcap)

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
                                var_kv_indptr: T.handle, var_q_rope_position: T.handle,
                                var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
                                causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32,
                                rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"global_symbol": "edgequant_prefill_ragged_kv_cpu"})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_off = T.int32()
        kv_indptr_off = T.int32()
        q_rope_off = T.int32()
        k_rope_off = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d_qk), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_off)
        k = T.match_buffer(var_k, (kv_len, h_kv, d_qk), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d_v), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_off)
        _q_rope = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_off)
        _k_rope = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_off)
        output = T.match_buffer(var_output, (qo_len, h_q, d_v), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")
        assert rotary_mode == 0, "edgequant's CPU attention kernels take rotated q and k (no inline RoPE)"
        with T.sblock("attn"):
            m = T.sblock_alloc_buffer((1,), "float32")
            den = T.sblock_alloc_buffer((1,), "float32")
            s = T.sblock_alloc_buffer((1,), "float32")
            p = T.sblock_alloc_buffer((1,), "float32")
            acc = T.sblock_alloc_buffer((d_v,), "float32")
            for b in T.serial(batch_size):
                for qi in T.serial(q_indptr[b + 1] - q_indptr[b]):
                    for h in T.serial(h_q):
                        n_q: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                        n_k: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                        lo: T.let[T.int32] = _ragged_range(causal, n_k, n_q, qi, every_window)[0]
                        hi: T.let[T.int32] = _ragged_range(causal, n_k, n_q, qi, every_window)[1]
                        row: T.let[T.int32] = q_indptr[b] + qi
                        start(m, den, acc)
                        for jj in T.serial(T.max(hi - lo, 0)):
                            j: T.let[T.int32] = lo + jj
                            s[0] = T.float32(0)
                            for i in T.serial(d_qk):
                                s[0] += q[row, h, i].astype("float32") * \
                                    k[kv_indptr[b] + j, h // group, i].astype("float32")
                            fold(m, den, s, p, sm_scale)
                            for i in T.serial(d_v):
                                acc[i] = acc[i] * p[0] + T.exp2(s[0] - m[0]) * \
                                    v[kv_indptr[b] + j, h // group, i].astype("float32")
                        finish(output, lse, row, h, m, den, acc)

    return batch_prefill_ragged_kv


def _ragged_range(causal, n_k, n_q, qi, every_window: int):
    """(first, one past the last) of the chunk's keys that query row qi of the chunk sees in the ragged kernel:
    causally (the chunk's last query sees the last key), within `every_window` of its position."""
    from tvm import tirx
    hi = tirx.max(tirx.min(tirx.if_then_else(causal > 0, n_k - n_q + qi + 1, n_k), n_k), 0)
    return _window_start(hi - 1, every_window), hi


def _length_info(T, var, batch, sliding: bool, off):
    return T.match_buffer(var, (3, batch) if sliding else (batch,), "int32", elem_offset=off)


def _kv_len(length_info, b, npages, page_size: int, sliding: bool):
    """Keys of sequence b in its pages: (pages - 1) * page + last page length (- window offset + sink)."""
    from tvm import tirx
    if not sliding:
        n = (npages - 1) * page_size + length_info[b]
    else:
        n = (npages - 1) * page_size + length_info[0, b] - length_info[1, b] + length_info[2, b]
    return tirx.if_then_else(npages > 0, n, 0)


def _slot(length_info, b, j, sliding: bool):
    """Slot in the sequence's pages of its j-th visible key (past the sink, the window starts at an offset)."""
    from tvm import tirx
    if not sliding:
        return j
    return tirx.if_then_else(j < length_info[2, b], j, j - length_info[2, b] + length_info[1, b])


def paged_prefill(h_kv: int, h_q: int, d: int, dtype: str, sliding_window: bool, rope_scaling=None,
                  page_size: int = 16, sliding_window_size: int = 1024, softcap: float | None = None,
                  every_window: int = 0):
    """Replacement of `_attention_prefill_cpu` (same arguments); `every_window`: see `cpu_kernels_for`."""
    from tvm.script import tirx as T
    group = h_q // h_kv
    window = sliding_window_size if sliding_window else 0
    symbol = "edgequant_prefill_paged_kv_cpu" + ("_sliding_window" if sliding_window else "")
    start, _, finish, paged_key = _macros(T, d, d, group, softcap, page_size, sliding_window)

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu(var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle,
                                   var_page_indptr: T.handle, var_page_values: T.handle, var_length_info: T.handle,
                                   var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
                                   var_output: T.handle, var_lse: T.handle, causal: T.int32, rotary_mode: T.int32,
                                   rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"global_symbol": symbol})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_off = T.int32()
        page_indptr_off = T.int32()
        page_values_off = T.int32()
        k_rope_off = T.int32()
        q_rope_off = T.int32()
        length_info_off = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_off)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_off)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_off)
        _k_rope = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_off)
        _q_rope = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_off)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        length_info = _length_info(T, var_length_info, batch_size, sliding_window, length_info_off)
        assert rotary_mode == 0, "edgequant's CPU attention kernels take rotated q and k (no inline RoPE)"
        with T.sblock("attn"):
            m = T.sblock_alloc_buffer((1,), "float32")
            den = T.sblock_alloc_buffer((1,), "float32")
            s = T.sblock_alloc_buffer((1,), "float32")
            p = T.sblock_alloc_buffer((1,), "float32")
            acc = T.sblock_alloc_buffer((d,), "float32")
            for b in T.serial(batch_size):
                for qi in T.serial(q_indptr[b + 1] - q_indptr[b]):
                    for h in T.serial(h_q):
                        begin: T.let[T.int32] = page_indptr[b]
                        n_k: T.let[T.int32] = _kv_len(length_info, b, page_indptr[b + 1] - begin, page_size,
                                                      sliding_window)
                        n_q: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                        lo: T.let[T.int32] = _first_visible(causal, n_k, n_q, qi, window, every_window)
                        hi: T.let[T.int32] = _end_visible(causal, n_k, n_q, qi, window)
                        row: T.let[T.int32] = q_indptr[b] + qi
                        start(m, den, acc)
                        for jj in T.serial(T.max(hi - lo, 0)):
                            paged_key(q, row, h, pages, page_values, length_info, begin, b, lo + jj, sm_scale,
                                      m, den, s, p, acc)
                        finish(output, lse, row, h, m, den, acc)

    return batch_prefill_paged_kv_cpu


def _first_visible(causal, n_k, n_q, qi, window: int, every_window: int):
    """First cached key query row qi sees: the last window - qi - 1 keys for a sliding layer (the runtime sets causal
    there: the chunk's own keys fill the rest of the window); with `every_window`, the keys within it of the query's
    position (n_k - n_q + qi when the chunk is in the cache, n_k + qi after it); else all."""
    from tvm import tirx
    if window:
        return tirx.if_then_else(causal > 0, tirx.max(n_k - tirx.max(window - qi - 1, 0), 0), 0)
    return _window_start(tirx.if_then_else(causal > 0, n_k - n_q + qi, n_k + qi), every_window)


def _window_start(qpos, every_window: int):
    """First key position a query at `qpos` sees in a window of `every_window` keys, itself included (0: all)."""
    from tvm import tirx
    if not every_window:
        return tirx.const(0, "int32")
    return tirx.max(qpos - (every_window - 1), 0)


def _end_visible(causal, n_k, n_q, qi, window: int):
    """One past the last cached key query row qi sees: all of them, or causally when the chunk is in the cache."""
    from tvm import tirx
    if window:
        return n_k
    return tirx.max(tirx.if_then_else(causal > 0, tirx.min(n_k - n_q + qi + 1, n_k), n_k), 0)


def paged_decode(h_kv: int, h_q: int, d: int, dtype: str, sliding_window: bool, rope_scaling=None,
                 page_size: int = 16, softcap: float | None = None, every_window: int = 0):
    """Replacement of `_attention_decode_cpu` (same arguments): every key the runtime hands over is visible, or with
    `every_window` (see `cpu_kernels_for`) the last that many."""
    from tvm.script import tirx as T
    group = h_q // h_kv
    symbol = "edgequant_decode_paged_kv_cpu" + ("_sliding_window" if sliding_window else "")
    start, _, finish, paged_key = _macros(T, d, d, group, softcap, page_size, sliding_window)

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
                              page_table_values_handle: T.handle, var_length_info: T.handle,
                              k_rope_pos_offset_handle: T.handle, q_rope_position_handle: T.handle,
                              output_handle: T.handle, lse_handle: T.handle, rotary_mode: T.int32,
                              rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"global_symbol": symbol})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_off = T.int32()
        page_values_off = T.int32()
        k_rope_off = T.int32()
        q_rope_off = T.int32()
        length_info_off = T.int32()
        Q = T.match_buffer(Q_handle, (B, h_q, d), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_off)
        page_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_off)
        _k_rope = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_off)
        _q_rope = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_off)
        output = T.match_buffer(output_handle, (B, h_q, d), dtype)
        lse = T.match_buffer(lse_handle, (B, h_q), "float32")
        length_info = _length_info(T, var_length_info, B, sliding_window, length_info_off)
        assert rotary_mode == 0, "edgequant's CPU attention kernels take rotated q and k (no inline RoPE)"
        with T.sblock("attn"):
            m = T.sblock_alloc_buffer((1,), "float32")
            den = T.sblock_alloc_buffer((1,), "float32")
            s = T.sblock_alloc_buffer((1,), "float32")
            p = T.sblock_alloc_buffer((1,), "float32")
            acc = T.sblock_alloc_buffer((d,), "float32")
            for b in T.serial(B):
                for h in T.serial(h_q):
                    begin: T.let[T.int32] = page_indptr[b]
                    n_k: T.let[T.int32] = _kv_len(length_info, b, page_indptr[b + 1] - begin, page_size,
                                                  sliding_window)
                    start(m, den, acc)
                    lo: T.let[T.int32] = _window_start(n_k - 1, every_window)
                    for jj in T.serial(T.max(n_k - lo, 0)):
                        paged_key(Q, b, h, pages, page_values, length_info, begin, b, lo + jj, sm_scale,
                                  m, den, s, p, acc)
                    finish(output, lse, b, h, m, den, acc)

    return batch_decode_paged_kv


def cpu_kernels_for(softcap: float | None, every_window: int = 0) -> dict:
    """{name in tvm.relax.frontend.nn.llm.kv_cache: kernel builder} with the stock builders' signatures.
    `every_window`: a sliding window on every layer (Mistral, Phi-3), applied by the kernels themselves from the
    positions, for a cache whose layers are all "mha": TVM 0.27's runtime does not allocate its q/k/v staging buffers
    when no layer is "mha" (`temp_attn_q_device_`, only for a kMHA layer), so an all-"mha_sliding" cache fails its
    first prefill (workarounds.py, bug 5)."""
    import functools
    return {"_attention_prefill_ragged_cpu": lambda h_kv, h_q, d_qk, d_v, dtype, rope_scaling:
            ragged_prefill(h_kv, h_q, d_qk, d_v, dtype, softcap, every_window),
            "_attention_prefill_cpu": functools.partial(paged_prefill, softcap=softcap, every_window=every_window),
            "_attention_decode_cpu": functools.partial(paged_decode, softcap=softcap, every_window=every_window)}


def attention_np(q, k, v, q_pos, k_pos, sm_scale: float, window: int | None = None, softcap: float | None = None):
    """Reference: q [Lq, Hq, D] at positions q_pos, k/v [Lk, Hkv, D] at k_pos (GQA groups); a query sees keys at
    positions p <= its own and, with a window, p > its own - window. Returns (out [Lq, Hq, D], lse [Lq, Hq] in
    log2 units as the kernels write it)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) * sm_scale
    if softcap:
        s = np.tanh(s / softcap) * softcap
    qp, kp = np.asarray(q_pos)[:, None], np.asarray(k_pos)[None, :]
    visible = kp <= qp
    if window:
        visible &= kp > qp - window
    s = np.where(visible[None], s, -np.inf)
    mx = s.max(-1, keepdims=True)
    e = np.exp(s - mx)
    out = np.einsum("hqk,khd->qhd", e / e.sum(-1, keepdims=True), v)
    lse = (mx[..., 0] + np.log(e.sum(-1))) * LOG2E
    return out, lse.T
