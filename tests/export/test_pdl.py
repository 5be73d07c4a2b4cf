"""export/pdl.py: the TIR pipeline that asks TVM's CUDA runtime to launch the decode GEMV kernels with programmatic
dependent launch, and when the export uses it. The launches themselves ran on an H200 (benchmarks/results)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.tvm


def _lowered(pdl_flags: dict[str, bool]):
    import tvm
    from tvm.tirx import compilation_pipeline as cp

    from edgequant.export import pdl
    from edgequant.export.targets import PRESETS
    from edgequant.tvm_schedules.dequant import QuantSpec
    from edgequant.tvm_schedules.gemv import gemv_func
    spec = QuantSpec(64, 256, 4, 128, False, "words")
    mod = tvm.IRModule({name: gemv_func(spec, act="int8", pdl=flag, name=name).with_attr("global_symbol", name)
                        for name, flag in pdl_flags.items()})
    target = tvm.target.Target({**PRESETS["cuda"].target, "arch": "sm_90"}, host="llvm")
    mod = tvm.tirx.transform.BindTarget(target)(mod)
    pipeline = cp.get_tir_pipeline(pdl.register())[0]   # what tvm.compile(tir_pipeline=...) runs
    return {gv.name_hint: f for gv, f in pipeline(mod).functions.items()}


def test_pipeline_flags_only_the_kernels_that_wait():
    from edgequant.export import pdl
    funcs = _lowered({"with_pdl": True, "plain": False})
    params = {name: [str(p) for p in f.attrs["tirx.kernel_launch_params"]] for name, f in funcs.items()
              if f.attrs is not None and "tirx.kernel_launch_params" in f.attrs}
    # the flag takes no launch argument: the grid and block extents stay where the host call passes them
    assert params["with_pdl_kernel"] == ["blockIdx.x", "threadIdx.y", "threadIdx.x", pdl.TAG]
    assert params["plain_kernel"] == ["blockIdx.x", "threadIdx.y", "threadIdx.x"]


@pytest.mark.parametrize("arch,want", [("sm_90", True), ("sm_90,sm_100", True), ("sm_80,sm_90", False), ("sm_80", False)])
def test_supported_needs_sm_90_for_every_arch(arch, want):
    import tvm

    from edgequant.export import pdl, targets
    assert pdl.supported(targets.tvm_target(targets.get_preset("cuda"), arch)) is want
    if arch == "sm_90":   # the default fatbin (sm_80 and sm_90) keeps the plain kernels: griddepcontrol is sm_90+
        assert not pdl.supported(targets.tvm_target(targets.get_preset("cuda"), None))
    assert not pdl.supported(tvm.target.Target("llvm"))
