"""Kernel tests: the fused dequantize + matmul (+ outlier columns) prim func, compiled for llvm, against NumPy; and the
NumPy reference itself against edgequant's own unpacking (the checkpoint contract)."""
import numpy as np
import pytest
import torch

from edgequant.pack import pack
from edgequant.quantizer import QuantizedWeight
from edgequant.schemes import QuantScheme

pytestmark = pytest.mark.tvm

CASES = [  # bits, group, sym, K, layout: words and groups misaligned, ragged last groups, per channel
    (4, 32, False, 96, "words"), (3, 32, False, 100, "words"), (2, 64, True, 136, "words"), (4, -1, True, 70, "words"),
    (3, -1, False, 64, "words"), (2, 48, False, 72, "words"),
    # CUDA's int8 3-bit bit planes: K not a multiple of 8, 16 or 32, ragged groups, per channel, symmetric
    (3, 32, False, 100, "planes3"), (3, -1, True, 64, "planes3"), (3, 48, False, 200, "planes3"),
    (3, 128, False, 576, "planes3"),
    # the CPU exports' 3-bit byte planes: ragged 32-value lanes and groups; symmetric at the SmolLM2 width
    (3, 48, False, 200, "bytes3"), (3, 128, True, 576, "bytes3"),
    # the CUDA exports' 3-bit words3x32: ragged 32-value blocks, ragged groups, per channel
    (3, 32, False, 100, "words3x32"), (3, -1, True, 64, "words3x32"), (3, 48, False, 200, "words3x32"),
]


def _linear(rng, bits, group, sym, k, layout="words", n=24):
    from conftest import random_quantized_linear
    spec, q, qweight, scales, zeros = random_quantized_linear(rng, bits, group, sym, n, k, layout)
    assert qweight.shape == (n, spec.words)
    return spec, q, qweight, scales, zeros

@pytest.mark.parametrize("bits,group,sym,k,layout", CASES)
def test_reference_matches_checkpoint_dequantization(bits, group, sym, k, layout):
    from edgequant.tvm_schedules.dequant import dequantize_np
    rng = np.random.default_rng(bits * 100 + k)
    spec, q, qweight, scales, zeros = _linear(rng, bits, group, sym, k, layout)
    scheme = QuantScheme(bits, group, sym)
    zero_t = (torch.from_numpy(zeros.astype(np.float32)) if zeros is not None
              else torch.full((spec.n, spec.n_groups), float(scheme.sym_zero)))
    want = QuantizedWeight(torch.from_numpy(q), torch.from_numpy(scales.astype(np.float32)), zero_t, scheme).dequantize()
    np.testing.assert_allclose(dequantize_np(spec, qweight, scales, zeros), want.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits,group,sym,k,layout", CASES)
@pytest.mark.parametrize("rows,n_outliers", [(None, 0), (1, 0), (None, 3), (1, 2)])
def test_fused_kernel_matches_numpy(bits, group, sym, k, layout, rows, n_outliers):
    import tvm
    from edgequant.tvm_schedules.dequant import quant_matmul_func, quant_matmul_np
    rng = np.random.default_rng(bits * 7 + k + n_outliers)
    spec, q, qweight, scales, zeros = _linear(rng, bits, group, sym, k, layout)
    m = 5 if rows is None else rows
    x = rng.standard_normal((m, k)).astype(np.float16)
    idx = np.sort(rng.choice(k, n_outliers, replace=False)).astype(np.int32)
    w_out = rng.standard_normal((spec.n, n_outliers)).astype(np.float16)
    ex = tvm.compile(tvm.IRModule({"main": quant_matmul_func(spec, rows, n_outliers)}), target="llvm")
    args = [x, qweight, scales] + ([] if sym else [zeros]) + ([x[:, idx], w_out] if n_outliers else [])
    y = tvm.runtime.empty((m, spec.n), "float16", tvm.cpu())
    ex["main"](*[tvm.runtime.tensor(a) for a in args], y)
    ref = quant_matmul_np(spec, x, qweight, scales, zeros, idx, w_out)
    # fp16 scale products and the fp16 output round at ~1e-3 relative
    np.testing.assert_allclose(y.numpy().astype(np.float32), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


@pytest.mark.parametrize("bits,group,sym,k,layout", CASES[:4] + CASES[-4:])
@pytest.mark.parametrize("rows", [1, None])
def test_cpu_schedule_keeps_results(bits, group, sym, k, layout, rows):
    """The hand-written CPU schedule (GEMV for one row, tiled GEMM for many) computes the same numbers."""
    import tvm
    from tvm.s_tir import dlight as dl
    from edgequant.tvm_schedules.dequant import quant_matmul_func, quant_matmul_np
    from edgequant.tvm_schedules.rules import cpu_rules
    rng = np.random.default_rng(bits + k)
    spec, q, qweight, scales, zeros = _linear(rng, bits, group, sym, k, layout, n=96)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    mod = tvm.IRModule({"main": quant_matmul_func(spec, rows).with_attr("target", target)})
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
    assert mod["main"].attrs.get("tirx.is_scheduled"), "the CPU rule did not schedule the kernel"
    m = 1 if rows else 7
    x = rng.standard_normal((m, k)).astype(np.float16)
    ex = tvm.compile(mod, target=target)
    y = tvm.runtime.empty((m, spec.n), "float16", tvm.cpu())
    ex["main"](*[tvm.runtime.tensor(a) for a in [x, qweight, scales] + ([] if sym else [zeros])], y)
    ref = quant_matmul_np(spec, x, qweight, scales, zeros)
    np.testing.assert_allclose(y.numpy().astype(np.float32), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


@pytest.mark.parametrize("layout", ["planes3", "bytes3"])
def test_3bit_planes_round_trip_and_size(layout):
    """Repacking the checkpoint's 3-bit words into bit or byte planes loses nothing and stores exactly 3 bits per
    weight."""
    from edgequant.tvm_schedules.dequant import QuantSpec, repack_bytes3_np, repack_planes3_np, unpack_np
    repack = {"planes3": repack_planes3_np, "bytes3": repack_bytes3_np}[layout]
    rng = np.random.default_rng(0)
    for k in (1, 7, 8, 31, 33, 576, 1536):
        q = rng.integers(0, 8, (6, k))
        planes = repack(pack(q, 3), k)
        assert planes.shape == (6, QuantSpec(6, k, 3, -1, False, layout).words)
        np.testing.assert_array_equal(unpack_np(planes, 3, k, layout), q)
    assert repack(pack(rng.integers(0, 8, (1, 1536)), 3), 1536).nbytes * 8 == 3 * 1536
    with pytest.raises(ValueError, match="4-bit"):
        QuantSpec(4, 64, 4, 32, False, layout)


@pytest.mark.parametrize("bits,group,k", [(4, 32, 96), (3, 32, 100), (2, 48, 72)])
def test_packed_zero_points_keep_results(bits, group, k):
    """Zero points four per uint32 word (OpenCL/WebGPU exports): the round trip is exact and the fused kernel
    computes what it computes with one uint8 per group."""
    import tvm
    from edgequant.tvm_schedules.dequant import (QuantSpec, pack_zeros_np, quant_matmul_func, quant_matmul_np,
                                                 unpack_zeros_np)
    rng = np.random.default_rng(k)
    spec, q, qweight, scales, zeros = _linear(rng, bits, group, False, k)
    packed = pack_zeros_np(zeros)
    pspec = QuantSpec(spec.n, k, bits, group, False, zeros_packed=True)
    assert packed.shape == pspec.param_shapes()["zeros"][0] and packed.dtype == np.uint32
    np.testing.assert_array_equal(unpack_zeros_np(packed, spec.n_groups), zeros)
    x = rng.standard_normal((3, k)).astype(np.float16)
    ex = tvm.compile(tvm.IRModule({"main": quant_matmul_func(pspec, 3)}), target="llvm")
    y = tvm.runtime.empty((3, spec.n), "float16", tvm.cpu())
    ex["main"](*[tvm.runtime.tensor(a) for a in (x, qweight, scales, packed)], y)
    ref = quant_matmul_np(spec, x, qweight, scales, zeros)
    np.testing.assert_array_equal(quant_matmul_np(pspec, x, qweight, scales, packed), ref)
    np.testing.assert_allclose(y.numpy().astype(np.float32), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_cpu_parallel_rule_runs_prompt_rows_on_the_pool():
    """Kernels with a prompt-length loop (rms norm: a reduction per row; silu * up: elementwise) get that loop
    parallel and keep their results; the same kernels for one static row (decode) stay serial."""
    import tvm
    from tvm import te, topi
    from tvm.s_tir import dlight as dl
    from edgequant.tvm_schedules.rules import cpu_rules

    def kernels(m):
        x = te.placeholder((1, m, 64), "float32", name="x")
        w = te.placeholder((64,), "float32", name="w")
        u = te.placeholder((1, m, 128), "float32", name="u")
        act = te.compute((1, m, 64), lambda i, j, k: te.sigmoid(u[i, j, k]) * u[i, j, k] * u[i, j, k + 64])
        return {"norm": te.create_prim_func([x, w, topi.nn.rms_norm(x, w, axis=[2], epsilon=1e-5)]),
                "act": te.create_prim_func([u, act])}

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    rng = np.random.default_rng(0)
    for name, m in (("norm", tvm.tirx.Var("m", "int64")), ("act", tvm.tirx.Var("m", "int64")), ("norm", 1)):
        mod = tvm.IRModule({"main": kernels(m)[name].with_attr("target", target)})
        with target:
            mod = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
        lib = tvm.tirx.build(mod, target=target)
        parallel = "TVMBackendParallelLaunch" in lib.inspect_source("asm")
        assert parallel == (not isinstance(m, int)), (name, m)
        rows = 5 if not isinstance(m, int) else 1
        if name == "norm":
            x, w = rng.standard_normal((1, rows, 64)).astype(np.float32), rng.standard_normal(64).astype(np.float32)
            ref = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w
            args = [x, w]
        else:
            u = rng.standard_normal((1, rows, 128)).astype(np.float32)
            ref = u[..., :64] / (1 + np.exp(-u[..., :64])) * u[..., 64:]
            args = [u]
        out = tvm.runtime.empty(ref.shape, "float32", tvm.cpu())
        lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
