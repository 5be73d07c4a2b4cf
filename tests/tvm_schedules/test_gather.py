"""The quantized embedding gather: the compiled kernel against its NumPy reference (bit-exact: one fp32 product, one
rounding to fp16 each), the reference against edgequant's own dequantization, and out-of-range ids clamped."""
import numpy as np
import pytest
import torch

from edgequant.quantizer import QuantizedWeight
from edgequant.schemes import QuantScheme

pytestmark = pytest.mark.tvm

CASES = [  # bits, group, sym, K, layout, zeros packed
    (8, 32, False, 96, "words", False), (8, -1, False, 72, "words", False), (4, 32, False, 96, "words", False),
    (4, 64, True, 200, "words", False), (3, 32, False, 100, "planes3", False), (8, 32, False, 96, "words", True),
    (3, 32, False, 100, "bytes3", False),
]


def _table(rng, bits, group, sym, k, layout, zeros_packed, n=50):
    from conftest import random_quantized_linear
    from edgequant.tvm_schedules.dequant import pack_zeros_np
    spec, q, qweight, scales, zeros = random_quantized_linear(rng, bits, group, sym, n, k, layout, zeros_packed)
    ref = QuantizedWeight(torch.from_numpy(q).float(), torch.from_numpy(scales).float(),
                          torch.full((n, spec.n_groups), float(spec.sym_zero)) if sym else
                          torch.from_numpy(zeros).float(), QuantScheme(bits, group, sym)).dequantize().numpy()
    if zeros_packed:
        zeros = pack_zeros_np(zeros)
    return spec, qweight, scales, zeros, ref

@pytest.mark.parametrize("bits,group,sym,k,layout,zp", CASES)
def test_gather_kernel_matches_numpy(bits, group, sym, k, layout, zp):
    import tvm
    from edgequant.tvm_schedules.gather import gather_dequantize_func, gather_dequantize_np
    rng = np.random.default_rng(bits + k)
    spec, qweight, scales, zeros, ref = _table(rng, bits, group, sym, k, layout, zp)
    ids = np.array([3, 0, 49, 3, 17, -7, 50, 10 ** 6], np.int32)   # repeats and out-of-range ids (clamped)
    want = gather_dequantize_np(spec, ids, qweight, scales, zeros)
    np.testing.assert_array_equal(want, ref[np.clip(ids, 0, 49)].astype(np.float16))
    ex = tvm.compile(tvm.IRModule({"main": gather_dequantize_func(spec)}), target="llvm")
    out = tvm.runtime.empty((len(ids), k), "float16", tvm.cpu())
    ex["main"](*[tvm.runtime.tensor(a) for a in [ids, qweight, scales] + ([] if sym else [zeros])], out)
    np.testing.assert_array_equal(out.numpy(), want)
