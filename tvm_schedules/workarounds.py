"""Every workaround for a crash or trap in the apache-tvm 0.27.0.post1 wheel, in one place.

`apply()` is idempotent and is called by every module that schedules or compiles (export pipeline, kernel tests).
Each patch names the bug it avoids; delete it when the wheel is fixed.
"""
from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def own_attention(softcap: float | None, every_window: int = 0):
    """Within the block, `TIRPagedKVCache` builds edgequant's attention kernels instead of the stock ones: on llvm
    tvm_schedules/paged_attention_cpu.py, on every GPU target paged_attention_gpu.py; the runtime calls them through
    the same ABI. `every_window`: a window on every layer, applied by the kernels of "mha" layers (bug 5).

    Bug 4: the stock paged-prefill CPU kernel (`_attention_prefill_cpu`, the chunk's queries against the keys cached
    before it) leaves its running maximum `new_m` unset when a query's first keys are masked, which only happens for
    "mha_sliding" layers past the window: logits off by about their whole range, or NaN, depending on memory
    contents. Its ragged kernel (a chunk against itself) has no window mask at all; the export keeps prefill chunks
    within the window for that one (export/build.py `prefill_chunk`). The stock GPU kernels share the ragged
    kernel's gap and were never shown exact past the window here; they are replaced alike.
    Bug 5: a cache whose layers are all "mha_sliding" (Mistral, Phi-3: one window for every layer) fails its first
    prefill ("Check failed: (data_ != nullptr)" in Tensor::CreateView): the runtime allocates its q/k/v staging
    buffers only when some layer is "mha". Such models keep "mha" layers and the window goes into the kernels.
    Missing feature: no stock kernel has attention logit soft-capping (Gemma 2); these take it as `softcap`.
    """
    from tvm.relax.frontend.nn.llm import kv_cache

    from .paged_attention_cpu import cpu_kernels_for
    from .paged_attention_gpu import gpu_kernels_for
    kernels = {**cpu_kernels_for(softcap, every_window), **gpu_kernels_for(softcap, every_window)}
    stock = {name: getattr(kv_cache, name) for name in kernels}
    for name, fn in kernels.items():
        setattr(kv_cache, name, fn)
    try:
        yield
    finally:
        for name, fn in stock.items():
            setattr(kv_cache, name, fn)
