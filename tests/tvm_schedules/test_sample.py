"""Greedy sampling on the device (`tvm_schedules/sample.py`): the CPU twin of the argmax kernel against np.argmax
(ties to the first index, a vocabulary smaller than the threads, very negative logits), and the CUDA source it
emits (warp shuffles, one barrier). The CUDA kernel itself runs in apps/cuda/run_dist.py's greedy tokens."""
import numpy as np
import pytest

pytestmark = pytest.mark.tvm


@pytest.mark.parametrize("vocab,threads", [(49152, 1024), (1000, 64), (37, 64)])
def test_argmax_twin_equals_numpy(vocab, threads):
    import tvm
    from edgequant.tvm_schedules.sample import argmax_func
    ex = tvm.compile(tvm.IRModule({"main": argmax_func(vocab, gpu=False, threads=threads)}), target="llvm")
    rng = np.random.default_rng(vocab)
    for trial in range(4):
        x = rng.standard_normal((1, 1, vocab)).astype(np.float32)
        if trial == 1:
            x[0, 0, [5, vocab - 3]] = 99          # a tie: the first index wins
        if trial == 2:
            x[:] = -1e30
            x[0, 0, vocab - 1] = -1e29            # the last slot of a ragged slice
        if trial == 3:
            x = np.round(x).astype(np.float32)    # many ties
        out = tvm.runtime.empty((1,), "int32", tvm.cpu())
        ex["main"](tvm.runtime.tensor(x), out)
        assert out.numpy()[0] == np.argmax(x), trial


def test_argmax_cuda_source_uses_shuffles():
    import tvm
    from edgequant.tvm_schedules.sample import argmax_func
    m = tvm.tirx.build(tvm.IRModule({"main": argmax_func(49152)}),
                       target=tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))
    src = next(x.inspect_source() for x in m.imports if x.kind == "cuda")
    assert src.count("__shfl_down_sync(") >= 10 and src.count("__syncthreads") == 1


def test_argmax_step_twin_copies_the_logits_and_advances():
    """`step=True` (the one-graph decode step's last kernel): the logits copied out, the argmax written into the token
    input, the position advanced by one."""
    import tvm
    from edgequant.tvm_schedules.sample import argmax_func
    ex = tvm.compile(tvm.IRModule({"main": argmax_func(1000, gpu=False, threads=64, step=True)}), target="llvm")
    x = np.random.default_rng(3).standard_normal((1, 1, 1000)).astype(np.float32)
    lo, tok, pos = (tvm.runtime.tensor(a) for a in (np.zeros_like(x), np.array([7], "int32"),
                                                     np.array([41], "int32")))
    ex["main"](tvm.runtime.tensor(x), lo, tok, pos)
    np.testing.assert_array_equal(lo.numpy(), x)
    assert tok.numpy()[0] == np.argmax(x) and pos.numpy()[0] == 42
