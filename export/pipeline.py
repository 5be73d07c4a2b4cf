"""The relax compilation pipeline for exported models: TVM 0.27's stock phases per device, with the legalize phase
extended so that every quantized linear becomes one fused dequantize + matmul kernel, then dlight schedules.

Two passes are added to the stock legalize phase (both learned the hard way, see TVM_0.27_NOTES.md section 6):
- `FuseTransposeMatmul` before `LegalizeOps`: matmul(x, permute_dims(dequantize(W))) becomes one NT-matmul, else the
  dequantize is fused with the transpose and the fp16 weight is materialised;
- `fuse_dequantize_matmul` after FuseOps/FuseTIR: stock FuseOps does not fuse an injective producer into an
  out-elementwise-fusable NT-matmul, so a pattern pass does it (with up to three extra epilogue inputs: outlier sum,
  bias, residual).
"""
from __future__ import annotations

import tvm
from tvm import relax

from edgequant.tvm_schedules import rules, workarounds


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


def relax_pipeline(target):
    """A module pass compiling the exported model for `target` (pass it to `tvm.compile(relax_pipeline=...)`)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pl
    from tvm.relax.backend.cuda import pipeline as cuda_pl
    from tvm.relax.backend.gpu_generic import pipeline as gpu_pl

    workarounds.apply()
    kind = target.kind.name
    # the cuda/cpu_generic package __init__ does not re-export dataflow_lower_passes: use the .pipeline modules
    backend = cuda_pl if kind == "cuda" else (cpu_pl if kind == "llvm" else gpu_pl)
    legalize = [relax.transform.FuseTransposeMatmul(), relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(), relax.transform.FuseOps(),
                relax.transform.FuseTIR(), fuse_dequantize_matmul, rules.schedule_pass(target)]

    @tvm.transform.module_pass(opt_level=0, name="EdgequantPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(backend.library_dispatch_passes(target) + legalize
                                           + backend.dataflow_lower_passes(target) + backend.finalize_passes(target))
            return seq(mod)

    return _pipeline
