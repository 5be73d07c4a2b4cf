"""Which dlight rules schedule the model's kernels on each kind of device.

GPU targets: the fused dequantize+matmul kernels are GEMV at decode (one row) and Matmul at prefill (dynamic rows);
the outlier NT-matmul takes the same rules, and the `take` gather, norms and softmax fall to Reduction/Fallback.
The first rule that returns a schedule wins (a rule that raises aborts the pass, so kernels are kept free of
data-dependent reads inside reductions; see TVM_0.27_NOTES.md section 5). CPU targets: our own `cpu.CPUMatmul`
(dlight has no CPU rule for a fused dequantize + matmul), then `cpu.CPUParallel`: other kernels keep TVM's default
loop nest, with their prompt-length loop parallel.
"""
from __future__ import annotations

from . import workarounds


def gpu_rules():
    from tvm.s_tir import dlight as dl
    workarounds.apply()
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
            dl.gpu.Fallback()]


def cpu_rules():
    from .cpu import CPUMatmul, CPUParallel
    return [CPUMatmul(), CPUParallel()]


def schedule_pass(target):
    """The dlight pass for `target` (a tvm.target.Target)."""
    import tvm
    from tvm.s_tir import dlight as dl
    if target.kind.name == "llvm":
        return dl.ApplyDefaultSchedule(*cpu_rules())
    return tvm.transform.Sequential([workarounds.mark_do_not_tensorize(), dl.ApplyDefaultSchedule(*gpu_rules())])
