"""edgequant's attention kernels for the paged KV cache, CPU (tvm_schedules/paged_attention_cpu.py, compiled for llvm)
and GPU (paged_attention_gpu.py, compiled for opencl and webgpu and run on PoCL and Mesa's lavapipe as
tests/export/mobile_gpu.py runs an android or webgpu export's kernels; `.ci/install-gpu-sw.sh` installs them, the GPU
cases skip where they are missing), against their NumPy reference, on a hand-made page table with the runtime's
layout (pages out of order, a sliding window that starts inside a page): the chunk against itself (ragged), the
chunk against the cached keys (paged prefill, full and windowed, where late rows see no cached key at all), and
decode; GQA groups, with and without a soft-cap. A window
comes either as the runtime's sliding-layer view ("mha_sliding": its last pages and length info) or, for a window
on every layer, from the kernels' own `every_window` over all the pages."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.tvm

H_KV, H_Q, D, PAGE = 2, 4, 16, 16


@pytest.fixture(params=["llvm", "opencl", "webgpu"])
def backend(request, monkeypatch):
    """(kernel module, runner) for one backend: runner(func, *args, outputs=(i, j)) returns the args, outputs
    written. The GPU kernels run with 8 threads a block here, so that keys come in several tiles (the last one
    partial) and each thread owns several of the 16 dimensions."""
    from edgequant.tvm_schedules import paged_attention_cpu, paged_attention_gpu
    if request.param == "llvm":
        return paged_attention_cpu, _run_llvm
    monkeypatch.setattr(paged_attention_gpu, "_THREADS", 8)
    try:
        from tests.export.mobile_gpu import OpenCLRunner, WebGPURunner
        runner = OpenCLRunner() if request.param == "opencl" else WebGPURunner()
    except ImportError as e:
        pytest.skip(f"{e.name} is not installed: run .ci/install-gpu-sw.sh")
    except RuntimeError as e:
        pytest.skip(str(e))

    def run(func, *args, outputs):
        import tvm
        from tests.export import kernel_launch
        lowered = kernel_launch.lower(func, tvm.target.Target(request.param, host="llvm"))
        arrays = [a if isinstance(a, np.ndarray) else np.array(a) for a in args]
        runner.run(lowered, arrays, outputs)
        return arrays
    return paged_attention_gpu, run


def _run_llvm(func, *args, outputs):  # noqa: ARG001 (every tensor comes back)
    import tvm
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    dev = tvm.cpu()
    arrs = [tvm.runtime.tensor(a, dev) if isinstance(a, np.ndarray) else a for a in args]
    lib["main"](*arrs)
    return [a.numpy() if hasattr(a, "numpy") else a for a in arrs]


def _pages(k, v, rng):
    """k/v [L, H_KV, D] into shuffled pages [P, 2, H_KV, PAGE, D]; returns (pages, page ids in sequence order)."""
    n = -(-len(k) // PAGE)
    ids = rng.permutation(n + 2)[:n].astype("int32")   # two spare pages: ids need not be dense
    pages = np.zeros((n + 2, 2, H_KV, PAGE, D), "float16")
    for t in range(len(k)):
        pages[ids[t // PAGE], 0, :, t % PAGE] = k[t]
        pages[ids[t // PAGE], 1, :, t % PAGE] = v[t]
    return pages, ids


def _window_pages(length: int, window: int, ids):
    """The runtime's sliding-layer view of a sequence: its last pages and length info [3, 1] (last page length,
    window offset inside the first page, sink 0), as paged_kv_cache.cc computes them."""
    offset = (length - window) % PAGE if length > window else 0
    n = -(-(offset + min(length, window)) // PAGE)
    info = np.array([[(length - 1) % PAGE + 1], [offset], [0]], "int32")
    return ids[len(ids) - n:], info


def _close(got, want, tol=2e-3):
    assert np.abs(got.astype(np.float64) - want).max() <= tol * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("window,softcap,lengths", [(None, 0.5, (9,)), (6, None, (9,)), (6, 0.5, (5, 0, 9))])
def test_ragged_prefill_matches_numpy(backend, window, softcap, lengths):
    """Chunks of one or several sequences (an empty one among them) packed in one call, each against itself."""
    from edgequant.tvm_schedules.paged_attention_cpu import attention_np
    kernels, run = backend
    rng = np.random.default_rng(0)
    n = sum(lengths)
    q, k, v = (rng.normal(0, 1, (n, h, D)).astype("float16") for h in (H_Q, H_KV, H_KV))
    ind = np.concatenate([[0], np.cumsum(lengths)]).astype("int32")
    out, lse = np.zeros((n, H_Q, D), "float16"), np.zeros((n, H_Q), "float32")
    res = run(kernels.ragged_prefill(H_KV, H_Q, D, D, "float16", softcap, window or 0), q, ind, k, v, ind,
              np.concatenate([np.arange(m) for m in lengths]).astype("int32"), np.zeros(len(lengths), "int32"),
              out, lse, 1, 0, 1.0, 1e4, 0.3, outputs=(7, 8))
    for a, b in zip(ind[:-1], ind[1:]):
        if b > a:
            want, want_lse = attention_np(q[a:b], k[a:b], v[a:b], np.arange(b - a), np.arange(b - a), 0.3, window,
                                          softcap)
            _close(res[7][a:b], want)
            _close(res[8][a:b], want_lse)


@pytest.mark.parametrize("window,softcap,view", [(None, None, True), (12, 0.5, True), (12, None, False)])
def test_paged_prefill_matches_numpy(backend, window, softcap, view):
    """A chunk of 14 queries after 37 cached keys; with a window of 12 the sliding kernel gets the runtime's view
    (the last 12 keys, starting 9 slots into a page) and causal, or every page and the window as `every_window`;
    rows 11.. see no cached key."""
    from edgequant.tvm_schedules.paged_attention_cpu import attention_np
    kernels, run = backend
    rng = np.random.default_rng(1)
    past, n = 37, 14
    k, v = (rng.normal(0, 1, (past, H_KV, D)).astype("float16") for _ in range(2))
    q = rng.normal(0, 1, (n, H_Q, D)).astype("float16")
    pages, ids = _pages(k, v, rng)
    sliding = bool(window) and view
    if sliding:
        ids, info = _window_pages(past, window, ids)
    else:
        info = np.array([(past - 1) % PAGE + 1], "int32")
    out, lse = np.zeros((n, H_Q, D), "float16"), np.zeros((n, H_Q), "float32")
    res = run(kernels.paged_prefill(H_KV, H_Q, D, "float16", sliding, None, sliding_window_size=window or 1024,
                                    softcap=softcap, every_window=0 if view else window or 0),
              q, np.array([0, n], "int32"), pages, np.array([0, len(ids)], "int32"), ids, info,
              np.zeros(1, "int32"), np.arange(n, dtype="int32"), out, lse, int(sliding), 0, 1.0, 1e4, 0.3,
              outputs=(8, 9))
    qpos = past + np.arange(n)
    seen = np.arange(n) < (window - 1 if window else n)   # rows with at least one cached key in their window
    want, want_lse = attention_np(q[seen], k, v, qpos[seen], np.arange(past), 0.3, window, softcap)
    _close(res[8][seen], want)
    _close(res[9][seen], want_lse)
    assert not res[8][~seen].any() and (res[9][~seen] == -5e4).all()   # nothing to merge from the cache


@pytest.mark.parametrize("window,softcap,view", [(12, 0.5, True), (12, None, False), (None, 0.5, False)])
def test_decode_matches_numpy(backend, window, softcap, view):
    """One query at position 40, its own key already appended (the runtime appends before a decode step); without a
    window the GPU kernel walks the 41 keys in six 8-key tiles."""
    from edgequant.tvm_schedules.paged_attention_cpu import attention_np
    kernels, run = backend
    rng = np.random.default_rng(2)
    length = 41
    k, v = (rng.normal(0, 1, (length, H_KV, D)).astype("float16") for _ in range(2))
    q = rng.normal(0, 1, (1, H_Q, D)).astype("float16")
    pages, ids = _pages(k, v, rng)
    if view:
        ids, info = _window_pages(length, window, ids)
    else:
        info = np.array([(length - 1) % PAGE + 1], "int32")
    out, lse = np.zeros((1, H_Q, D), "float16"), np.zeros((1, H_Q), "float32")
    res = run(kernels.paged_decode(H_KV, H_Q, D, "float16", view, None, softcap=softcap,
                                   every_window=0 if view else window or 0),
              q, pages, np.array([0, len(ids)], "int32"), ids, info, np.zeros(1, "int32"),
              np.array([length - 1], "int32"), out, lse, 0, 1.0, 1e4, 0.3, outputs=(7, 8))
    want, want_lse = attention_np(q, k, v, [length - 1], np.arange(length), 0.3, window, softcap)
    _close(res[7], want)
    _close(res[8], want_lse)
