"""The relax compilation pipeline for exported models: TVM 0.27's stock phases per device, with the legalize phase
extended so that every quantized linear becomes one fused dequantize + matmul kernel, then dlight schedules.

Two passes are added to the stock legalize phase (both learned the hard way, see TVM_0.27_NOTES.md section 6):
- `FuseTransposeMatmul` before `LegalizeOps`: matmul(x, permute_dims(dequantize(W))) becomes one NT-matmul, else the
  dequantize is fused with the transpose and the fp16 weight is materialised;
- `fuse_dequantize_matmul` after FuseOps/FuseTIR: stock FuseOps does not fuse an injective producer into an
  out-elementwise-fusable NT-matmul, so a pattern pass does it (with up to three extra epilogue inputs: outlier sum,
  bias, residual).

On CUDA the quantized linears arrive here already as call_tir of hand-written kernels (`export/quant_linear.py`):
the decode GEMV (`tvm_schedules/gemv.py`) for one row and the tensor-core GEMM (`tvm_schedules/mma_gemm.py`,
4/2 bits) for prefill; both carry "tirx.is_scheduled" (dlight skips them) and the GEMM is marked opaque for FuseOps.
3-bit prefill and the fp16 layers keep the fused kernels and dlight.

On llvm targets with integer dot products (x86 AVX2 or VNNI, aarch64 dotprod), `int8_decode_gemv` runs first: every
one-row matmul of a dequantized weight (decode, last-token logits) becomes one call of the int8 dot-product GEMV
(`tvm_schedules/cpu_int8.py`; 8-bit tables as the output layer: `cpu_int8_w8.py`, VNNI and NEON only), with the
activations quantized to int8 per block of 32, and every [1, m]-row one (prefill, all-position logits) one call of its
GEMM twin (2-4 bits). `INT8_DECODE = False` (or EDGEQUANT_ACT_DTYPE=fp16 in the
environment) keeps the exact fp path everywhere.

On every llvm target `cpu_attention_pass` swaps the paged KV cache's CPU ragged-prefill and decode attention kernels
for the multi-threaded, vectorised ones of `tvm_schedules/cpu_attention.py` (same signatures; fp32 arithmetic like
the stock ones). `CPU_ATTENTION = False` (or EDGEQUANT_CPU_ATTENTION=stock) keeps TVM's kernels.
"""
from __future__ import annotations

import tvm
from tvm import relax

from edgequant.tvm_schedules import rules, workarounds

INT8_DECODE = True
CPU_ATTENTION = True


def int8_decode_enabled() -> bool:
    import os
    return INT8_DECODE and os.environ.get("EDGEQUANT_ACT_DTYPE", "int8").lower() != "fp16"


def int8_decode_gemv(isa: str, lanes: int = 8):
    """Module pass: matmul(x, permute_dims(dequantize(...))) with x of one row -> call_tir of the int8 GEMV; with x of
    [1, m] rows -> the int8 GEMM (4-bit: `lanes` weight rows per vector, `cpu_int8_rows.lanes_for`)."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from edgequant.export.quant_linear import SPEC_ATTR, spec_from_str
    from edgequant.tvm_schedules import cpu_int8, cpu_int8_w8

    matmul, permute = tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.permute_dims")
    call_tir = tvm.ir.Op.get("relax.call_tir")

    @mutator
    class Rewriter(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod_, self.funcs = mod, {}

        def _producer(self, e, op):
            b = self.lookup_binding(e) if isinstance(e, relax.Var) else None
            return b if isinstance(b, relax.Call) and b.op == op else None

        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if call.op != matmul or str(call.attrs.out_dtype) != "float32":
                return call
            perm = self._producer(call.args[1], permute)
            deq = self._producer(perm.args[0], call_tir) if perm is not None else None
            if deq is None or perm.attrs.axes is not None:
                return call
            f = self.mod_[deq.args[0]]
            spec_s = f.attrs.get(SPEC_ATTR) if f.attrs is not None else None
            shape = getattr(call.args[0].ty, "shape", None)
            if spec_s is None or shape is None:
                return call
            lead = tuple(shape.values[:-1])
            one = [isinstance(d, tvm.tirx.IntImm) and int(d) == 1 for d in lead]
            # one row: the GEMV; [1, m] rows (prefill): the GEMM of the same arithmetic row by row
            gemv = all(one)
            if not gemv and not (len(lead) == 2 and one[0]):
                return call
            spec = spec_from_str(spec_s)
            # 8-bit tables (`--embed-bits 8` as the output layer): the GEMV only; a [1, m] call keeps the fp path
            w8 = gemv and cpu_int8_w8.supports(spec, isa)
            if not (w8 or cpu_int8.supports(spec)):
                return call
            key = (spec_s, len(lead), gemv)
            if key not in self.funcs:
                if w8:
                    fn = cpu_int8_w8.gemv_func(spec, isa, "float32", tuple(1 for _ in lead))
                    fname = "int8_decode_gemv_w8"
                elif gemv:
                    fn = cpu_int8.int8_gemv_func(spec, isa, "float32", tuple(1 for _ in lead))
                    fname = "int8_decode_gemv"
                else:
                    fn, fname = cpu_int8.int8_gemm_func(spec, isa, "float32", lanes=lanes), "int8_prefill_gemm"
                self.funcs[key] = self.builder_.add_func(fn.without_attr("global_symbol"), fname)
            args = [call.args[0], *deq.args[1].fields]
            return relax.call_tir(self.funcs[key], args, relax.TensorType((*lead, spec.n), "float32"))

    @tvm.transform.module_pass(opt_level=0, name="Int8DecodeGemv")
    def _pass(mod, _ctx):
        rw = Rewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rw.builder_.update_func(gv, rw.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rw.builder_.get())

    return _pass


@tvm.transform.module_pass(opt_level=0, name="CpuAttention")
def cpu_attention_pass(mod, _ctx):
    import os

    from edgequant.tvm_schedules import cpu_attention
    if not CPU_ATTENTION or os.environ.get("EDGEQUANT_CPU_ATTENTION", "").lower() == "stock":
        return mod
    return cpu_attention.replace_in(mod)


def _dequantize_matmul_pattern(n_extra: int):
    from tvm.relax.dpl import GlobalVarPattern, TuplePattern, is_op, wildcard

    x = wildcard()
    w = is_op("relax.call_tir")(GlobalVarPattern(), wildcard(), add_constraint=False)
    mm = is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern([x, w] + [wildcard() for _ in range(n_extra)]),
                                 add_constraint=False)

    def check(ctx):
        wcall, mcall = ctx.annotated_expr["w"], ctx.annotated_expr["matmul"]
        return wcall.args[0].name_hint.startswith("dequantize") and "matmul" in mcall.args[0].name_hint

    return ("dequantize_matmul", mm, {"x": x, "w": w, "matmul": mm}, check)


@tvm.transform.module_pass(opt_level=0, name="FuseDequantizeMatmul")
def fuse_dequantize_matmul(mod, _ctx):
    seq = [relax.transform.FuseOpsByPattern([_dequantize_matmul_pattern(k)]) for k in range(4)]
    return tvm.transform.Sequential(seq + [relax.transform.FuseTIR(), relax.transform.DeadCodeElimination()])(mod)


def _backend(target):
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pl
    from tvm.relax.backend.cuda import pipeline as cuda_pl
    from tvm.relax.backend.gpu_generic import pipeline as gpu_pl
    kind = target.kind.name
    # the cuda/cpu_generic package __init__ does not re-export dataflow_lower_passes: use the .pipeline modules
    return cuda_pl if kind == "cuda" else (cpu_pl if kind == "llvm" else gpu_pl)


def scheduling_passes(target) -> list:
    """Library dispatch, our legalize phase and the dlight schedules: the model as call_tir of scheduled kernels,
    before relax is lowered to the VM (tests run the kernels from this stage on software GPU drivers)."""
    workarounds.apply()
    if target.kind.name == "llvm":
        from edgequant.tvm_schedules import exp16
        exp16.register()   # fp16 exp (SiLU's sigmoid) as vectorisable arithmetic, libm's results bit for bit
    isa = None
    if target.kind.name == "llvm" and int8_decode_enabled():
        from edgequant.tvm_schedules.cpu_int8 import target_isa
        from edgequant.tvm_schedules.cpu_int8_rows import lanes_for
        isa = target_isa(target)
    legalize = ([cpu_attention_pass] if target.kind.name == "llvm" else []) + \
        ([int8_decode_gemv(isa, lanes_for(target, isa))] if isa else []) + [
        relax.transform.FuseTransposeMatmul(), relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(), fuse_dequantize_matmul,
        rules.schedule_pass(target)]
    return _backend(target).library_dispatch_passes(target) + legalize


def relax_pipeline(target):
    """A module pass compiling the exported model for `target` (pass it to `tvm.compile(relax_pipeline=...)`)."""
    workarounds.apply()
    backend = _backend(target)

    @tvm.transform.module_pass(opt_level=0, name="EdgequantPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(scheduling_passes(target) + backend.dataflow_lower_passes(target)
                                           + backend.finalize_passes(target))
            return seq(mod)

    return _pipeline
