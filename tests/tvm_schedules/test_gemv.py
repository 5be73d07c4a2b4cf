"""The CUDA decode GEMV (`tvm_schedules/gemv.py`): its CPU twin (the same loop body and bit tricks, thread loops run
serially) compiled for llvm against NumPy, the 3-bit words3x32 layout, and the CUDA source it emits. The GPU run of
the same kernels against a torch reference is `benchmarks/gpu_decode.py run` (results under benchmarks/results)."""
import numpy as np
import pytest

from edgequant.pack import pack

pytestmark = pytest.mark.tvm

CASES = [  # bits, group, sym, N, K, rows, warps, steps, outlier columns: double-buffered steps (2 to 4 per block,
    # a last block with fewer steps), idle threads, per channel, symmetric, fp16 outlier columns
    (4, 128, False, 32, 512, 2, 1, 4, 0), (4, 32, True, 8, 96, 4, 1, 1, 3), (4, -1, False, 28, 256, 4, 3, 3, 0),
    (2, 64, False, 16, 256, 2, 1, 2, 2), (2, -1, True, 8, 128, 8, 2, 1, 0),
    (3, 128, False, 20, 512, 2, 1, 4, 5), (3, -1, True, 6, 256, 2, 2, 1, 0),
]


def _linear(rng, bits, group, sym, n, k, act="fp16", layout=None):
    from conftest import random_quantized_linear
    from edgequant.tvm_schedules.gemv import LAYOUT, LAYOUT_INT8
    return random_quantized_linear(rng, bits, group, sym, n, k,
                                   layout or (LAYOUT_INT8 if act == "int8" else LAYOUT)[bits])

@pytest.mark.parametrize("bits,group,sym,n,k,rows,warps,steps,n_out", CASES)
def test_gemv_cpu_twin_matches_numpy(bits, group, sym, n, k, rows, warps, steps, n_out):
    import tvm
    from edgequant.tvm_schedules.dequant import quant_matmul_np
    from edgequant.tvm_schedules.gemv import GemvConfig, gemv_func
    rng = np.random.default_rng(bits * 31 + k)
    spec, q, qweight, scales, zeros = _linear(rng, bits, group, sym, n, k)
    # activations with a 100x outlier channel: the folded zero point and mantissa terms must not lose it
    x = rng.standard_normal((1, k)).astype(np.float16)
    x[0, 3] = 100
    ex = tvm.compile(tvm.IRModule({"main": gemv_func(spec, GemvConfig(rows, warps, steps), gpu=False,
                                                     out_dtype="float32", n_outliers=n_out)}), target="llvm")
    y = tvm.runtime.empty((1, n), "float32", tvm.cpu())
    idx = rng.choice(k, n_out, replace=False).astype(np.int32)
    wout = rng.standard_normal((n, n_out)).astype(np.float16)
    args = [x, qweight, scales] + ([] if sym else [zeros]) + ([idx, wout] if n_out else [])
    ex["main"](*[tvm.runtime.tensor(a) for a in args], y)
    ref = quant_matmul_np(spec, x, qweight, scales, zeros, idx if n_out else None, wout if n_out else None)
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=2e-5 * np.abs(x).astype(np.float32).sum())


INT8_CASES = [  # as CASES, plus K = 576 (SmolLM2: 3-bit rows not 16-byte aligned, 64-bit plane loads), loads
    # two and three steps ahead (depth 3 and 4, with short last blocks), and 2/3-bit chunks of 32 values (the
    # default: a 64-bit and a 32-bit load at 3 bits; the last column, 0 = default; 64-value chunks in LAYOUT_CASES)
    (4, 128, False, 32, 512, 2, 1, 4, 0, 2, 0), (4, 32, True, 8, 96, 4, 1, 1, 3, 2, 0),
    (4, -1, False, 28, 256, 4, 3, 3, 0, 2, 0), (2, 64, False, 16, 256, 2, 1, 2, 2, 2, 0),
    (2, -1, True, 8, 128, 8, 2, 1, 0, 2, 0), (2, 64, False, 20, 128, 2, 1, 4, 0, 4, 0),
    (3, 128, False, 20, 512, 2, 1, 4, 5, 3, 0), (3, -1, True, 6, 256, 2, 2, 1, 0, 2, 0),
    (3, 64, False, 8, 576, 4, 1, 2, 0, 2, 0), (3, 128, False, 12, 256, 2, 1, 4, 0, 4, 0),
    (4, 32, False, 8, 64, 2, 1, 2, 5, 2, 0),    # 5 outlier columns over 2 chunks: 3 per thread
    # outlier epilogue: 3 rows x 3 columns (odd: plain copies, 8 lanes per row); 40 rows per block on 32 threads
    # (one lane per row, two rounds) with a short last block (16-byte pieces past row N not copied): CI time, slow
    (2, 64, False, 9, 128, 1, 1, 3, 3, 2, 0),
    pytest.param(4, 32, False, 72, 32, 8, 1, 5, 3, 2, 0, marks=pytest.mark.slow),
]
LAYOUT_CASES = [  # 3 bits: INT8_CASES run the CUDA export's dp4a3 (dequant.py); the previous planes3 here,
    # dp4a3 in 64-value chunks (the same chunk index math as 2 bits at 64), and dp4a3r4 (4 rows interleaved: steps
    # of 8 rows, a short last block, outlier columns; per channel, symmetric, 4 rows)
    (3, 128, False, 20, 512, 2, 1, 4, 5, 2, 0, "planes3"), (3, 64, True, 8, 256, 2, 1, 2, 0, 2, 64, "dp4a3"),
    (3, 64, False, 24, 128, 8, 1, 2, 3, 2, 0, "dp4a3r4"), (3, -1, True, 12, 128, 4, 2, 2, 0, 3, 0, "dp4a3r4")]
AHEAD_CASES = [  # GemvConfig.ahead (off in every default config): 2 or 3 steps loaded before the activations,
    # short last blocks (their later first loads guarded), outlier columns riding with the early rows (the last
    # column: ahead); CI time: one case by default
    pytest.param(4, 128, False, 28, 256, 2, 1, 3, 0, 2, 0, None, 2, marks=pytest.mark.slow),
    (2, 64, False, 20, 128, 2, 1, 4, 0, 3, 0, None, 3),
    pytest.param(3, 128, False, 20, 512, 2, 1, 4, 5, 2, 0, None, 2, marks=pytest.mark.slow)]


def _plus(case, *more):
    """A case (a tuple or a pytest.param) with more values."""
    if hasattr(case, "marks"):   # a pytest.param (itself a named tuple)
        return pytest.param(*case.values, *more, marks=case.marks)
    return case + more


GROUP_CASES = [  # GemvConfig.groups: several blocks of rows per thread block, a short last block of rows (40
    # steps of 2 rows in blocks of 3) and outlier columns (their shared copies per group), or 3 groups of 2 bits
    # (off by default, as measured: CI time, slow)
    pytest.param(4, 32, False, 80, 64, 2, 1, 3, 3, 2, 0, None, 1, 2, marks=pytest.mark.slow),
    pytest.param(2, 64, False, 48, 128, 4, 1, 2, 0, 2, 0, None, 1, 3, marks=pytest.mark.slow)]


@pytest.mark.parametrize("bits,group,sym,n,k,rows,warps,steps,n_out,depth,chunk,layout,ahead,groups",
                         [_plus(c, None, 1, 1) for c in INT8_CASES] + [c + (1, 1) for c in LAYOUT_CASES]
                         + [_plus(c, 1) for c in AHEAD_CASES] + GROUP_CASES)
def test_gemv_int8_cpu_twin_matches_numpy(bits, group, sym, n, k, rows, warps, steps, n_out, depth, chunk, layout,
                                          ahead, groups):
    """int8 activations + dp4a: the twin's integer dots are exact, so it meets the int8 NumPy model to fp32
    rounding; the model itself stays within int8 activation error of the exact product."""
    import tvm
    from edgequant.tvm_schedules.cpu_int8 import int8_gemv_np
    from edgequant.tvm_schedules.dequant import quant_matmul_np
    from edgequant.tvm_schedules.gemv import GemvConfig, gemv_func
    rng = np.random.default_rng(bits * 17 + k)
    spec, q, qweight, scales, zeros = _linear(rng, bits, group, sym, n, k, act="int8", layout=layout)
    x = rng.standard_normal((1, k)).astype(np.float16)
    x[0, 3] = 100
    x[0, 40:72] = 0  # an all-zero activation block (scale 0)
    cfg = GemvConfig(rows, warps, steps, depth, chunk, ahead=ahead, groups=groups)
    ex = tvm.compile(tvm.IRModule({"main": gemv_func(spec, cfg, gpu=False,
                                                     out_dtype="float32", n_outliers=n_out, act="int8")}),
                     target="llvm")
    y = tvm.runtime.empty((1, n), "float32", tvm.cpu())
    idx = rng.choice(k, n_out, replace=False).astype(np.int32)
    wout = rng.standard_normal((n, n_out)).astype(np.float16)
    args = [x, qweight, scales] + ([] if sym else [zeros]) + ([idx, wout] if n_out else [])
    ex["main"](*[tvm.runtime.tensor(a) for a in args], y)
    model = int8_gemv_np(spec, x[0], qweight, scales, zeros)[None]
    if n_out:
        model = model + x[:, idx].astype(np.float32) @ wout.astype(np.float32).T
    np.testing.assert_allclose(y.numpy(), model, rtol=1e-5, atol=1e-5 * np.abs(model).max())
    exact = quant_matmul_np(spec, x, qweight, scales, zeros, idx if n_out else None, wout if n_out else None)
    w = np.abs(scales.astype(np.float32)).max() * (1 << bits)       # the largest |weight|
    block_max = np.abs(x.astype(np.float32)).reshape(-1, 32).max(axis=1)  # each value moves <= its block max / 254
    assert 0 < np.abs(model - exact).max() < w * 32 * block_max.sum() / 254


def test_words3x32_round_trip_and_kernel_reference():
    from edgequant.tvm_schedules.dequant import QuantSpec, dequantize_np, repack_w3x32_np, unpack_np
    rng = np.random.default_rng(5)
    for k in (32, 100, 300):  # whole and ragged 32-value blocks
        q = rng.integers(0, 8, (5, k))
        words = repack_w3x32_np(pack(q, 3), k)
        spec = QuantSpec(5, k, 3, 32, True, "words3x32")
        assert words.shape == (5, spec.words) and spec.words == 3 * -(-k // 32)
        np.testing.assert_array_equal(unpack_np(words, 3, k, "words3x32"), q)
        np.testing.assert_array_equal(dequantize_np(spec, words, np.ones((5, spec.n_groups), np.float16)), q - 4)


def test_dp4a3_round_trip_bit_positions_and_weight_te():
    """dp4a3 (dequant.py): repack and unpack round trip (whole and ragged blocks), the documented bit of a value in
    each part of a block, and the TE weight expression (the dlight/prefill path) against the NumPy dequantization."""
    from edgequant.tvm_schedules.dequant import QuantSpec, repack_dp4a3_np, unpack_np
    rng = np.random.default_rng(11)
    for k in (32, 100, 256):
        q = rng.integers(0, 8, (3, k))
        words = repack_dp4a3_np(pack(q, 3), k)
        assert words.shape == (3, QuantSpec(3, k, 3, 32, True, "dp4a3").words)
        np.testing.assert_array_equal(unpack_np(words, 3, k, "dp4a3"), q)
    one = np.zeros((1, 32), np.int64)
    for v, code, want in ((4, 5, (5 << 3, 0, 0)), (17, 7, (0, 0, 7 << 8)), (29, 7, (0, 3 << 14, 1 << 15))):
        one[:] = 0
        one[0, v] = code
        np.testing.assert_array_equal(repack_dp4a3_np(pack(one, 3), 32)[0], np.array(want, np.uint32))
    _check_weight_te(QuantSpec(4, 100, 3, 32, False, "dp4a3"), repack_dp4a3_np, rng)


def test_dp4a3r4_round_trip_interleave_and_weight_te():
    """dp4a3r4 (dequant.py): dp4a3's three words per 32 values with 4 rows interleaved (block b of row 4m + r at words
    12b + 3r of the rows' span), round trip on whole and ragged blocks, N not a multiple of 4 refused, and the TE
    weight expression (the dlight/prefill path and the embedding gather) against the NumPy dequantization."""
    from edgequant.tvm_schedules.dequant import (QuantSpec, layout_for_rows, repack_dp4a3_np, repack_dp4a3r4_np,
                                                 unpack_np)
    rng = np.random.default_rng(12)
    for k in (32, 100, 256):
        q = rng.integers(0, 8, (8, k))
        words, rows = repack_dp4a3r4_np(pack(q, 3), k), repack_dp4a3_np(pack(q, 3), k)
        assert words.shape == rows.shape == (8, QuantSpec(8, k, 3, 32, True, "dp4a3r4").words)
        np.testing.assert_array_equal(unpack_np(words, 3, k, "dp4a3r4"), q)
        b = rows.shape[1] // 3   # row n's (w0, w1, w2) of block j, as dp4a3 stores them
        flat = words.reshape(2, -1)
        for n, j in ((0, 0), (5, b - 1), (7, b // 2)):
            np.testing.assert_array_equal(flat[n // 4, 12 * j + 3 * (n % 4):12 * j + 3 * (n % 4) + 3],
                                          [rows[n, 2 * j], rows[n, 2 * j + 1], rows[n, 2 * b + j]])
    with pytest.raises(ValueError, match="multiple"):
        QuantSpec(6, 64, 3, 32, True, "dp4a3r4")
    # what an export asking for dp4a3r4 stores: dp4a3 (one row at a time) where N is not a multiple of 4
    assert [layout_for_rows(lay, n) for lay, n in (("dp4a3r4", 8), ("dp4a3r4", 6), ("bytes3", 6))] == [
        "dp4a3r4", "dp4a3", "bytes3"]
    _check_weight_te(QuantSpec(8, 100, 3, 32, False, "dp4a3r4"), repack_dp4a3r4_np, rng)


def _check_weight_te(spec, repack, rng):
    """The TE weight expression of `spec`'s layout (the dlight/prefill path and the embedding gather), compiled for
    the CPU, against the NumPy dequantization of random 3-bit codes repacked by `repack`."""
    import tvm
    from tvm import te
    from edgequant.tvm_schedules.dequant import dequantize_np, weight_te
    n, k = spec.n, spec.k
    words = repack(pack(rng.integers(0, 8, (n, k)), 3), k)
    scales = (rng.random((n, spec.n_groups)) + 0.5).astype(np.float16)
    zeros = rng.integers(0, 8, (n, spec.n_groups)).astype(np.uint8)
    qw = te.placeholder((n, spec.words), "uint32")
    sc = te.placeholder((n, spec.n_groups), "float16")
    zr = te.placeholder((n, spec.n_groups), "uint8")
    w = te.compute((n, k), lambda i, j: weight_te(spec, qw, sc, zr, i, j))
    f = tvm.compile(te.create_prim_func([qw, sc, zr, w]), target="llvm")
    out = tvm.runtime.empty((n, k), "float16", tvm.cpu())
    f(*[tvm.runtime.tensor(a) for a in (words, scales, zeros)], out)
    np.testing.assert_allclose(out.numpy().astype(np.float32), dequantize_np(spec, words, scales, zeros),
                               rtol=1e-3, atol=1e-3)


def test_hostile_outlier_index_is_clamped():
    """An outlier index outside [0, K) reads the nearest edge column, never memory outside x."""
    import tvm
    from edgequant.tvm_schedules.dequant import quant_matmul_np
    from edgequant.tvm_schedules.gemv import GemvConfig, gemv_func
    rng = np.random.default_rng(3)
    spec, q, qweight, scales, zeros = _linear(rng, 4, 32, False, 8, 64)
    x = rng.standard_normal((1, 64)).astype(np.float16)
    ex = tvm.compile(tvm.IRModule({"main": gemv_func(spec, GemvConfig(2, 1), gpu=False, out_dtype="float32",
                                                     n_outliers=2)}), target="llvm")
    wout = rng.standard_normal((8, 2)).astype(np.float16)
    y = tvm.runtime.empty((1, 8), "float32", tvm.cpu())
    ex["main"](*[tvm.runtime.tensor(a) for a in (x, qweight, scales, zeros, np.array([-7, 10**6], np.int32), wout)],
               y)
    ref = quant_matmul_np(spec, x, qweight, scales, zeros, np.array([0, 63]), wout)
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=1e-3)


def test_supports_and_default_config():
    from edgequant.tvm_schedules.dequant import QuantSpec
    from edgequant.tvm_schedules.gemv import CHUNK, default_config, supports
    assert supports(QuantSpec(4096, 4096, 4, 128, False))
    assert supports(QuantSpec(4096, 11008, 3, 128, False, "words3x32"))
    assert not supports(QuantSpec(4096, 4096, 3, 128, False))              # the checkpoint's 10-per-word words
    assert not supports(QuantSpec(64, 100, 4, 32, False))                   # K not whole chunks
    assert not supports(QuantSpec(64, 256, 2, 32, False))                   # a 64-value chunk would span groups
    for spec in (QuantSpec(4096, 11008, 4, 128, False), QuantSpec(22016, 4096, 3, 128, False, "words3x32"),
                 QuantSpec(576, 576, 2, 64, False)):
        c = default_config(spec)
        assert c.warps * 32 >= spec.k // CHUNK[spec.bits] > (c.warps - 1) * 32   # one chunk per thread
        assert spec.n % c.rows == 0
    # int8: LLaMA-7B gate_up at 2 and 3 bits in one wave of 6 blocks per SM (7 steps: 787 blocks on 132 SMs; with
    # outlier columns 14 steps of 2 rows), at 4 bits and where 4 steps already fit one wave (qkv) 4 steps, and
    # where one wave would take more than 8 steps (28672 rows) too
    for bits, layout in ((2, "words"), (3, "dp4a3")):
        gu = default_config(QuantSpec(22016, 4096, bits, 128, False, layout), act="int8")
        assert (gu.rows, gu.steps) == (4, 7) and 5.5 * 132 < -(-22016 // 28) <= 6 * 132
        # OWQ's outlier columns (epilogue, no registers in the steps) run W3's grid
        assert default_config(QuantSpec(22016, 4096, bits, 128, False, layout), act="int8", n_outliers=26) == gu
        assert default_config(QuantSpec(12288, 4096, bits, 128, False, layout), act="int8").steps == 4
        assert default_config(QuantSpec(28672, 4096, bits, 128, False, layout), act="int8").steps == 4
    assert default_config(QuantSpec(22016, 4096, 4, 128, False), act="int8").steps == 4
    # o (N = K = 4096): 8 rows x 1 step at 2 and 3 bits, 4 x 2 at 4 bits; down (11 warps) keeps 4 x 4
    for bits, layout, rs in ((2, "words", (8, 1)), (3, "dp4a3", (8, 1)), (4, "words", (4, 2))):
        o = default_config(QuantSpec(4096, 4096, bits, 128, False, layout), act="int8")
        assert (o.rows, o.steps) == rs
        owq = default_config(QuantSpec(4096, 4096, bits, 128, False, layout), act="int8", n_outliers=26)
        assert (owq.rows, owq.steps) == (4, 2)
        d = default_config(QuantSpec(4096, 11008, bits, 128, False, layout), act="int8")
        assert (d.rows, d.steps) == (4, 4)


@pytest.mark.parametrize("bits,act", [(4, "fp16"), (3, "fp16"), (2, "fp16"), (4, "int8"), (3, "int8"), (2, "int8")])
def test_cuda_source_streams_128_bit_loads(bits, act):
    """The CUDA C the export ships: 128-bit weight loads (64-bit at 3 bits with fp16 activations; with int8 ones
    a 32-value chunk: 64-bit at 2 bits, a 64-bit plane-word load and a 32-bit bit-plane load at 3 bits), shuffles,
    no integer-to-float conversion per weight, and one dp4a per 4 weights with int8 activations."""
    import re

    import tvm
    from edgequant.export.targets import PRESETS
    from edgequant.tvm_schedules.dequant import QuantSpec
    from edgequant.tvm_schedules.gemv import LAYOUT, LAYOUT_INT8, GemvConfig, chunk_of, gemv_func, warps_for
    layout = (LAYOUT_INT8 if act == "int8" else LAYOUT)[bits]
    spec = QuantSpec(256, 512, bits, 128 if bits != 2 else 64, False, layout)
    cfg = GemvConfig(4, warps_for(spec, act), 2)
    ex = tvm.compile(tvm.IRModule({"main": gemv_func(spec, cfg, act=act)}),
                     target={**PRESETS["cuda"].target, "arch": "sm_90"})
    src = next(m.inspect_source() for m in _walk(ex.mod) if m.kind == "cuda")
    body = src[src.index("main_kernel("):]
    vecs = ["uint4"] if bits == 4 else ["uint2"] if act == "int8" or bits == 3 else ["uint4"]
    for vec in vecs:
        assert re.search(rf"\*\({vec}\*\)\(wq_ptr \+ \d+\) = \*\({vec}\*\)\(qweight_ptr", body)
    assert "__shfl_down_sync" in body
    assert "(float)wq_ptr" not in body and "__uint2float" not in body
    if act == "int8":  # one dp4a per 4 weights of each of the 2 steps x 4 rows of a thread's chunk
        assert body.count("__dp4a(") == 2 * 4 * chunk_of(bits, act) // 4
        if bits == 3:  # the chunk's bit-plane word: one 32-bit load per row and step
            assert len(re.findall(r"wq_ptr\[\d+\] = qweight_ptr\[", body)) == 2 * 4
    else:
        assert "__shfl_sync" in body


def test_cuda_source_waits_for_the_previous_kernel_after_the_first_weight_loads():
    """pdl=True: this kernel waits for the previous one after issuing its first weight loads and before reading x
    (so every read of activations and every write comes after it), and lets the next one launch before its last
    step; min_blocks caps the registers through __launch_bounds__."""
    import re

    import tvm
    from edgequant.export.targets import PRESETS
    from edgequant.tvm_schedules.dequant import QuantSpec
    from edgequant.tvm_schedules.gemv import GemvConfig, gemv_func
    spec = QuantSpec(256, 512, 3, 128, False, "planes3")
    ex = tvm.compile(tvm.IRModule({"main": gemv_func(spec, GemvConfig(4, 1, 2, min_blocks=8, prefetch=True), act="int8",
                                                           pdl=True)}),
                     target={**PRESETS["cuda"].target, "arch": "sm_90"})
    src = next(m.inspect_source() for m in _walk(ex.mod) if m.kind == "cuda")
    body = src[src.index("main_kernel("):]
    body = body[body.index(") {"):]                     # the definition, past the parameter list

    def first(pattern):
        return re.search(pattern, body).start()
    trigger, wait = first(r"cudaTriggerProgrammaticLaunchCompletion\(\)"), first(r"cudaGridDependencySynchronize\(\)")
    assert first(r"\bqweight_ptr\b") < wait < first(r"\bx_ptr\b") < first(r"__dp4a") < trigger < first(r"\by_ptr\b")
    # the block's L2 prefetches (weights, scales, zeros) go out first, before the wait and the first register loads
    pf = [m.start() for m in re.finditer(r"prefetch_L2_global\(\(&\((\w+)_ptr", body)]
    assert len(pf) == 3 and max(pf) < first(r"wq_ptr \+ 0\) = ") < wait
    assert body.rindex("__dp4a") > trigger    # the last step's math comes after the trigger
    assert "__launch_bounds__(32, 8)" in src


def test_cuda_source_loads_ahead_and_asks_l2_before_the_wait():
    """ahead=2: both buffers' weight rows load before the wait (none in the first step), and l2ahead=1: each thread
    asks L2 for the third step's weights, scales and zeros before the wait, nothing after it; a config asking for
    more steps ahead than buffers is refused."""
    import re

    import tvm
    from edgequant.export.targets import PRESETS
    from edgequant.tvm_schedules.dequant import QuantSpec
    from edgequant.tvm_schedules.gemv import GemvConfig, gemv_func
    spec = QuantSpec(256, 512, 4, 128, False, "words")
    cfg = GemvConfig(4, 1, 4, ahead=2, l2ahead=1)
    ex = tvm.compile(tvm.IRModule({"main": gemv_func(spec, cfg, act="int8", pdl=True)}),
                     target={**PRESETS["cuda"].target, "arch": "sm_90"})
    src = next(m.inspect_source() for m in _walk(ex.mod) if m.kind == "cuda")
    body = src[src.index("main_kernel("):]
    body = body[body.index(") {"):]
    wait, x = body.index("cudaGridDependencySynchronize()"), re.search(r"\bx_ptr\b", body).start()
    loads = [m.start() for m in re.finditer(r"\*\(uint4\*\)\(wq_ptr \+ \d+\) = ", body)]
    assert len(loads) == 4 * 4 and sum(a < wait for a in loads) == 2 * 4   # 4 steps x 4 rows, 2 steps before
    assert min(a for a in loads if a > wait) > body.index("__dp4a")         # step 2's rows load in step 1
    pf = [m.start() for m in re.finditer(r"prefetch_global_L2\(\(&\((\w+)_ptr", body)]
    assert len(pf) == 4 * 3 and max(pf) < wait < x                       # 4 rows x (weights, scale, zero point)
    with pytest.raises(ValueError, match="bad GEMV config"):
        GemvConfig(4, 1, 4, depth=2, ahead=3)


@pytest.mark.parametrize("prologue,residual", [("rmsnorm", True), ("silu_mul", False)])
def test_cuda_source_with_a_prologue_reads_activations_after_the_wait(prologue, residual):
    """pdl=True with the decode fusions the export builds: the RMSNorm's sum of squares, SiLU(gate) * up and the
    residual read the previous kernel's outputs, so every read of x and of the residual comes after the wait (the
    first weight loads before it)."""
    import re

    import tvm
    from edgequant.export.targets import PRESETS
    from edgequant.tvm_schedules.dequant import QuantSpec
    from edgequant.tvm_schedules.gemv import gemv_func
    spec = QuantSpec(64, 256, 4, 32, False, "words")
    f = gemv_func(spec, act="int8", prologue=prologue, residual=residual, pdl=True)
    ex = tvm.compile(tvm.IRModule({"main": f}), target={**PRESETS["cuda"].target, "arch": "sm_90"})
    src = next(m.inspect_source() for m in _walk(ex.mod) if m.kind == "cuda")
    body = src[src.index("main_kernel("):]
    body = body[body.index(") {"):]
    wait = body.index("cudaGridDependencySynchronize()")
    assert body.index("qweight_ptr") < wait < min(m.start() for m in re.finditer(r"\bx_ptr\b", body))
    if residual:
        assert wait < body.index("res_ptr")


@pytest.mark.parametrize("n,k,bits,group,sym,layout,rows,warps,steps", [
    (64, 11008, 4, 128, False, "words", 4, 11, 4),       # LLaMA-7B down: 11 warps for 16 rows, 172-byte scale rows
    (160, 4096, 3, 128, False, "dp4a3", 4, 4, 4), (100, 512, 2, 64, True, "words", 4, 4, 3),   # ragged last block
    (36, 256, 4, 32, False, "words", 2, 3, 3), (40, 4096, 4, 128, False, "words", 4, 8, 1),   # more warps than rows
])
def test_prefetch_spans_cover_each_block_once(n, k, bits, group, sym, layout, rows, warps, steps):
    """The L2 prefetch's index math (the expressions the kernel is built from): each block's warps ask for exactly
    the block's weight rows, each byte once, inside the tensor; scales and zeros of the block's rows up to a
    16-byte boundary; every address 16-byte aligned and every size a multiple of 16."""
    from edgequant.tvm_schedules.dequant import QuantSpec
    from edgequant.tvm_schedules.gemv import GemvConfig, prefetch_plan, prefetch_spans
    spec, cfg = QuantSpec(n, k, bits, group, sym, layout), GemvConfig(rows, warps, steps, prefetch=True)
    rs, plan = rows * steps, prefetch_plan(spec, cfg)
    size = {"qweight": spec.words * 4, "scales": spec.n_groups * 2, "zeros": 0 if sym else spec.n_groups}
    assert plan["qweight"] == size["qweight"] and (plan["zeros"] == 0) == sym
    seen = {t: np.zeros(n * b, bool) for t, b in size.items()}
    for bx in range(-(-n // rs)):
        rows_here = min(rs, n - bx * rs)
        for t, spans in prefetch_spans(spec, cfg, bx).items():
            for off, nbytes in spans:
                assert off % 16 == 0 and nbytes % 16 == 0 and nbytes > 0
                assert bx * rs * size[t] <= off and off + nbytes <= (bx * rs + rows_here) * size[t]
                assert not seen[t][off:off + nbytes].any()
                seen[t][off:off + nbytes] = True
            if t == "qweight":   # the whole block, nothing else
                assert sum(b for _, b in spans) == rows_here * size[t]
            elif plan[t]:        # the block's rows, rounded down to 16 bytes
                assert sum(b for _, b in spans) == rows_here * size[t] // 16 * 16
    assert seen["qweight"].all()
    odd = QuantSpec(8, 40, 4, -1, False, "words")   # 20-byte rows: slices not 16-byte aligned, nothing prefetched
    assert not any(prefetch_spans(odd, GemvConfig(1, 1, 1, prefetch=True), 1).values())
    assert prefetch_plan(spec, GemvConfig(rows, warps, steps, prefetch=False))["qweight"] == 0


@pytest.mark.parametrize("rows", [2, 4, 8, 32])
def test_transposed_warp_reduction_sums_each_row(rows):
    """The transposed warp reduction's exchanges (gemv.xreduce_stages), simulated over 32 lanes as the kernel runs
    them (select, shuffle by lane XOR offset, add; then shuffle-down adds): lane tx % (32 / rows) == 0 ends with
    the sum over all lanes of row tx // (32 / rows)."""
    from edgequant.tvm_schedules.gemv import xreduce_stages
    rng = np.random.default_rng(rows)
    acc = rng.standard_normal((32, rows))        # [lane, row] partial sums
    want = acc.sum(axis=0)
    lane = np.arange(32)
    for off, h in xreduce_stages(rows):
        hi = (lane & off) != 0
        keep = np.where(hi[:, None], acc[:, h:2 * h], acc[:, :h])
        send = np.where(hi[:, None], acc[:, :h], acc[:, h:2 * h])
        acc = acc.copy()
        acc[:, :h] = keep + send[lane ^ off]
    lanes = 32 // rows
    v = acc[:, 0].copy()
    for off in (16, 8, 4, 2, 1):
        if off < lanes:   # shuffle-down: lanes past the end read their own value, as __shfl_down_sync
            v = v + v[np.where(lane + off < 32, lane + off, lane)]
    for tx in range(0, 32, lanes):
        assert np.isclose(v[tx], want[tx // lanes])
    assert sum(h for _, h in xreduce_stages(rows)) == rows - 1


def _walk(m):
    yield m
    for i in m.imports:
        yield from _walk(i)


@pytest.mark.parametrize("bits,group,n,k,rows,warps,steps,act,prologue,residual", [
    (4, 32, 16, 256, 2, 1, 2, "int8", "rmsnorm", False), (4, 128, 12, 576, 4, 1, 3, "int8", "silu_mul", True),
    (4, -1, 8, 128, 2, 2, 1, "fp16", "rmsnorm", True), (3, 64, 8, 256, 2, 1, 2, "int8", "rmsnorm", True),
    (2, 64, 8, 128, 4, 1, 2, "fp16", "silu_mul", False), (4, 32, 8, 96, 4, 1, 1, "int8", None, True),
])
def test_gemv_decode_fusions_match_numpy(bits, group, n, k, rows, warps, steps, act, prologue, residual):
    """The decode fusions (RMSNorm or SiLU(gate) * up on load, the residual added to the output) in the twin equal
    the separate ops in NumPy followed by the plain GEMV's model, up to the fp16 rounding of the prologue's output."""
    import tvm
    from edgequant.tvm_schedules.cpu_int8 import int8_gemv_np
    from edgequant.tvm_schedules.dequant import quant_matmul_np
    from edgequant.tvm_schedules.gemv import GemvConfig, gemv_func
    rng = np.random.default_rng(bits * 7 + k)
    spec, q, qweight, scales, zeros = _linear(rng, bits, group, False, n, k, act=act)
    x = (rng.standard_normal((1, 2 * k if prologue == "silu_mul" else k)) * 3).astype(np.float16)
    x[0, 3] = 40
    nw = (rng.random(k) + 0.5).astype(np.float16)
    res = rng.standard_normal((1, n)).astype(np.float16)
    eps = 1e-5
    if prologue == "rmsnorm":
        xf = x.astype(np.float32)
        xp = ((1 / np.sqrt((xf * xf).mean() + eps)) * xf * nw.astype(np.float32)).astype(np.float16)
    elif prologue == "silu_mul":
        g, u = x[:, :k].astype(np.float32), x[:, k:].astype(np.float32)
        xp = (g / (1 + np.exp(-g)) * u).astype(np.float16)
    else:
        xp = x
    f = gemv_func(spec, GemvConfig(rows, warps, steps), gpu=False, act=act, prologue=prologue, eps=eps,
                  residual=residual)
    ex = tvm.compile(tvm.IRModule({"main": f}), target="llvm")
    y = tvm.runtime.empty((1, n), "float16", tvm.cpu())
    args = [x] + ([nw] if prologue == "rmsnorm" else []) + [qweight, scales, zeros] + ([res] if residual else [])
    ex["main"](*[tvm.runtime.tensor(a) for a in args], y)
    if act == "int8":
        model = int8_gemv_np(spec, xp[0], qweight, scales, zeros)[None]
    else:
        model = quant_matmul_np(spec, xp, qweight, scales, zeros, None, None)
    want = model.astype(np.float16) + (res if residual else 0)
    # the prologue's fp16 rounding may differ by one unit on a few values (fp16 exp and rsqrt vs NumPy's)
    tol = 2e-3 * np.abs(model).max() + (np.abs(xp.astype(np.float32)).sum() * 2e-3 * np.abs(scales).max() * (1 << bits)
                                        if prologue else 0)
    np.testing.assert_allclose(y.numpy().astype(np.float32), want.astype(np.float32), rtol=0, atol=tol)
    if residual:   # the residual really was added (not a test that passes on zeros)
        assert np.abs(y.numpy().astype(np.float32) - model).max() > 0.5 * np.abs(res).max()


@pytest.mark.parametrize("n,n_out,rows,threads,piece,lanes", [
    (12288, 26, 16, 128, 8, 8), (22016, 26, 28, 128, 8, 4), (4096, 69, 16, 352, 8, 16),   # LLaMA-7B qkv, gate_up, down
    (72, 3, 40, 32, 8, 1), (9, 3, 3, 32, 1, 8), (20, 5, 8, 32, 4, 4)])
def test_outlier_plan_pieces_and_lanes(n, n_out, rows, threads, piece, lanes):
    """The epilogue's copy: pieces of one cp.async width (16, 8 or 4 bytes, else single halves) tile each block's
    span of W_out exactly and never straddle its end; its lanes: a power of 2 <= 32 per row, the block's rows
    within its threads where it has enough."""
    from edgequant.tvm_schedules.gemv import outlier_plan
    plan = outlier_plan(n, n_out, rows, threads)
    assert (plan["piece"], plan["lanes"]) == (piece, lanes)
    assert plan["pieces"] * piece == rows * n_out and n * n_out % piece == 0
    assert rows * lanes <= threads or lanes == 1


@pytest.mark.parametrize("steps", [1, 2])
def test_cuda_source_owq_epilogue(steps):
    """W3 + OWQ as exported for sm_90: the outlier weights reach shared memory by cp.async before the wait (never
    a register load in the steps), x at the outlier columns is gathered after it, and the products are added after
    a barrier of their own, reduced by shuffles and written with the row. One step: that barrier is the final one
    (one in all); more steps: it comes before the last step's dot products (two in all), whose loads are in
    flight."""
    import re

    import tvm
    from edgequant.export.targets import PRESETS
    from edgequant.tvm_schedules.dequant import QuantSpec
    from edgequant.tvm_schedules.gemv import GemvConfig, gemv_func
    spec = QuantSpec(512, 1024, 3, 128, False, "dp4a3")
    ex = tvm.compile(tvm.IRModule({"main": gemv_func(spec, GemvConfig(4, 1, steps), n_outliers=8, act="int8",
                                                     pdl=True)}),
                     target={**PRESETS["cuda"].target, "arch": "sm_90"})
    src = next(m.inspect_source() for m in _walk(ex.mod) if m.kind == "cuda")
    body = src[src.index("main_kernel("):]
    body = body[body.index(") {"):]
    wait = body.index("cudaGridDependencySynchronize()")
    ow = [m.start() for m in re.finditer(r"\bow_ptr\b", body)]
    assert ow and all("cp_async_cg" in body[body.rindex("\n", 0, i):i] for i in ow) and max(ow) < wait
    assert body.index("oidx_ptr") < wait < body.index("x_ptr[max(min(oi_ptr")
    syncs = [m.start() for m in re.finditer(r"__syncthreads\(\)", body)]
    assert len(syncs) == steps
    assert body.index("cp_async_wait_all") < syncs[0] < body.rindex("osw_ptr") < body.index("y_ptr[")
    assert body.rindex("__shfl_down_sync") > syncs[0]
    if steps > 1:   # the products between the two barriers, before the last step's dot products
        assert body.rindex("osw_ptr") < body.rindex("__dp4a") < syncs[-1]


def test_cuda_source_groups_slice_shared_memory():
    """Groups of blocks in one thread block (threadIdx.z): 1 / groups as many blocks, each group reading its own
    rows and its own slice of every shared buffer; groups that do not divide the blocks are refused."""
    import tvm
    from edgequant.export.targets import PRESETS
    from edgequant.tvm_schedules.dequant import QuantSpec
    from edgequant.tvm_schedules.gemv import GemvConfig, gemv_func
    spec = QuantSpec(96, 1024, 3, 128, False, "dp4a3")
    cfg = GemvConfig(4, 1, 2, groups=3)   # 12 blocks of 8 rows in 4 thread blocks of 3 x 32 threads
    ex = tvm.compile(tvm.IRModule({"main": gemv_func(spec, cfg, n_outliers=8, act="int8", pdl=True)}),
                     target={**PRESETS["cuda"].target, "arch": "sm_90"})
    src = next(m.inspect_source() for m in _walk(ex.mod) if m.kind == "cuda")
    body = src[src.index("main_kernel("):]
    assert "__launch_bounds__(96)" in src and "threadIdx.z" in body
    assert "red_ptr[24]" in src and "osw_ptr[192]" in src and "oxs_ptr[24]" in src   # 8 rows x 1 warp, 8 x 8, 8; x 3
    with pytest.raises(ValueError, match="groups"):
        gemv_func(spec, GemvConfig(4, 1, 2, groups=5), act="int8")


def test_gemv_prologue_refuses_outlier_columns():
    from edgequant.tvm_schedules.dequant import QuantSpec
    from edgequant.tvm_schedules.gemv import gemv_func
    with pytest.raises(ValueError, match="outlier"):
        gemv_func(QuantSpec(8, 128, 4, 32, False, "words"), n_outliers=2, prologue="rmsnorm")


@pytest.mark.parametrize("bits,group,sym,n,k,rows,steps,layout", [
    (4, 128, False, 32, 256, 4, 2, None), (2, 64, False, 48, 128, 2, 4, None),
    (3, 64, False, 32, 128, 4, 2, "dp4a3r4")])
def test_gemv_silu_mul_epilogue_matches_numpy(bits, group, sym, n, k, rows, steps, layout):
    """epilogue="silu_mul": the block's first steps take gate rows, the rest the up rows of the same indices, and
    the output is silu(gate) * up over N / 2 (fp16, as the silu_mul prologue computes it from the rounded outputs);
    configs whose blocks would split a pair are refused."""
    import tvm
    from edgequant.tvm_schedules.cpu_int8 import int8_gemv_np
    from edgequant.tvm_schedules.gemv import GemvConfig, gemv_func
    rng = np.random.default_rng(bits * 31 + n)
    spec, q, qweight, scales, zeros = _linear(rng, bits, group, sym, n, k, act="int8", layout=layout)
    x = rng.standard_normal((1, k)).astype(np.float16)
    ex = tvm.compile(tvm.IRModule({"main": gemv_func(spec, GemvConfig(rows, 1, steps), gpu=False, act="int8",
                                                     epilogue="silu_mul")}), target="llvm")
    y = tvm.runtime.empty((1, n // 2), "float16", tvm.cpu())
    ex["main"](*[tvm.runtime.tensor(a) for a in [x, qweight, scales] + ([] if sym else [zeros])], y)
    full = int8_gemv_np(spec, x[0], qweight, scales, zeros).astype(np.float16)
    gate, up = full[:n // 2], full[n // 2:]
    want = gate * (1 / (1 + np.exp(-gate.astype(np.float32)))).astype(np.float16) * up
    np.testing.assert_allclose(y.numpy()[0].astype(np.float32), want.astype(np.float32),
                               atol=2e-3 * np.abs(want).max(), rtol=0)
    with pytest.raises(ValueError, match="whole blocks of gate/up pairs"):
        gemv_func(spec, GemvConfig(rows, 1, 3), gpu=False, act="int8", epilogue="silu_mul")
