"""Greedy sampling on the device: the index of the largest logit, as one small kernel.

At batch 1 a CUDA decode step is bound by the host (apps/cuda/README.md): copying the 49k fp32 logits of every step to
the host (pageable memory, ~30 us) and taking `np.argmax` there cost more than this kernel and a 4-byte copy. One block
of threads: each thread keeps the first largest value of its strided slice, the warp's 32 candidates meet through
shuffles, one shared slot per warp, and thread 0 scans the slots; every comparison keeps the larger value and, on ties,
the smaller index, so the result is `np.argmax`'s (the first largest) for logits without NaN (with NaN it is some
index, where np.argmax gives the first NaN's).

`argmax_func(vocab, gpu=False)` is its CPU twin: the same scan and comparisons with serial thread loops, one slot per
thread instead of the shuffles (the argmax of CPU libraries, and the test against NumPy).

`step=True` is the last kernel of the one-graph decode step (export/graph_decode.py): it also copies the logits into
the runner's buffer, writes the token id into the step's token input and advances the position input by one, all
in place, so the next replay of the graph reads them without the host writing anything.
"""
from __future__ import annotations
from .tvmscript import parse_tir

THREADS = 1024


def argmax_func(vocab: int, gpu: bool = True, threads: int = THREADS, step: bool = False):
    """prim func (logits [1, 1, vocab] float32, token [1] int32); with `step`: (logits, logits_copy [1, 1, vocab]
    float32, token [1] int32, pos [1] int32), token and pos updated in place."""

    nt = threads
    steps = -(-vocab // nt)
    local = '"local"' if gpu else '"global"'
    slots = nt // 32 if gpu else nt              # the slots thread 0 scans: one per warp (twin: one per thread)
    bloop = 'T.thread_binding(1, thread="blockIdx.x")' if gpu else "T.serial(1)"
    tloop = f'T.thread_binding({nt}, thread="threadIdx.x")' if gpu else f"T.serial({nt})"

    def better(v, i, bv, bi):   # (v, i) replaces (bv, bi): a real entry, larger, or as large at a smaller index
        return f"{i} < {vocab} and ({v} > {bv} or ({v} == {bv} and {i} < {bi}) or {bi} == {vocab})"

    sig = (f'lo: T.Buffer((1, 1, {vocab}), "float32"), out: T.Buffer((1,), "int32"), '
           'pos: T.Buffer((1,), "int32")') if step else 'out: T.Buffer((1,), "int32")'
    L = ["@T.prim_func", f'def main(x: T.Buffer((1, 1, {vocab}), "float32"), {sig}):',
         '    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})',
         f"    for bx in {bloop}:",
         f'        sv = T.alloc_buffer(({slots},), "float32"' + (', scope="shared")' if gpu else ")"),
         f'        si = T.alloc_buffer(({slots},), "int32"' + (', scope="shared")' if gpu else ")"),
         f"        for tx in {tloop}:",
         f'            bv = T.alloc_buffer((1,), "float32", scope={local})',
         f'            bi = T.alloc_buffer((1,), "int32", scope={local})',
         f'            ov = T.alloc_buffer((1,), "float32", scope={local})',
         f'            oi = T.alloc_buffer((1,), "int32", scope={local})',
         f'            tk = T.alloc_buffer((1,), "int32", scope={local})',
         "            bv[0] = T.float32(-3.4028234663852886e38)",
         f"            bi[0] = {vocab}",
         f"            for j in T.serial({steps}):",
         f"                if j * {nt} + tx < {vocab}:",
         *([f"                    lo[0, 0, j * {nt} + tx] = x[0, 0, j * {nt} + tx]"] if step else []),
         f"                    if x[0, 0, j * {nt} + tx] > bv[0] or bi[0] == {vocab}:",
         f"                        bv[0] = x[0, 0, j * {nt} + tx]",
         f"                        bi[0] = j * {nt} + tx"]
    ind = "            "
    if gpu:   # the warp's 32 candidates meet through shuffles, one slot per warp, then thread 0 scans the slots
        for off in (16, 8, 4, 2, 1):
            L += [f"{ind}ov[0] = T.tvm_warp_shuffle_down(T.uint32(0xFFFFFFFF), bv[0], {off}, 32, 32)",
                  f"{ind}oi[0] = T.tvm_warp_shuffle_down(T.uint32(0xFFFFFFFF), bi[0], {off}, 32, 32)",
                  f"{ind}if {better('ov[0]', 'oi[0]', 'bv[0]', 'bi[0]')}:",
                  f"{ind}    bv[0] = ov[0]", f"{ind}    bi[0] = oi[0]"]
        L += [f"{ind}if tx % 32 == 0:", f"{ind}    sv[tx // 32] = bv[0]", f"{ind}    si[tx // 32] = bi[0]"]
        L += [f"{ind}if tx == 0:"]
        body = ind + "    "
    else:
        L += [f"{ind}sv[tx] = bv[0]", f"{ind}si[tx] = bi[0]"]
        L += [f"        for tx in {tloop}:", f"{ind}if tx == 0:"]
        body = ind + "    "
        L += [f'{body}bv = T.alloc_buffer((1,), "float32")', f'{body}bi = T.alloc_buffer((1,), "int32")',
              f'{body}tk = T.alloc_buffer((1,), "int32")', f"{body}bv[0] = sv[0]", f"{body}bi[0] = si[0]"]
    # through a register: TVM's barrier planner takes no shared load in a branch condition
    L += [f"{body}for w in T.serial({slots}):",
          f"{body}    tk[0] = T.Select({better('sv[w]', 'si[w]', 'bv[0]', 'bi[0]')}, 1, 0)",
          f"{body}    bv[0] = T.Select(tk[0] == 1, sv[w], bv[0])",
          f"{body}    bi[0] = T.Select(tk[0] == 1, si[w], bi[0])",
          f"{body}out[0] = T.min(bi[0], {vocab - 1})"]
    if step:
        L += [f"{body}pos[0] = pos[0] + 1"]
    return parse_tir("\n".join(L) + "\n")
