"""The prefill GEMM on tensor cores (`tvm_schedules/mma_gemm.py`): its NumPy model (the B-fragment fields each lane
extracts from the checkpoint's words, the 1024-magic half2 dequantization, fp32 accumulation per MMA step) against
the fp32 reference, and the CUDA source its prim func emits (compiled for cuda without a GPU). The compiled kernel
runs against a torch reference on the GPU in `benchmarks/gpu_decode.py run` (benchmarks/results)."""
import numpy as np
import pytest

from edgequant.pack import pack

pytestmark = pytest.mark.tvm


def _linear(rng, bits, group, sym, n, k):
    from edgequant.tvm_schedules.dequant import QuantSpec
    spec = QuantSpec(n, k, bits, group, sym)
    q = rng.integers(0, 1 << bits, (n, k))
    scales = (rng.random((n, spec.n_groups)) * 0.02 + 0.005).astype(np.float16)
    zeros = None if sym else rng.integers(0, 1 << bits, (n, spec.n_groups)).astype(np.uint8)
    return spec, q, pack(q, bits), scales, zeros


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
    from edgequant.tvm_schedules.mma_gemm import MmaConfig, default_config, supports
    assert supports(QuantSpec(4096, 4096, 4, 128, False)) and supports(QuantSpec(960, 576, 4, 64, True))
    assert not supports(QuantSpec(4096, 4096, 3, 128, False, "words3x32"))    # 3 bits: dlight
    assert not supports(QuantSpec(4096, 4096, 4, 16, False))                  # groups inside a k tile
    assert not supports(QuantSpec(100, 4096, 4, 128, False))                  # N not in 64-column tiles
    assert default_config(QuantSpec(960, 576, 4, 64, True)).bn == 64          # SmolLM2's qkv: 128 x 64 tiles
    wide, narrow = QuantSpec(22016, 4096, 4, 128, False), QuantSpec(4096, 4096, 4, 128, False)
    assert [default_config(wide, m).bn for m in (32, 512, 2048)] == [64, 128, 128]
    assert [default_config(narrow, m).bn for m in (32, 512, 2048)] == [64, 64, 128]
    with pytest.raises(ValueError, match="shared memory"):
        MmaConfig(bm=256, stages=4).check(4)


def test_prim_func_emits_the_mma_kernel():
    import re

    import tvm
    from edgequant.tvm_schedules.dequant import QuantSpec
    from edgequant.tvm_schedules.mma_gemm import MmaConfig, gemm_func
    funcs = {"g4": gemm_func(QuantSpec(128, 256, 4, 64, False)).with_attr("global_symbol", "g4"),
             "g2": gemm_func(QuantSpec(128, 256, 2, 64, True), MmaConfig(128, 64, 128, 16, 3, 2), "float32")
             .with_attr("global_symbol", "g2")}
    ex = tvm.compile(tvm.IRModule(funcs), target={"kind": "cuda", "arch": "sm_90"})
    src = next(m.inspect_source() for m in [ex.mod, *ex.mod.imports] if m.kind == "cuda")
    # each instance carries the template behind one include guard (nvcc sees it once)
    assert src.count("#ifndef EDGEQUANT_MMA_GEMM") == 4 and src.count("  eq_mma_gemm<") == 4
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src and "cp.async.cg.shared.global" in src
    bounds = dict((k, b) for b, k in re.findall(r"void __launch_bounds__\(([\d, ]+)\) (\w+)\(", src))
    # the default: three tile kernels picked by the prompt length; the register cap as launch bounds
    assert sorted(b for k, b in bounds.items() if k.startswith("g4")) == ["128, 3", "128, 4", "256, 2"]
    assert [b for k, b in bounds.items() if k.startswith("g2")] == ["128, 2"]
    sig = re.search(r"void __launch_bounds__\([\d, ]+\) g4_kernel\(([^)]*)\)", src).group(1)
    assert "int64_t m" in sig   # the token count is a kernel argument: one kernel for every prompt length
