"""GPU attention kernels for TVM's paged KV cache (`TIRPagedKVCache` on every non-llvm target: cuda, metal, opencl,
webgpu) with what Gemma, Mistral and Phi-3 need and TVM 0.27's stock GPU kernels lack: attention logit
soft-capping (Gemma 2, arXiv 2408.00118) and sliding windows that stay exact past the window (Longformer's local
attention, arXiv 2004.05150).

The twins of paged_attention_cpu.py, with the same three entry points, the same ABI as the stock GPU kernels
(`tvm.relax.frontend.nn.llm._prefill_kernels._attention_prefill` / `_attention_prefill_ragged` and
`_decode_kernels._attention_decode`), and the same visible-range rule: which keys a query sees (window, causal,
the runtime's sliding-layer view of its pages, `every_window` for a window on every layer) is computed by the
helpers of paged_attention_cpu.py, its one owner, as is the score (scale, soft-cap, log2 units) and `attention_np`,
the NumPy reference of both modules. Swapped in by `workarounds.own_attention` (tvm_schedules/workarounds.py).

One thread block per (query row, query head), `_THREADS` threads. The keys a query sees are walked in tiles of
`_THREADS`: each thread takes one key of the tile and computes its score (q is staged in shared memory), then every
thread folds the tile's scores into the running maximum and denominator (the same values in every thread, so no
reduction is needed) and accumulates the value rows of the dimensions it owns (d, d + _THREADS, ...): one online
softmax (Milakov and Gimelshein, arXiv 1805.02867) over exactly the visible range, as the CPU kernels run it.
Loop extents depend only on the block's row and head, so every barrier is reached by the whole block. This is
written for exactness on every GPU API TVM emits (no warp shuffles, no tensor cores, under 2 KiB of shared memory),
not for speed: on an H200 these kernels take 1.3x to 3.7x the time of TVM's stock ones
(benchmarks/results/gpu-attention-h200.md; one block per query and head, no split over the keys), so the stock
kernels stay in use for models with neither a sliding window nor the soft-cap (`ArchConfig.own_attention`).
"""
from __future__ import annotations

from .paged_attention_cpu import _NEG, _end_visible, _first_visible, _kv_len, _length_info, _ragged_range, _score, \
    _slot, _window_start

_THREADS = 64   # threads per block: also the keys per tile


def _macros(T, d_qk: int, d_v: int, group: int, softcap: float | None, page_size: int = 0, sliding: bool = False):
    """The kernels' shared steps as TVMScript macros (a prim func's signature must stay literal, its body need not):
    staging q and the running state, folding a tile's scores into it, writing the result, and the whole key walk of
    the two paged kernels (prefill and decode read the cache the same way)."""
    nt = _THREADS
    dpt = -(-d_v // nt)   # value dimensions per thread

    @T.macro
    def start(q, row, h, tx, q_s, st, acc):
        for c in T.serial(-(-d_qk // nt)):
            if c * nt + tx < d_qk:
                q_s[c * nt + tx] = q[row, h, c * nt + tx].astype("float32")
        st[0] = T.float32(_NEG)
        st[1] = T.float32(0)
        for c in T.serial(dpt):
            acc[c] = T.float32(0)
        T.tvm_storage_sync("shared")

    @T.macro
    def rescale(st, acc, s_s, n_t):
        # st[2]: the tile's new maximum; what was summed so far is rescaled to it, the tile's terms are added
        st[2] = st[0]
        for t in T.serial(n_t):
            st[2] = T.max(st[2], s_s[t])
        st[1] = st[1] * T.exp2(st[0] - st[2])
        for c in T.serial(dpt):
            acc[c] = acc[c] * T.exp2(st[0] - st[2])
        for t in T.serial(n_t):
            st[1] += T.exp2(s_s[t] - st[2])

    @T.macro
    def finish(output, lse, row, h, tx, st, acc):
        for c in T.serial(dpt):
            if c * nt + tx < d_v:
                output[row, h, c * nt + tx] = T.if_then_else(st[1] > 0, acc[c] / st[1],
                                                             T.float32(0)).astype(output.dtype)
        if tx == 0:
            lse[row, h] = T.if_then_else(st[1] > 0, st[0] + T.log2(st[1]), T.float32(_NEG))

    @T.macro
    def paged_walk(pages, page_values, length_info, begin, b, lo, hi, h, tx, sm_scale, q_s, s_s, page_s, slot_s,
                   st, acc):
        for tile in T.serial(T.ceildiv(T.max(hi - lo, 0), nt)):
            n_t: T.let[T.int32] = T.min(nt, hi - lo - tile * nt)
            if tx < n_t:
                slot: T.let[T.int32] = _slot(length_info, b, lo + tile * nt + tx, sliding)
                page_s[tx] = page_values[begin + slot // page_size]
                slot_s[tx] = slot % page_size
                st[3] = T.float32(0)
                for i in T.serial(d_qk):
                    st[3] += q_s[i] * pages[page_values[begin + slot // page_size], 0, h // group,
                                            slot % page_size, i].astype("float32")
                s_s[tx] = _score(st[3], sm_scale, softcap)
            T.tvm_storage_sync("shared")
            rescale(st, acc, s_s, n_t)
            for t in T.serial(n_t):
                for c in T.serial(dpt):
                    if c * nt + tx < d_v:
                        acc[c] += T.exp2(s_s[t] - st[2]) * \
                            pages[page_s[t], 1, h // group, slot_s[t], c * nt + tx].astype("float32")
            st[0] = st[2]
            T.tvm_storage_sync("shared")

    return start, rescale, finish, paged_walk


def ragged_prefill(h_kv: int, h_q: int, d_qk: int, d_v: int, dtype: str, softcap: float | None = None,
                   every_window: int = 0):
    """Replacement of `_attention_prefill_ragged` (same arguments but the target): a prefill chunk against itself."""
    from tvm.script import tirx as T
    group, nt = h_q // h_kv, _THREADS
    dpt = -(-d_v // nt)
    start, rescale, finish, _ = _macros(T, d_qk, d_v, group, softcap)

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
                                var_kv_indptr: T.handle, var_q_rope_position: T.handle,
                                var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
                                causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32,
                                rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"global_symbol": "edgequant_prefill_ragged_kv_gpu", "tirx.is_scheduled": True})
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
        assert rotary_mode == 0, "edgequant's GPU attention kernels take rotated q and k (no inline RoPE)"
        for row in T.thread_binding(qo_len, thread="blockIdx.x"):
            for h in T.thread_binding(h_q, thread="blockIdx.y"):
                for tx in T.thread_binding(nt, thread="threadIdx.x"):
                    with T.sblock("attn"):
                        T.reads()
                        T.writes()
                        seq = T.sblock_alloc_buffer((1,), "int32", scope="local")
                        st = T.sblock_alloc_buffer((4,), "float32", scope="local")   # max, denominator, new max, dot
                        acc = T.sblock_alloc_buffer((dpt,), "float32", scope="local")
                        q_s = T.sblock_alloc_buffer((d_qk,), "float32", scope="shared")
                        s_s = T.sblock_alloc_buffer((nt,), "float32", scope="shared")
                        seq[0] = 0
                        for bb in T.serial(batch_size):
                            if q_indptr[bb] <= row:
                                seq[0] = bb
                        b: T.let[T.int32] = seq[0]
                        lo: T.let[T.int32] = _ragged_range(causal, kv_indptr[b + 1] - kv_indptr[b],
                                                           q_indptr[b + 1] - q_indptr[b], row - q_indptr[b],
                                                           every_window)[0]
                        hi: T.let[T.int32] = _ragged_range(causal, kv_indptr[b + 1] - kv_indptr[b],
                                                           q_indptr[b + 1] - q_indptr[b], row - q_indptr[b],
                                                           every_window)[1]
                        base: T.let[T.int32] = kv_indptr[b] + lo
                        start(q, row, h, tx, q_s, st, acc)
                        for tile in T.serial(T.ceildiv(T.max(hi - lo, 0), nt)):
                            n_t: T.let[T.int32] = T.min(nt, hi - lo - tile * nt)
                            if tx < n_t:
                                st[3] = T.float32(0)
                                for i in T.serial(d_qk):
                                    st[3] += q_s[i] * k[base + tile * nt + tx, h // group, i].astype("float32")
                                s_s[tx] = _score(st[3], sm_scale, softcap)
                            T.tvm_storage_sync("shared")
                            rescale(st, acc, s_s, n_t)
                            for t in T.serial(n_t):
                                for c in T.serial(dpt):
                                    if c * nt + tx < d_v:
                                        acc[c] += T.exp2(s_s[t] - st[2]) * \
                                            v[base + tile * nt + t, h // group, c * nt + tx].astype("float32")
                            st[0] = st[2]
                            T.tvm_storage_sync("shared")
                        finish(output, lse, row, h, tx, st, acc)

    return batch_prefill_ragged_kv


def paged_prefill(h_kv: int, h_q: int, d: int, dtype: str, sliding_window: bool, rope_scaling=None,
                  page_size: int = 16, sliding_window_size: int = 1024, softcap: float | None = None,
                  every_window: int = 0):
    """Replacement of `_attention_prefill` (same arguments but the target): a prefill chunk against the cache."""
    from tvm.script import tirx as T
    group, nt = h_q // h_kv, _THREADS
    dpt = -(-d // nt)
    window = sliding_window_size if sliding_window else 0
    symbol = "edgequant_prefill_paged_kv_gpu" + ("_sliding_window" if sliding_window else "")
    start, _, finish, paged_walk = _macros(T, d, d, group, softcap, page_size, sliding_window)

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv(var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle,
                               var_page_indptr: T.handle, var_page_values: T.handle, var_length_info: T.handle,
                               var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
                               var_output: T.handle, var_lse: T.handle, causal: T.int32, rotary_mode: T.int32,
                               rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"global_symbol": symbol, "tirx.is_scheduled": True})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        pages_off = T.int64()
        q_indptr_off = T.int32()
        page_indptr_off = T.int32()
        page_values_off = T.int32()
        k_rope_off = T.int32()
        q_rope_off = T.int32()
        length_info_off = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_off)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype, elem_offset=pages_off)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_off)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_off)
        _k_rope = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_off)
        _q_rope = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_off)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        length_info = _length_info(T, var_length_info, batch_size, sliding_window, length_info_off)
        assert rotary_mode == 0, "edgequant's GPU attention kernels take rotated q and k (no inline RoPE)"
        for row in T.thread_binding(total_len, thread="blockIdx.x"):
            for h in T.thread_binding(h_q, thread="blockIdx.y"):
                for tx in T.thread_binding(nt, thread="threadIdx.x"):
                    with T.sblock("attn"):
                        T.reads()
                        T.writes()
                        seq = T.sblock_alloc_buffer((1,), "int32", scope="local")
                        st = T.sblock_alloc_buffer((4,), "float32", scope="local")
                        acc = T.sblock_alloc_buffer((dpt,), "float32", scope="local")
                        q_s = T.sblock_alloc_buffer((d,), "float32", scope="shared")
                        s_s = T.sblock_alloc_buffer((nt,), "float32", scope="shared")
                        page_s = T.sblock_alloc_buffer((nt,), "int32", scope="shared")
                        slot_s = T.sblock_alloc_buffer((nt,), "int32", scope="shared")
                        seq[0] = 0
                        for bb in T.serial(batch_size):
                            if q_indptr[bb] <= row:
                                seq[0] = bb
                        b: T.let[T.int32] = seq[0]
                        begin: T.let[T.int32] = page_indptr[b]
                        n_k: T.let[T.int32] = _kv_len(length_info, b, page_indptr[b + 1] - begin, page_size,
                                                      sliding_window)
                        n_q: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                        qi: T.let[T.int32] = row - q_indptr[b]
                        lo: T.let[T.int32] = _first_visible(causal, n_k, n_q, qi, window, every_window)
                        hi: T.let[T.int32] = _end_visible(causal, n_k, n_q, qi, window)
                        start(q, row, h, tx, q_s, st, acc)
                        paged_walk(pages, page_values, length_info, begin, b, lo, hi, h, tx, sm_scale, q_s, s_s,
                                   page_s, slot_s, st, acc)
                        finish(output, lse, row, h, tx, st, acc)

    return batch_prefill_paged_kv


def paged_decode(h_kv: int, h_q: int, d: int, dtype: str, sliding_window: bool, rope_scaling=None,
                 page_size: int = 16, softcap: float | None = None, every_window: int = 0):
    """Replacement of `_attention_decode` (same arguments but the target): one query per sequence against the cache,
    its own key included."""
    from tvm.script import tirx as T
    group, nt = h_q // h_kv, _THREADS
    dpt = -(-d // nt)
    symbol = "edgequant_decode_paged_kv_gpu" + ("_sliding_window" if sliding_window else "")
    start, _, finish, paged_walk = _macros(T, d, d, group, softcap, page_size, sliding_window)

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
                              page_table_values_handle: T.handle, var_length_info: T.handle,
                              k_rope_pos_offset_handle: T.handle, q_rope_position_handle: T.handle,
                              output_handle: T.handle, lse_handle: T.handle, rotary_mode: T.int32,
                              rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"global_symbol": symbol, "tirx.is_scheduled": True})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        pages_off = T.int64()
        page_indptr_off = T.int32()
        page_values_off = T.int32()
        k_rope_off = T.int32()
        q_rope_off = T.int32()
        length_info_off = T.int32()
        Q = T.match_buffer(Q_handle, (B, h_q, d), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, d), dtype, elem_offset=pages_off)
        page_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_off)
        page_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_off)
        _k_rope = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_off)
        _q_rope = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_off)
        output = T.match_buffer(output_handle, (B, h_q, d), dtype)
        lse = T.match_buffer(lse_handle, (B, h_q), "float32")
        length_info = _length_info(T, var_length_info, B, sliding_window, length_info_off)
        assert rotary_mode == 0, "edgequant's GPU attention kernels take rotated q and k (no inline RoPE)"
        for b in T.thread_binding(B, thread="blockIdx.x"):
            for h in T.thread_binding(h_q, thread="blockIdx.y"):
                for tx in T.thread_binding(nt, thread="threadIdx.x"):
                    with T.sblock("attn"):
                        T.reads()
                        T.writes()
                        st = T.sblock_alloc_buffer((4,), "float32", scope="local")
                        acc = T.sblock_alloc_buffer((dpt,), "float32", scope="local")
                        q_s = T.sblock_alloc_buffer((d,), "float32", scope="shared")
                        s_s = T.sblock_alloc_buffer((nt,), "float32", scope="shared")
                        page_s = T.sblock_alloc_buffer((nt,), "int32", scope="shared")
                        slot_s = T.sblock_alloc_buffer((nt,), "int32", scope="shared")
                        begin: T.let[T.int32] = page_indptr[b]
                        n_k: T.let[T.int32] = _kv_len(length_info, b, page_indptr[b + 1] - begin, page_size,
                                                      sliding_window)
                        # the query is the last key (appended before the step): its position is n_k - 1
                        lo: T.let[T.int32] = _window_start(n_k - 1, every_window)
                        start(Q, b, h, tx, q_s, st, acc)
                        paged_walk(pages, page_values, length_info, begin, b, lo, n_k, h, tx, sm_scale, q_s, s_s,
                                   page_s, slot_s, st, acc)
                        finish(output, lse, b, h, tx, st, acc)

    return batch_decode_paged_kv


def gpu_kernels_for(softcap: float | None, every_window: int = 0) -> dict:
    """{name in tvm.relax.frontend.nn.llm.kv_cache: kernel builder} with the stock GPU builders' signatures (they
    take the target last; these kernels are the same for every GPU API). `every_window`: see
    paged_attention_cpu.cpu_kernels_for."""
    return {
        "_attention_prefill_ragged": lambda h_kv, h_q, d_qk, d_v, dtype, rope_scaling, target:
            ragged_prefill(h_kv, h_q, d_qk, d_v, dtype, softcap, every_window),
        "_attention_prefill": lambda h_kv, h_q, d, dtype, sliding_window, rope_scaling, target, page_size=16,
        sliding_window_size=1024: paged_prefill(h_kv, h_q, d, dtype, sliding_window, rope_scaling, page_size,
                                                sliding_window_size, softcap, every_window),
        "_attention_decode": lambda h_kv, h_q, d, dtype, sliding_window, rope_scaling, target, page_size=16:
            paged_decode(h_kv, h_q, d, dtype, sliding_window, rope_scaling, page_size, softcap, every_window),
    }
