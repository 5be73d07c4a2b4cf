"""The fp16 exp lowering of tvm_schedules/exp16.py: every one of the 65536 float16 inputs gives the bits of LLVM's
own lowering (fptrunc(expf(fpext(x))), called here directly as the llvm.exp intrinsic on float32), scalar and in
8-lane vectors; float32 exp keeps LLVM's intrinsic."""
import numpy as np
import pytest

pytestmark = pytest.mark.tvm


def _build(body: str, dtype: str = "float16", lanes: int = 1):
    import tvm
    from tvm.script import tirx as T
    src = f"""@T.prim_func
def f(a: T.Buffer((65536,), "{dtype}"), b: T.Buffer((65536,), "{dtype}")):
    T.func_attr({{"tir.noalias": True}})
    for i in T.serial({65536 // lanes}):
        b[{f"T.ramp(i * {lanes}, 1, {lanes})" if lanes > 1 else "i"}] = {body}
"""
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    return tvm.compile(tvm.IRModule({"main": tvm.script.from_source(src, extra_vars={"T": T})}), target=host)


def _run(ex, x):
    import tvm
    out = tvm.runtime.tensor(np.zeros_like(x))
    ex(tvm.runtime.tensor(x), out)
    return out.numpy()


def test_fp16_exp_equals_libm_for_every_input():
    from edgequant.tvm_schedules import exp16
    exp16.register()
    x = np.arange(65536, dtype=np.uint16).view(np.float16)
    libm = _run(_build('T.Cast("float16", T.call_llvm_pure_intrin("float32", "llvm.exp", '
                       'T.Cast("float32", a[i])))'), x)
    for lanes in (1, 8):
        at = f"T.ramp(i * {lanes}, 1, {lanes})" if lanes > 1 else "i"
        got = _run(_build(f"T.exp(a[{at}])", lanes=lanes), x)
        same = (got.view(np.uint16) == libm.view(np.uint16)) | (np.isnan(got) & np.isnan(libm))
        assert same.all(), f"{(~same).sum()} inputs differ, e.g. {x[~same][:5]}"


def test_fp32_exp_keeps_the_intrinsic():
    from edgequant.tvm_schedules import exp16
    exp16.register()
    x = np.random.default_rng(0).standard_normal(65536).astype(np.float32) * 20
    libm = _run(_build('T.call_llvm_pure_intrin("float32", "llvm.exp", a[i])', "float32"), x)
    np.testing.assert_array_equal(_run(_build("T.exp(a[i])", "float32"), x), libm)
