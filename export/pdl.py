"""Programmatic dependent launch (PDL, sm_90+) for the CUDA export's decode GEMV kernels.

`gemv.gemv_func(pdl=True)` kernels wait for the previous kernel (`griddepcontrol.wait`) only after issuing their
first weight loads and let the next kernel launch before their last step, so each linear's ramp overlaps the
previous one's tail (H200, LLaMA-7B decode step of GEMVs: 7-9% faster, benchmarks/results/gpu-nvidia-h200.md) -
but only when they are launched with programmatic stream serialization. TVM 0.27's CUDA runtime launches a kernel
that way (cuLaunchKernelEx) when its `tirx.kernel_launch_params` hold the flag `tirx.use_programtic_dependent_launch`
(TVM's spelling), and no pass of the wheel sets it (SplitHostDevice copies neither a function attribute nor an
attribute statement into it). `PIPELINE` is TVM's default TIR pipeline plus `tag_pdl_kernels`, which adds the flag
to every device kernel that calls `cudaGridDependencySynchronize` (a flag: it takes no launch argument, so the host
side stays as it is). griddepcontrol needs sm_90, so the export builds PDL kernels only when every --arch is sm_90 or
newer (`supported`); the default sm_80 + sm_90 fatbin keeps the plain ones.

A PDL kernel after a kernel that never triggers starts when that kernel ends (the implicit trigger), as without
PDL; a kernel launched plainly after a PDL kernel waits for it to end: only GEMV-to-GEMV edges overlap.
"""
from __future__ import annotations

TAG = "tirx.use_programtic_dependent_launch"
PIPELINE = "edgequant_pdl"
WAIT = "cudaGridDependencySynchronize"
_DYN_SHMEM = "tirx.use_dyn_shared_memory"   # the runtime wants this tag last


def supported(target) -> bool:
    """CUDA with every arch of the export sm_90 or newer (the target carries the lowest: targets.tvm_target)."""
    if target.kind.name != "cuda":
        return False
    arch = str(target.attrs.get("arch", ""))
    return arch.startswith("sm_") and arch[3:].rstrip("a").isdigit() and int(arch[3:].rstrip("a")) >= 90


def _waits(func) -> bool:
    # this wheel's Python side has no TIR visitor; the kernel's printed body names the call
    return f'"{WAIT}"' in func.script()


def tag_pdl_kernels():
    """Module pass (after SplitHostDevice): the PDL flag into the launch parameters of the kernels that wait."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="edgequant.TagPDLKernels")
    def run(mod, _ctx):
        updates = {}
        for gv, func in mod.functions.items():
            params = func.attrs.get("tirx.kernel_launch_params") if isinstance(func, tvm.tirx.PrimFunc) and \
                func.attrs is not None else None
            if params is None or TAG in params or not _waits(func):
                continue
            tags = [str(p) for p in params]
            at = tags.index(_DYN_SHMEM) if _DYN_SHMEM in tags else len(tags)
            updates[gv] = func.with_attr("tirx.kernel_launch_params", tags[:at] + [TAG] + tags[at:])
        for gv, func in updates.items():
            mod[gv] = func
        return mod
    return run


def register() -> str:
    """Register `PIPELINE` with TVM (idempotent); returns its name for `tvm.compile(tir_pipeline=...)`."""
    import tvm
    from tvm.tirx import compilation_pipeline as cp

    def factory(**kwargs):
        base, host, device = cp.get_tir_pipeline("default", **kwargs)
        tag = tag_pdl_kernels()

        @tvm.transform.module_pass(opt_level=0, name="edgequant.PDLPipeline")
        def pipeline(mod, ctx):
            return tag(base(mod))
        return pipeline, host, device
    cp.register_tir_pipeline(PIPELINE, factory)
    return PIPELINE
