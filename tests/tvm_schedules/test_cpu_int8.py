"""The int8 decode GEMV (tvm_schedules/cpu_int8.py): compiled for this CPU and run against its NumPy model
(int8 activations per block of 32, exact integer dots) and against the exact fp reference, at 2/4 bits (the
checkpoint's words; 2-bit lanes of two words, with a packed 2-lane tail at K = 576 and vector zero-point terms) and 3
bits (byte planes, the CPU exports' layout, and bit planes); the generated code holds the integer dot-product
instructions; the ISA choice follows the target."""
import re

import numpy as np
import pytest


pytestmark = pytest.mark.tvm

CASES = [  # bits, group, sym, N, K, layout: 256-bit (L=8) and 128-bit (L=4) chunks, per channel, ragged last group,
    # several groups per chunk (4-bit g32 and 2-bit g64 at K=1536), 3-bit byte planes: 8m + 2 lanes of 32 (the packed
    # 2-lane tail; at g32 with a scale per lane), whole chunks, a 2-lane row in 4-lane vectors; 3-bit bit planes
    (4, 128, False, 96, 576, "words"), (4, 32, False, 40, 160, "words"), (4, -1, True, 24, 64, "words"),
    (4, 128, True, 16, 1536, "words"), (4, 32, False, 16, 1536, "words"),
    (2, 64, False, 48, 576, "words"), (2, -1, True, 24, 64, "words"), (2, 128, False, 32, 256, "words"),
    (2, 64, True, 16, 1536, "words"),
    (3, 128, False, 48, 576, "bytes3"), (3, 128, True, 16, 1536, "bytes3"), (3, -1, False, 24, 64, "bytes3"),
    (3, 32, False, 16, 320, "bytes3"), (2, 64, False, 16, 320, "words"), (2, -1, False, 16, 576, "words"),
    (4, 96, False, 16, 192, "words"), (3, 128, False, 16, 320, "planes3"),
]


def _host_isas():
    import tvm
    from edgequant.tvm_schedules.cpu_int8 import target_isa
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    best = target_isa(host)
    return host, {"vnni": ["vnni", "avx2"], "avx2": ["avx2"], None: []}[best]


def _isa_or_skip(isa):
    host, isas = _host_isas()
    if isa not in isas:
        pytest.skip(f"this CPU ({host.attrs.get('mcpu')}) has no {isa} integer dot products")
    return host


def _linear(rng, bits, group, sym, n, k, layout="words"):
    from conftest import random_quantized_linear
    spec, _, qweight, scales, zeros = random_quantized_linear(rng, bits, group, sym, n, k, layout)
    return spec, qweight, scales, zeros


def test_activation_quantization_model():
    from edgequant.tvm_schedules.cpu_int8 import quantize_act_np
    x = np.random.default_rng(0).standard_normal(256).astype(np.float16)
    x[32:64] = 0  # an all-zero block: scale 0, codes 0
    a, d = quantize_act_np(x)
    assert a.dtype == np.int8 and np.abs(a).max() == 127 and d[1] == 0 and not a[32:64].any()
    err = np.abs(a.astype(np.float32) * np.repeat(d, 32) - x.astype(np.float32))
    assert (err <= np.repeat(d, 32) / 2 + 1e-7).all()


def test_activation_permutation_is_a_bijection():
    from edgequant.tvm_schedules.cpu_int8 import act_perm
    from edgequant.tvm_schedules.dequant import QuantSpec
    for bits, layout, k in ((2, "words", 576), (2, "words", 64), (2, "words", 1536), (4, "words", 576),
                            (3, "planes3", 576), (3, "bytes3", 576),
                            (3, "bytes3", 320), (3, "bytes3", 64), (3, "bytes3", 1536)):
        spec = QuantSpec(8, k, bits, 64 if bits == 2 else 128, False, layout)
        assert sorted(act_perm(spec).tolist()) == list(range(k))


@pytest.mark.parametrize("isa", ["vnni", "avx2"])
@pytest.mark.parametrize("bits,group,sym,n,k,layout", CASES)
def test_kernel_matches_numpy(isa, bits, group, sym, n, k, layout):
    import tvm
    from edgequant.tvm_schedules.cpu_int8 import int8_gemv_func, int8_gemv_np
    from edgequant.tvm_schedules.dequant import quant_matmul_np
    host = _isa_or_skip(isa)
    rng = np.random.default_rng(bits * 1000 + k + n)
    spec, qweight, scales, zeros = _linear(rng, bits, group, sym, n, k, layout)
    x = rng.standard_normal((1, k)).astype(np.float16)
    ex = tvm.compile(tvm.IRModule({"main": int8_gemv_func(spec, isa)}), target=host)
    args = [x, qweight, scales] + ([] if sym else [zeros])
    y = tvm.runtime.empty((1, n), "float32", tvm.cpu())
    ex["main"](*[tvm.runtime.tensor(a) for a in args], y)
    got = y.numpy()[0]
    model = int8_gemv_np(spec, x[0], qweight, scales, zeros)
    # same integers, same per-block products; only the fp32 summation order differs
    np.testing.assert_allclose(got, model, rtol=1e-5, atol=1e-5 * np.abs(model).max())
    exact = quant_matmul_np(spec, x, qweight, scales, zeros)[0]
    rel = np.abs(got - exact).max() / np.abs(exact).max()
    assert rel < 2e-2, rel  # int8 activations: each value within half a step of 1/127 of its block's max


GEMM_CASES = [CASES[0], CASES[3], CASES[5], CASES[8], CASES[9], CASES[12],   # W4 g128 / per-channel sym, W2 g64
              (4, 64, False, 40, 160, "words")]   # packed tail / whole chunks with two groups each, W3 tails; W4 (the
# row-lane GEMM, cpu_int8_rows.py) with a ragged last group and tiles of one block of 8 rows


@pytest.mark.parametrize("isa", ["vnni", "avx2"])
@pytest.mark.parametrize("bits,group,sym,n,k,layout", GEMM_CASES)
def test_prefill_gemm_rows_equal_the_gemv_model(isa, bits, group, sym, n, k, layout):
    """The prefill GEMM on 1, 3, 8, 9 and 17 rows (whole and padded blocks of GEMM_ROWS, one compiled function, row
    count symbolic): every row is the GEMV's NumPy model of that row."""
    import tvm
    from edgequant.tvm_schedules.cpu_int8 import int8_gemm_func
    host = _isa_or_skip(isa)
    rng = np.random.default_rng(bits * 1000 + k + n + 1)
    spec, qweight, scales, zeros = _linear(rng, bits, group, sym, n, k, layout)
    ex = tvm.compile(tvm.IRModule({"main": int8_gemm_func(spec, isa)}), target=host)
    _assert_rows_are_the_gemv_model(ex, rng, spec, qweight, scales, zeros, (1, 3, 8, 9, 17))


def _assert_rows_are_the_gemv_model(ex, rng, spec, qweight, scales, zeros, ms):
    """The compiled GEMM on m random rows for each m of `ms` (the last row with an all-zero block): every row is the
    GEMV's NumPy model of that row."""
    import tvm
    from edgequant.tvm_schedules.cpu_int8 import int8_gemv_np
    for m in ms:
        x = rng.standard_normal((1, m, spec.k)).astype(np.float16)
        x[0, m - 1, :32] = 0     # an all-zero block
        y = tvm.runtime.tensor(np.full((1, m, spec.n), np.nan, np.float32))
        args = [x, qweight, scales] + ([] if zeros is None else [zeros])
        ex["main"](*[tvm.runtime.tensor(a) for a in args], y)
        model = np.stack([int8_gemv_np(spec, x[0, i], qweight, scales, zeros) for i in range(m)])
        np.testing.assert_allclose(y.numpy()[0], model, rtol=1e-5, atol=1e-5 * np.abs(model).max())


@pytest.mark.parametrize("group,sym,n,k", [(128, False, 96, 576), (-1, True, 48, 64), (64, False, 32, 160),
                                           (128, True, 16, 1536)])
def test_prefill_gemm_16_lanes_equals_the_gemv_model(group, sym, n, k):
    """The 4-bit row-lane GEMM with 16 weight rows per vector (512-bit VNNI: `cpu_int8_rows.lanes_for`), a ragged
    last group and tiles of one block among the cases: every row is the GEMV's NumPy model, and its dots are 512-bit."""
    import tvm
    from edgequant.tvm_schedules import cpu_int8_rows
    from edgequant.tvm_schedules.cpu_int8 import int8_gemm_func
    host = _isa_or_skip("vnni")
    if cpu_int8_rows.lanes_for(host, "vnni") != 16:
        pytest.skip(f"this CPU ({host.attrs.get('mcpu')}) has no 512-bit VNNI")
    rng = np.random.default_rng(k + n)
    spec, qweight, scales, zeros = _linear(rng, 4, group, sym, n, k)
    mod = tvm.IRModule({"main": int8_gemm_func(spec, "vnni", lanes=16)})
    assert re.search(r"\bvpdpbusd\s+[^\n]*%zmm", tvm.tirx.build(mod, target=host).inspect_source("asm"))
    _assert_rows_are_the_gemv_model(tvm.compile(mod, target=host), rng, spec, qweight, scales, zeros, (1, 9, 17))


@pytest.mark.parametrize("isa,pattern", [("vnni", r"vpdpbusd"), ("avx2", r"vpmaddubsw")])
def test_generated_code_uses_integer_dot_products(isa, pattern):
    import tvm
    from edgequant.tvm_schedules.cpu_int8 import int8_gemv_func
    from edgequant.tvm_schedules.dequant import QuantSpec
    host = _isa_or_skip(isa)
    spec = QuantSpec(64, 576, 4, 128, False)
    asm = tvm.tirx.build(tvm.IRModule({"main": int8_gemv_func(spec, isa)}), target=host).inspect_source("asm")
    assert re.search(rf"\b{pattern}\s+[^\n]*%ymm", asm), f"no 256-bit {pattern} in the kernel"


@pytest.mark.parametrize("bits,group,layout", [(4, 128, "words"), (2, 64, "words"), (3, 128, "bytes3")])
def test_aarch64_code_uses_sdot(bits, group, layout):
    """Cross-compiled for cpu-arm64 (no aarch64 CPU needed): the GEMV's and GEMM's integer dots are NEON sdot, 4
    lanes each (their results are checked under qemu by tests/apps/test_runtime_aarch64.py)."""
    import tvm
    from edgequant.export.targets import get_preset, tvm_target
    from edgequant.tvm_schedules.cpu_int8 import int8_gemm_func, int8_gemv_func
    from edgequant.tvm_schedules.dequant import QuantSpec
    spec = QuantSpec(64, 576, bits, group, False, layout)
    for fn in (int8_gemv_func(spec, "sdot"), int8_gemm_func(spec, "sdot")):
        mod = tvm.IRModule({"main": fn})
        asm = tvm.tirx.build(mod, target=tvm_target(get_preset("cpu-arm64"))).inspect_source("asm")
        assert re.search(r"\bsdot\s+v\d+\.4s, v\d+\.16b, v\d+\.16b", asm), "no NEON sdot in the kernel"


def test_isa_follows_the_target():
    import tvm
    from edgequant.export.targets import get_preset, tvm_target
    from edgequant.tvm_schedules.cpu_int8 import target_isa
    T = tvm.target.Target
    assert target_isa(T({"kind": "llvm", "mcpu": "znver5"})) == "vnni"
    assert target_isa(T({"kind": "llvm", "mcpu": "sapphirerapids"})) == "vnni"
    assert target_isa(T({"kind": "llvm", "mcpu": "haswell"})) == "avx2"
    assert target_isa(T({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"})) is None
    assert target_isa(tvm_target(get_preset("cpu-arm64"))) == "sdot"
    assert target_isa(T({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})) is None  # Armv8.0
    assert target_isa(T({"kind": "cuda"})) is None
    host, isas = _host_isas()
    assert target_isa(tvm_target(get_preset("cpu"))) == (isas[0] if isas else None)


def test_supported_shapes():
    from edgequant.tvm_schedules.cpu_int8 import chunk_plan
    from edgequant.tvm_schedules.dequant import QuantSpec
    assert chunk_plan(QuantSpec(8, 576, 4, 128, False))[0] == 8     # SmolLM2 W4 g128: 72 words, 16 per group
    assert chunk_plan(QuantSpec(8, 576, 2, 64, False)) == (8, 2, 2)   # W2 g64: 18 lanes of two words, a 2-lane tail
    assert chunk_plan(QuantSpec(8, 1536, 2, 64, False))[0] == 8     # two groups per chunk
    assert chunk_plan(QuantSpec(8, 160, 2, -1, False)) is None   # 10 words per row
    assert chunk_plan(QuantSpec(8, 96, 4, 48, False)) is None    # groups not made of whole blocks of 32
    assert chunk_plan(QuantSpec(8, 576, 3, 128, False, "planes3")) == (8, 4, 4)
    assert chunk_plan(QuantSpec(8, 576, 2, -1, False)) == (8, 2, 2)    # per channel: one group, any chunks
    assert chunk_plan(QuantSpec(8, 320, 2, 64, False)) == (8, 1, 2)
    assert chunk_plan(QuantSpec(8, 64, 2, -1, True)) == (4, 0, 2)       # a 2-lane row in 4-lane vectors
    assert chunk_plan(QuantSpec(8, 192, 4, 96, False)) == (4, 6, 0)    # groups of 12 words: 128-bit chunks
    assert chunk_plan(QuantSpec(8, 1536, 3, 128, False, "planes3"))[0] == 8
    assert chunk_plan(QuantSpec(8, 576, 3, 128, False, "words")) is None       # the checkpoint's 10-per-word layout


W8_CASES = [(64, 576, 32, False), (40, 160, -1, True), (16, 1536, 128, False), (24, 96, 32, True)]  # SmolLM2's
# e8 table (g32, an even block count), per channel, groups of 4 blocks, an odd block count


@pytest.mark.parametrize("n,k,group,sym", W8_CASES)
def test_w8_gemv_matches_numpy(n, k, group, sym):
    """The 8-bit GEMV (`--embed-bits 8` output layers, tvm_schedules/cpu_int8_w8.py): full-range codes 0-255 and
    zero points, the same int8 activations as the 2-4-bit kernels, against their NumPy model and the exact product."""
    import tvm
    from edgequant.tvm_schedules import cpu_int8_w8
    from edgequant.tvm_schedules.cpu_int8 import int8_gemv_np
    from edgequant.tvm_schedules.dequant import quant_matmul_np
    host = _isa_or_skip("vnni")
    rng = np.random.default_rng(k + n)
    spec, qweight, scales, zeros = _linear(rng, 8, group, sym, n, k)
    x = rng.standard_normal((1, 1, k)).astype(np.float16)
    x[0, 0, :32] = 0     # an all-zero block
    ex = tvm.compile(tvm.IRModule({"main": cpu_int8_w8.gemv_func(spec, "vnni", lead=(1, 1))}), target=host)
    y = tvm.runtime.tensor(np.full((1, 1, n), np.nan, np.float32))
    ex["main"](*[tvm.runtime.tensor(a) for a in [x, qweight, scales] + ([] if sym else [zeros])], y)
    got = y.numpy()[0, 0]
    model = int8_gemv_np(spec, x[0, 0], qweight, scales, zeros)
    np.testing.assert_allclose(got, model, rtol=1e-5, atol=1e-5 * np.abs(model).max())
    exact = quant_matmul_np(spec, x[0], qweight, scales, zeros)[0]
    assert np.abs(got - exact).max() / np.abs(exact).max() < 2e-2


def test_w8_gemv_isas():
    """vpdpbusd on x86 VNNI, sdot (codes flipped by 128) for cpu-arm64; AVX2 (saturating pair sums) is not offered."""
    import tvm
    from edgequant.export.targets import get_preset, tvm_target
    from edgequant.tvm_schedules import cpu_int8_w8
    from edgequant.tvm_schedules.dequant import QuantSpec
    spec = QuantSpec(64, 576, 8, 32, False)
    assert not cpu_int8_w8.supports(spec, "avx2") and not cpu_int8_w8.supports(QuantSpec(64, 576, 4, 32, False), "vnni")
    asm = tvm.tirx.build(tvm.IRModule({"main": cpu_int8_w8.gemv_func(spec, "sdot")}),
                         target=tvm_target(get_preset("cpu-arm64"))).inspect_source("asm")
    assert re.search(r"\bsdot\s+v\d+\.4s, v\d+\.16b, v\d+\.16b", asm), "no NEON sdot in the kernel"
    _isa_or_skip("vnni")
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    asm = tvm.tirx.build(tvm.IRModule({"main": cpu_int8_w8.gemv_func(spec, "vnni")}), target=host).inspect_source("asm")
    assert re.search(r"\bvpdpbusd\s+[^\n]*%ymm", asm), "no 256-bit vpdpbusd in the kernel"
