"""Every workaround for a crash or trap in the apache-tvm 0.27.0.post1 wheel, in one place.

`apply()` is idempotent and is called by every module that schedules or compiles (export pipeline, kernel tests).
Each patch names the bug it avoids; delete it when the wheel is fixed.
"""
from __future__ import annotations

_APPLIED = False


def _metal_matmul_disabled(self, func, target, tunable):  # noqa: ARG001
    raise RuntimeError("MetalMatmul disabled: s_tir Tensorize segfaults in apache-tvm 0.27.0.post1")


def apply() -> None:
    """Patch dlight so that no schedule reaches the crashing code paths."""
    global _APPLIED
    if _APPLIED:
        return
    from tvm.s_tir import dlight as dl

    # Bug 1: s_tir `Tensorize` segfaults (the whole process dies) in this wheel. dl.gpu.Matmul reaches it through
    # MetalMatmul (simdgroup matrices, every metal target) and MatmulTensorization (cuda sm>=70, fp16, when not every
    # static extent is <= 64); TVM's own tests/python/s_tir/dlight/test_gpu_matmul_tensorize.py dies the same way.
    # dl.gpu.Matmul catches an exception from MetalMatmul and uses its SIMT schedule instead.
    # Routed around on CUDA for the quantized linears' prefill: `mma_gemm.py` carries its tensor-core GEMM as CUDA
    # source in a TIR prim func (T.cuda.func_call), which no schedule primitive touches; other matmuls stay SIMT.
    dl.gpu.matmul.MetalMatmul.apply = _metal_matmul_disabled
    # Bug 2: MatmulTensorization.apply imports tvm.s_tir.tensor_intrin.cuda before it checks the
    # "dlight.do_not_tensorize" attribute; that import takes ~43 s on a 2-core CPU and the path then hits bug 1.
    # Returning None means "rule does not apply", so Matmul uses the SIMT schedule.
    dl.gpu.matmul.MatmulTensorization.apply = lambda self, func, target, tunable: None
    # Bug 3: a module attribute string shorter than 8 bytes is stored as an ffi.SmallStr, and IRModule.get_attr then
    # raises "Cannot convert from type `ffi.SmallStr` to `ffi.Object`". relax.build's system-lib step calls
    # get_attr("system_lib_prefix"), so a short prefix such as "llama_" crashed mobile exports. The step only adds an
    # empty prefix when none is set; skip it when the module already carries one (C++ reads the attr fine).
    from tvm.relax import vm_build
    stock = vm_build._auto_attach_system_lib_prefix

    def _attach_prefix(tir_mod, target=None, system_lib=None):
        if tir_mod.attrs is not None and "system_lib_prefix" in tir_mod.attrs:
            return tir_mod
        return stock(tir_mod, target, system_lib)

    vm_build._auto_attach_system_lib_prefix = _attach_prefix
    _APPLIED = True


def mark_do_not_tensorize():
    """Module pass: tag every prim func with "dlight.do_not_tensorize" (belt and braces for bug 1 on cuda)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="MarkDoNotTensorize")
    def _pass(mod, _ctx):
        for gv, f in list(mod.functions_items()):
            if isinstance(f, tvm.tirx.PrimFunc) and "dlight.do_not_tensorize" not in (f.attrs or {}):
                mod[gv] = f.with_attr("dlight.do_not_tensorize", True)
        return mod

    return _pass
