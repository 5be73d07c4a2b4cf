"""Hand-written CPU (llvm) schedule for the model's matmul kernels: fused dequantize + NT-matmul (+ epilogue), the
outlier NT-matmul and the fp16 lm_head.

dlight has no CPU matmul rule and its CPU GEMV rule does not match kernels with a fused dequantize, so without this
every linear ran as TVM's default single-threaded scalar loop nest. Two shapes:
- one row (decode, last-token logits) or no dequantize: GEMV. The dequantize is inlined (weights are read packed,
  once), K is split into 8-lane chunks that accumulate in a vector (rfactor), output columns are parallel.
- several rows with a dequantize (prefill): dequantize once per call into a K-major fp16 tile (parallel, vectorised),
  then a register-tiled matmul, 4 rows x 32 columns per tile, vectorised along N, parallel over column tiles.
Any kernel of another shape is left to the remaining rules (returns None).

`CPUParallel`, the last rule, runs the prompt-length loop of every other kernel (norms, activations, residual adds,
casts: TVM's default loop nest is serial) on the thread pool: in each root block, the leading spatial loops when one
of them has a symbolic extent (the prompt's rows). One-row decode kernels stay serial, where a parallel launch would
cost more than the work. On a 128-token SmolLM2 prefill these serial kernels were ~10% of the CPU time, all on one
core. Elementwise kernels also get 16 vector lanes along a static innermost loop (SiLU x up: with the fp16 exp of
`exp16.py` no libm call is left to keep LLVM from vectorising it).
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule

VL = 8        # fp32 lanes of one AVX2 / two NEON registers
ROWS = 4      # register tile of the prefill matmul
VEC = 16      # lanes of the vectorised elementwise kernels
COLS = 32


def _iter_types(sch, block):
    return [iv.iter_type for iv in sch.get(block).iter_vars]


class _LLVMRule(ScheduleRule):
    """A rule for llvm targets whose `_schedule(func)` may fail on a loop nest it does not know: that function keeps
    TVM's default (serial) loop nest."""
    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            return self._schedule(func)
        except Exception:  # noqa: BLE001 - a loop nest this rule does not know: keep the default
            return None


class CPUMatmul(_LLVMRule):
    def _schedule(self, func):
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        names = [sch.get(b).name_hint for b in blocks]
        reductions = [b for b in blocks if tirx.IterVar.CommReduce in _iter_types(sch, b)]
        if len(reductions) != 1:
            return None
        mm = reductions[0]
        types = _iter_types(sch, mm)
        if types[-1] != tirx.IterVar.CommReduce or tirx.IterVar.CommReduce in types[:-1] or len(types) < 2:
            return None
        deq = [b for b, n in zip(blocks, names) if n.startswith("dequantize")]
        pos = blocks.index(mm) if mm in blocks else names.index(sch.get(mm).name_hint)
        before = [b for b in blocks[:pos] if b not in deq]
        after = blocks[pos + 1:]
        if before:  # e.g. a gather feeding the reduction: not a shape handled here
            return None
        loops = sch.get_loops(mm)
        if len(loops) != len(types):
            return None
        rows = 1
        for lp in loops[:-2]:
            ext = sch.get(lp).extent
            rows = rows * ext.value if isinstance(ext, tirx.IntImm) and isinstance(rows, int) else None
        if deq and rows != 1:
            self._gemm(sch, mm, deq, after)
        else:
            self._gemv(sch, mm, deq, after)
        return sch

    def _gemv(self, sch, mm, deq, after):
        for d in deq:
            sch.compute_inline(d)
        loops = sch.get_loops(mm)
        spatial, k = loops[:-1], loops[-1]
        ko, ki = sch.split(k, [None, VL])
        rf = sch.rfactor(ki, len(spatial))
        rloops = sch.get_loops(rf)           # spatial..., ko, ki (ki is spatial in the rfactor block)
        n = rloops[len(spatial) - 1]
        jo, ji = sch.split(n, [None, 16])
        outer = sch.fuse(*rloops[:len(spatial) - 1], jo) if len(spatial) > 1 else jo
        sch.parallel(outer)
        sch.reverse_compute_at(mm, ji)
        for b in after:
            sch.reverse_compute_at(b, ji)
        sch.vectorize(sch.get_loops(rf)[-1])
        sch.decompose_reduction(rf, sch.get_loops(rf)[-2])

    def _gemm(self, sch, mm, deq, after):
        for d in deq:
            sch.transform_layout(d, ("write", 0), lambda n, k: (k, n))
            dn, dk = sch.get_loops(d)
            sch.reorder(dk, dn)
            dko, _ = sch.split(dk, [None, 16])
            sch.parallel(dko)
            sch.vectorize(sch.split(dn, [None, VL])[1])
        local = sch.cache_write(mm, 0, "local")
        loops = sch.get_loops(mm)
        spatial, k = loops[:-1], loops[-1]
        i = sch.fuse(*spatial[:-1]) if len(spatial) > 2 else spatial[0]
        io, ii = sch.split(i, [None, ROWS])
        jo, ji = sch.split(spatial[-1], [None, COLS])
        sch.reorder(jo, io, k, ii, ji)
        sch.parallel(jo)
        sch.reverse_compute_at(local, io)
        sch.vectorize(ji)
        sch.unroll(ii)
        sch.decompose_reduction(mm, k)
        for b in after:  # epilogues (cast, bias, residual): one parallel pass over the output
            try:
                lp = sch.get_loops(b)
                sch.parallel(sch.fuse(*lp[:-1]) if len(lp) > 2 else lp[0])
            except Exception:  # noqa: BLE001 - leave an epilogue of unusual shape serial
                pass


class CPUParallel(_LLVMRule):
    def _schedule(self, func):
        from tvm.s_tir.dlight.analysis import normalize_prim_func
        from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
        sch = s_tir.Schedule(func)
        # one loop nest for a chain of elementwise blocks (cast, split, sigmoid, multiplies): as separate parallel
        # loop nests over full-size intermediates they cost twice the CPU of the serial default
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if not infos:
            return None
        changed = False
        for info in infos:
            # the leading spatial loops up to the first of symbolic extent (the prompt's rows); inner loops stay
            # whole (a fused row x hidden loop costs a division per element and loses vectorisation)
            lead = None
            for i, it in enumerate(info.iters):
                if it.kind != "S":
                    break
                if not isinstance(it.dom, (int, tirx.IntImm)):
                    lead = i + 1
                    break
            if lead is None:
                continue    # static extents: a decode (one-row) kernel
            all_loops = sch.get_loops(info.block_rv)
            loops = all_loops[:lead]
            sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])
            changed = True
            # an elementwise kernel (SiLU x up, casts, adds) with a static innermost loop: vector lanes along it
            inner = sch.get(all_loops[-1]).extent if len(all_loops) > lead else None
            if info.is_injective() and isinstance(inner, tirx.IntImm) and inner.value % VEC == 0:
                sch.vectorize(sch.split(all_loops[-1], [None, VEC])[1])
        return sch if changed else None
