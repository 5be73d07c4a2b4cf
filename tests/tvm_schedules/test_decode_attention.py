"""The one-graph decode step's attention (`tvm_schedules/decode_attention.py`): the CPU twin (the GPU kernel's text
with serial loops) against the NumPy reference at positions around the tile edges, with grouped query heads, the
cache append at pos and its neighbours untouched, value rows past pos holding NaN; the prefill-to-cache copy; the
CUDA source (barriers, 16-byte key loads) and its PDL launch. The CUDA kernel itself runs in apps/cuda/run_dist.py's
greedy tokens (benchmarks/results/gpu-e2e-smollm2-gpu10-h200.md)."""
import numpy as np
import pytest

pytestmark = pytest.mark.tvm


@pytest.mark.parametrize("h_q,h_kv,dim,splits", [(9, 3, 64, 1), (4, 4, 32, 1), (9, 3, 64, 4), (4, 4, 32, 16)])
def test_decode_attention_twin_matches_numpy(h_q, h_kv, dim, splits):
    """With splits, the blocks of a head cover 1 to `splits` ranges of keys (one tile each up to 4 x 64 keys, 128
    at 400) and the merge adds them up; the twin runs a head's blocks in order, so a block that read row pos before
    the block of pos wrote it would read the old row (random here) and miss."""
    import tvm
    from edgequant.tvm_schedules import decode_attention as da
    layers, max_len, theta, scale, sm = 2, 400, 10000.0, 0.5, dim ** -0.5
    ex = tvm.compile(tvm.IRModule({"main": da.decode_attention_func(layers, h_q, h_kv, dim, theta, scale, sm,
                                                                       gpu=False, splits=splits)}), target="llvm")
    merge = tvm.compile(tvm.IRModule({"main": da.decode_combine_func(h_q, splits, dim, gpu=False)}), target="llvm")
    rng = np.random.default_rng(dim)
    for pos in (0, 63, 64, 139, 255, 256, 399):
        qkv = rng.standard_normal((1, 1, h_q + 2 * h_kv, dim)).astype(np.float16)
        cache = rng.standard_normal((layers, 2, h_kv, max_len, dim)).astype(np.float16)
        cache[:, 1, :, pos + 1:] = np.nan   # rows past pos are never read into the result (uninitialised memory)
        want_o, want_c = da.decode_attention_np(qkv, cache, pos, 1, h_q, h_kv, theta, scale, sm)
        c, o = tvm.runtime.tensor(cache), tvm.runtime.empty((1, 1, h_q, dim), "float16", tvm.cpu())
        p = tvm.runtime.tensor(np.array([pos], "int32"))
        part = tvm.runtime.tensor(np.full((h_q, splits, dim + 2), np.nan, np.float32))  # blocks past pos: unread
        ex["main"](tvm.runtime.tensor(qkv), c, p, 1, part)
        merge["main"](part, p, o)
        np.testing.assert_allclose(o.numpy().astype(np.float32), want_o.astype(np.float32), atol=2e-3, rtol=2e-3)
        np.testing.assert_array_equal(c.numpy(), want_c)


def test_rope_np_is_hf_rotate_half():
    """The reference's RoPE is transformers' (rotate-half, inv_freq = 1 / theta^(2j / dim)) at position * scale."""
    from edgequant.tvm_schedules.decode_attention import rope_np
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    pos, theta, scale = 37, 10000.0, 0.25
    inv = 1.0 / theta ** (np.arange(0, 16, 2) / 16)
    ang = np.concatenate([pos * scale * inv] * 2)
    want = x * np.cos(ang) + np.concatenate([-x[:, 8:], x[:, :8]], -1) * np.sin(ang)
    np.testing.assert_allclose(rope_np(x, pos, theta, scale), want, atol=1e-4)


def test_cache_fill_twin_copies_from_pos():
    import tvm
    from edgequant.tvm_schedules.decode_attention import cache_fill_func
    layers, h_kv, dim, max_len, n, start = 3, 2, 16, 20, 5, 4
    ex = tvm.compile(tvm.IRModule({"main": cache_fill_func(layers, h_kv, dim, gpu=False)}), target="llvm")
    rng = np.random.default_rng(1)
    k, v = (rng.standard_normal((layers, n, h_kv, dim)).astype(np.float16) for _ in range(2))
    cache = rng.standard_normal((layers, 2, h_kv, max_len, dim)).astype(np.float16)
    want = cache.copy()
    want[:, 0, :, start:start + n] = k.transpose(0, 2, 1, 3)
    want[:, 1, :, start:start + n] = v.transpose(0, 2, 1, 3)
    c = tvm.runtime.tensor(cache)
    ex["main"](tvm.runtime.tensor(k), tvm.runtime.tensor(v), c, tvm.runtime.tensor(np.array([start], "int32")))
    np.testing.assert_array_equal(c.numpy(), want)


def test_decode_attention_cuda_source():
    import tvm
    from edgequant.tvm_schedules.decode_attention import decode_attention_func
    m = tvm.tirx.build(tvm.IRModule({"main": decode_attention_func(30, 9, 3, 64, 1e5, 1.0, 0.125)}),
                       target=tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))
    src = next(x.inspect_source() for x in m.imports if x.kind == "cuda")
    assert src.count("__syncthreads()") >= 3 and "*(uint4*)" in src


def test_decode_attention_pdl_kernel_is_tagged():
    """With `pdl` the kernel waits for the previous one and triggers the next, and export/pdl.py's pipeline has it
    launched with programmatic stream serialization; without, neither."""
    import tvm
    from tvm.tirx import compilation_pipeline as cp

    from edgequant.export import pdl
    from edgequant.tvm_schedules.decode_attention import decode_attention_func
    mod = tvm.IRModule({n: decode_attention_func(2, 4, 2, 32, 1e4, 1.0, 0.2, pdl=flag).with_attr("global_symbol", n)
                        for n, flag in (("with_pdl", True), ("plain", False))})
    mod = tvm.tirx.transform.BindTarget(tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm"))(mod)
    funcs = {gv.name_hint: f for gv, f in cp.get_tir_pipeline(pdl.register())[0](mod).functions.items()}
    assert pdl.TAG in [str(p) for p in funcs["with_pdl_kernel"].attrs["tirx.kernel_launch_params"]]
    assert pdl.TAG not in [str(p) for p in funcs["plain_kernel"].attrs["tirx.kernel_launch_params"]]
    assert "cudaTriggerProgrammaticLaunchCompletion" in funcs["with_pdl_kernel"].script()
