"""The ring decode GEMV (`tvm_schedules/ring_gemv.py`): its row layout (round trip, and the NumPy model of the
kernel's reads and math against `cpu_int8.int8_gemv_np` on the checkpoint's own packing), its shared-memory plan,
and the CUDA source it emits (bulk copies into a ring with mbarriers, the PDL calls in their places). The kernel
itself runs only on sm_90: `benchmarks/gpu_ring.py` checks it against `ring_gemv_np` on the GPU machine
(benchmarks/results/gpu-ring-h200.md)."""
import numpy as np
import pytest

pytestmark = pytest.mark.tvm

# N, K, sym: one pass of 32 groups, a pass cut short (3 groups: lanes 3-31 idle), two passes with one group in the
# second (the LLaMA-7B down_proj's K = 11008 has 86 groups: 32, 32, 22)
LAYOUTS = [(5, 4096, False), (7, 384, True), (3, 4224, False), (2, 11008, False)]


def _linear(rng, n, k, sym):
    from conftest import random_quantized_linear
    return random_quantized_linear(rng, 4, 128, sym, n, k)


@pytest.mark.parametrize("n,k,sym", LAYOUTS)
def test_repack_round_trip(n, k, sym):
    from edgequant.tvm_schedules.ring_gemv import repack_np, row_bytes, unpack_np
    rng = np.random.default_rng(k + n)
    spec, q, _, scales, zeros = _linear(rng, n, k, sym)
    rows = repack_np(q, scales, zeros)
    assert rows.shape == (n, row_bytes(k, sym)) and rows.dtype == np.uint8 and row_bytes(k, sym) % 16 == 0
    codes, sc, z = unpack_np(rows, k, sym, int(spec.sym_zero))
    np.testing.assert_array_equal(codes, q)
    np.testing.assert_array_equal(sc, scales)
    np.testing.assert_array_equal(z, np.full_like(z, int(spec.sym_zero)) if sym else zeros)


def test_layout_puts_a_lanes_32_codes_in_one_16_byte_piece():
    """Lane L of pass p, piece c: its 16 bytes at p * 2048 + c * lp * 16 + L * 16 hold values 128 (32 p + L) + 32 c
    + (8 q + b) in word q byte b's low nibble and + 4 in its high nibble (what the kernel's masks and dp4a pair)."""
    from edgequant.tvm_schedules.ring_gemv import repack_np
    k = 4224                                            # 33 groups: the second pass has one lane
    q = np.random.default_rng(0).integers(0, 16, (1, k))
    rows = repack_np(q, np.ones((1, k // 128), np.float16), np.zeros((1, k // 128), np.uint8))
    for p, lane, c in [(0, 0, 0), (0, 31, 3), (0, 7, 2), (1, 0, 1)]:
        lp = min(32, k // 128 - 32 * p)
        piece = rows[0, p * 2048 + c * lp * 16 + lane * 16:][:16]
        v0 = 128 * (32 * p + lane) + 32 * c
        for qw in range(4):
            for b in range(4):
                assert piece[4 * qw + b] & 15 == q[0, v0 + 8 * qw + b]
                assert piece[4 * qw + b] >> 4 == q[0, v0 + 8 * qw + 4 + b]


@pytest.mark.parametrize("n,k,sym", LAYOUTS)
def test_ring_model_matches_the_int8_gemv_model(n, k, sym):
    """ring_gemv_np (the kernel's math on the ring layout) = cpu_int8.int8_gemv_np (the export's int8 GEMVs' model on
    the checkpoint's words), with a 100x outlier activation."""
    from edgequant.tvm_schedules.cpu_int8 import int8_gemv_np
    from edgequant.tvm_schedules.ring_gemv import repack_np, ring_gemv_np
    rng = np.random.default_rng(3 * k + n)
    spec, q, qweight, scales, zeros = _linear(rng, n, k, sym)
    x = rng.standard_normal(k).astype(np.float16)
    x[5] = 100
    y = ring_gemv_np(repack_np(q, scales, zeros), x, k, sym, int(spec.sym_zero))
    ref = int8_gemv_np(spec, x, qweight, scales, zeros)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_two_blocks_fit_an_sm():
    """The default rings leave room for the next linear's block (two of ~108 KB in the 228 KB of an H100/H200 SM,
    1 KB reserved per block), at the LLaMA-7B and SmolLM2 widths."""
    from edgequant.tvm_schedules.ring_gemv import smem_bytes
    for k in (576, 1536, 4096, 11008):
        assert 2 * (smem_bytes(k, False) + 1024) <= 228 * 1024, k


def test_config_and_shape_are_checked():
    from edgequant.tvm_schedules.ring_gemv import RingConfig, ring_gemv_func
    with pytest.raises(ValueError):
        RingConfig(rows=0)
    with pytest.raises(ValueError):
        RingConfig(pre=5)
    with pytest.raises(ValueError, match="no ring GEMV"):
        ring_gemv_func(8, 100)


def test_cuda_source_streams_a_ring_and_waits_after_the_first_fills():
    """The CUDA C: one `__launch_bounds__(threads, 2)` kernel whose producer issues bulk copies completing mbarriers,
    triggering its dependents before anything else and waiting for the previous kernel only after the first fills
    (and before any read of x); consumers wait on the slots' mbarriers and use dp4a; shuffles sum the rows."""
    import tvm
    from edgequant.export.targets import PRESETS
    from edgequant.tvm_schedules.ring_gemv import RingConfig, ring_gemv_func
    ex = tvm.compile(tvm.IRModule({"main": ring_gemv_func(96, 4096, cfg=RingConfig(2, 1, 2, 2, 4))}),
                     target={**PRESETS["cuda"].target, "arch": "sm_90a", "max_shared_memory_per_block": 232448})
    src = next(m.inspect_source() for m in _walk(ex.mod) if m.kind == "cuda")
    body = src[src.index("main_kernel(uint"):]
    body = body[body.index(") {"):]
    assert "__launch_bounds__(96, 2) main_kernel" in src and "extern __shared__" in body
    trigger, bulk = body.index("cudaTriggerProgrammaticLaunchCompletion"), body.index("cp_async_bulk")
    wait, xload = body.index("cudaGridDependencySynchronize"), body.index("x_ptr +")
    assert trigger < bulk < wait < xload
    assert "mbarrier_init" in body and "expect_tx" in body and "mbarrier_wait" in body and "dp4a" in body
    assert "__shfl_sync" in body


def _walk(m):
    yield m
    for i in m.imports:
        yield from _walk(i)
