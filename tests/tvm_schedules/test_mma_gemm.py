"""The prefill GEMM on tensor cores (`tvm_schedules/mma_gemm.py`): its NumPy model (the B-fragment fields each lane
extracts from the checkpoint's words, the 1024-magic half2 dequantization, fp32 accumulation per MMA step) against
the fp32 reference, and the CUDA source its prim func emits (compiled for cuda without a GPU). The compiled kernel
runs against a torch reference on the GPU in `benchmarks/gpu_decode.py run` (benchmarks/results)."""
import numpy as np
import pytest

from edgequant.pack import pack

pytestmark = pytest.mark.tvm


def _linear(rng, bits, group, sym, n, k):
    from conftest import random_quantized_linear
    return random_quantized_linear(rng, bits, group, sym, n, k)

def test_fragment_fields_cover_each_step_once():
    """Over the 4 lanes of a quad, the fields name every code of a 16-wide step exactly once (word, bit)."""
    from edgequant.tvm_schedules.mma_gemm import fragment_fields
    for bits in (4, 2):
        vpw = 32 // bits
        seen = set()
        for t in range(4):
            for h, (wo, sh) in enumerate(fragment_fields(bits, t)):
                for e in range(2):   # the pair: codes 2t + 8h + e
                    v = 2 * t + 8 * h + e
                    assert (wo * vpw * bits + sh + e * bits) == v * bits
                    seen.add(v)
        assert seen == set(range(16))


@pytest.mark.parametrize("bits,group,sym,n,k,m", [
    (4, 128, False, 64, 256, 5), (4, 32, True, 128, 96, 17), (4, -1, False, 64, 128, 1),
    (2, 64, False, 64, 192, 9), (2, -1, True, 128, 64, 3)])
def test_mma_gemm_model_matches_reference(bits, group, sym, n, k, m):
    from edgequant.tvm_schedules.dequant import dequantize_np, quant_matmul_np
    from edgequant.tvm_schedules.mma_gemm import mma_gemm_np
    rng = np.random.default_rng(bits * 7 + k)
    spec, q, qweight, scales, zeros = _linear(rng, bits, group, sym, n, k)
    x = rng.standard_normal((m, k)).astype(np.float16)
    x[:, 3] = 60   # an outlier channel
    y = mma_gemm_np(spec, x, qweight, scales, zeros)
    # the weights the kernel multiplies are the dequantize kernel's fp16 values, bit for bit
    w16 = dequantize_np(spec, qweight, scales, zeros).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(y, x.astype(np.float32) @ w16.T, rtol=0, atol=1e-5 * np.abs(x).sum(1).max())
    ref = quant_matmul_np(spec, x, qweight, scales, zeros)
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-3 * np.abs(ref).max())


def test_supports_and_configs():
    from edgequant.tvm_schedules.dequant import QuantSpec
    from edgequant.tvm_schedules.mma_gemm import MmaConfig, default_config, default_configs, supports
    assert supports(QuantSpec(4096, 4096, 4, 128, False)) and supports(QuantSpec(960, 576, 4, 64, True))
    assert not supports(QuantSpec(4096, 4096, 3, 128, False, "words3x32"))    # 3 bits: dlight
    assert not supports(QuantSpec(4096, 4096, 4, 16, False))                  # groups inside a k tile
    assert not supports(QuantSpec(100, 4096, 4, 128, False))                  # N not in 64-column tiles
    assert default_config(QuantSpec(960, 576, 4, 64, True)).bn == 64          # SmolLM2's qkv: 128 x 64 tiles
    wide, narrow = QuantSpec(22016, 4096, 4, 128, False), QuantSpec(4096, 4096, 4, 128, False)
    down = QuantSpec(4096, 11008, 4, 128, False)
    assert [default_config(wide, m).bn for m in (32, 512, 2048)] == [64, 64, 128]
    assert [default_config(narrow, m).bn for m in (32, 512, 2048)] == [64, 64, 128]
    # the H200 sweep's picks: 64 x 64 tiles while 128-row ones would be few, down sliced along K at 512 tokens
    assert [default_config(narrow, m).bm for m in (256, 512)] == [64, 128]
    assert [default_config(down, m).ksplit for m in (256, 512, 1024)] == [1, 2, 1]
    assert all(default_config(s, m).bk == 64 for s in (wide, narrow, down) for m in (32, 256, 2048))
    # groups of 32 (or K in 32s) keep 32-wide stages
    assert {c.bk for _, c in default_configs(QuantSpec(4096, 4096, 4, 32, False))} == {32}
    assert {c.bk for _, c in default_configs(QuantSpec(960, 608, 4, -1, True))} == {32}
    with pytest.raises(ValueError, match="shared memory"):
        MmaConfig(bm=256, stages=4).check(4)


def test_prim_func_emits_the_mma_kernel():
    import re

    import tvm
    from edgequant.tvm_schedules.dequant import QuantSpec
    from edgequant.tvm_schedules.mma_gemm import MmaConfig, gemm_func
    funcs = {"g4": gemm_func(QuantSpec(128, 256, 4, 64, False)).with_attr("global_symbol", "g4"),
             "g2": gemm_func(QuantSpec(128, 256, 2, 64, True), MmaConfig(128, 64, 128, 16, 3, 2, 32, 2), "float32")
             .with_attr("global_symbol", "g2")}
    ex = tvm.compile(tvm.IRModule(funcs), target={"kind": "cuda", "arch": "sm_90"})
    src = next(m.inspect_source() for m in [ex.mod, *ex.mod.imports] if m.kind == "cuda")
    # each instance carries the template behind one include guard (nvcc sees it once)
    assert src.count("#ifndef EDGEQUANT_MMA_GEMM") == 3 and src.count("  eq_mma_gemm<") == 3
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src and "cp.async.cg.shared.global" in src
    bounds = dict((k, b) for b, k in re.findall(r"void __launch_bounds__\(([\d, ]+)\) (\w+)\(", src))
    # the default: two tile kernels picked by the prompt length (N = 128: 64 x 64 tiles up to 16256 tokens), 64-wide
    # k-tiles; the register cap as launch bounds; the sliced-K tile's 2 warps along K
    assert sorted(b for k, b in bounds.items() if k.startswith("g4")) == ["128, 4", "256, 2"]
    assert "64, 16, 4, 64, 1, half>" in src and "128, 16, 2, 64, 1, half>" in src   # WM, WN, stages, BK, KSPLIT
    assert [b for k, b in bounds.items() if k.startswith("g2")] == ["256, 2"]
    assert "128, 16, 3, 32, 2, float>" in src
    sig = re.search(r"void __launch_bounds__\([\d, ]+\) g4_kernel\(([^)]*)\)", src).group(1)
    assert "int64_t m" in sig   # the token count is a kernel argument: one kernel for every prompt length


def test_lane_fields_decode_each_pair():
    """prmt + LOP3 + the FMA's 2^-o give each lane's pair of codes minus the zero point, exactly, for every word."""
    from edgequant.tvm_schedules.mma_gemm import _pair_half2, lane_fields
    rng = np.random.default_rng(3)
    for bits in (4, 2):
        vpw = 32 // bits
        q = rng.integers(0, 1 << bits, (257, 16))
        q[0], q[1] = 0, (1 << bits) - 1
        words = pack(q, bits).astype(np.uint32)               # [257, 16 / vpw]: one 16-wide step per row
        for z in (0, (1 << bits) - 1, 1 << (bits - 1)):
            for t in range(4):
                fields, mask, mul = lane_fields(bits, t)
                add = [-(1024 * m + z) for m in mul]
                assert all(np.float16(v) == v for v in (*mul, *add))   # the kernel's half2 constants are exact
                for h, (wo, byte) in enumerate(fields):
                    assert wo < 16 // vpw
                    pair = _pair_half2(words[:, wo], byte, mask).astype(np.float32)
                    got = (pair * np.array(mul, np.float32) + np.array(add, np.float32)).astype(np.float16)
                    np.testing.assert_array_equal(got, q[:, 2 * t + 8 * h: 2 * t + 8 * h + 2] - z)


@pytest.mark.parametrize("bk", [32, 64])
def test_x_stage_swizzle(bk):
    """Each x row's chunks are a permutation, and ldmatrix's 8 rows of one logical chunk hit 8 different 16-byte
    bank groups (no shared-memory bank conflict)."""
    from edgequant.tvm_schedules.mma_gemm import x_chunk
    ch = bk // 8
    for r in range(64):
        assert sorted(x_chunk(bk, r, c) for c in range(ch)) == list(range(ch))
    for r0 in range(0, 64, 8):
        for c in range(ch):
            assert len({(r * ch + x_chunk(bk, r, c)) % 8 for r in range(r0, r0 + 8)}) == 8


def test_sliced_k_covers_each_step_once():
    from edgequant.tvm_schedules.mma_gemm import MmaConfig, warp_steps
    for bk, ks in ((32, 1), (32, 2), (64, 1), (64, 2), (64, 4)):
        cfg = MmaConfig(64, 64, 64, 16, 2, 2, bk, ks)
        cfg.check(4)
        steps = [s for wk in range(ks) for s in warp_steps(cfg, wk)]
        assert sorted(steps) == list(range(bk // 16))
    with pytest.raises(ValueError, match="bad MMA"):
        MmaConfig(128, 64, 128, 16, 2, 2, 32, 4).check(4)      # 2 steps a stage cannot go to 4 warps
    with pytest.raises(ValueError, match="shared memory"):
        MmaConfig(128, 128, 128, 16, 2, 2, 64, 2).check(4)     # the 64 KiB of partial sums
