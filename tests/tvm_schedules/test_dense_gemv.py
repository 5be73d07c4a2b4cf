"""The fp16-weight decode GEMV (`tvm_schedules/dense_gemv.py`): its CPU twin (the same loads, batches and guards, the
thread loops serial) compiled for llvm against NumPy, and the CUDA source it emits. The GPU run of the same kernels
against a torch reference is `benchmarks/gpu_decode.py run --acts dense` (results under benchmarks/results)."""
import re

import numpy as np
import pytest

pytestmark = pytest.mark.tvm


@pytest.mark.parametrize("n,k,rows,warps,unroll,depth,out_dtype", [
    (12, 40, 4, 1, 2, 1, "float16"),      # fewer pieces than threads (idle threads)
    (10, 264, 4, 1, 3, 1, "float32"),     # a short last block of rows, a ragged last piece, float32 logits
    (7, 2056, 2, 2, 2, 2, "float16"),     # double-buffered batches, a short last batch and block
    (8, 512, 1, 2, 1, 2, "float16"),
])
def test_dense_gemv_cpu_twin_matches_numpy(n, k, rows, warps, unroll, depth, out_dtype):
    import tvm
    from edgequant.tvm_schedules.dense_gemv import DenseConfig, dense_gemv_func
    rng = np.random.default_rng(n * 7 + k)
    x = rng.standard_normal((1, k)).astype(np.float16)
    x[0, 5] = 100   # an outlier channel: fp32 accumulation must keep it
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float16)
    ex = tvm.compile(tvm.IRModule({"main": dense_gemv_func(n, k, DenseConfig(rows, warps, unroll, depth), gpu=False,
                                                           out_dtype=out_dtype)}), target="llvm")
    y = tvm.runtime.empty((1, n), out_dtype, tvm.cpu())
    ex["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), y)
    ref = x.astype(np.float32) @ w.astype(np.float32).T
    tol = 1e-5 * np.abs(x.astype(np.float32)) @ np.abs(w.astype(np.float32)).T + (
        np.abs(ref) * 2 ** -10 if out_dtype == "float16" else 0)
    assert np.all(np.abs(y.numpy().astype(np.float32) - ref) <= tol)


def test_dense_gemv_cuda_source_128_bit_loads_and_pdl():
    import tvm
    from edgequant.tvm_schedules.dense_gemv import DenseConfig, dense_gemv_func
    f = dense_gemv_func(64, 2048, DenseConfig(2, 4, 2, 1), pdl=True).with_attr("global_symbol", "g")
    ex = tvm.compile(tvm.IRModule({"g": f}), target={"kind": "cuda", "arch": "sm_90"})
    src = next(m.inspect_source() for m in [ex.mod, *ex.mod.imports] if m.kind == "cuda")
    body = src[src.index("{", src.rindex("g_kernel(")):]   # the definition's body
    # 2048 / 8 pieces over 128 threads: 2 per thread, one batch; 2 rows -> 4 weight loads, then x after the wait
    wait = body.index("cudaGridDependencySynchronize")
    assert len(re.findall(r"\*\(uint4\*\)\(weight_ptr", body[:wait])) == 4
    assert len(re.findall(r"\*\(uint4\*\)\(x_ptr", body[wait:])) == 2 and "x_ptr" not in body[:wait]
    assert body.index("cudaTriggerProgrammaticLaunchCompletion") > wait
    assert "__shfl_down_sync" in body and "__syncthreads" in body


def test_dense_gemv_refuses_ragged_k_and_picks_configs():
    from edgequant.tvm_schedules.dense_gemv import DenseConfig, default_config, dense_gemv_func, supports
    assert not supports(64, 100) and supports(64, 96)
    with pytest.raises(ValueError, match="multiple of 8"):
        dense_gemv_func(64, 100)
    with pytest.raises(ValueError, match="bad dense GEMV config"):
        DenseConfig(4, 4, 2, 3)
    # LLaMA-7B (the H200 sweep's winners): 4 rows x 8 warps, K = 4096 in one batch of 2 pieces per thread, K = 11008
    # one piece per batch, double-buffered; small K (SmolLM2: 576) fewer warps so each thread has 2 pieces
    assert default_config(4096, 4096) == DenseConfig(4, 8, 2, 1)
    assert default_config(4096, 11008) == DenseConfig(4, 8, 1, 2)
    assert default_config(49152, 576) == DenseConfig(4, 2, 2, 1)
    assert default_config(7, 40) == DenseConfig(1, 1, 1, 1)
