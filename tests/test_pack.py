import numpy as np
import pytest
import torch

from edgequant import pack
from edgequant.quantizer import QuantizedWeight, expand_groups, group_minmax, quantize_weight
from edgequant.schemes import QuantScheme


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k", [1, 7, 10, 16, 64, 576, 1000])
def test_pack_unpack_round_trip(bits, k):
    rng = np.random.default_rng(bits * 1000 + k)
    q = rng.integers(0, 1 << bits, size=(5, k), dtype=np.uint8)
    packed = pack.pack(q, bits)
    assert packed.dtype == np.uint32
    assert packed.shape == (5, -(-k // (32 // bits)))
    np.testing.assert_array_equal(pack.unpack(packed, bits, k), q)


def test_pack_is_lsb_first_along_k():
    q = np.array([[1, 2, 3, 0, 0, 0, 0, 0, 15]], np.uint8)
    p = pack.pack(q, 4)
    assert p[0, 0] == 1 | (2 << 4) | (3 << 8)
    assert p[0, 1] == 15
    q3 = np.array([[7] * 10 + [5]], np.uint8)
    p3 = pack.pack(q3, 3)
    assert p3[0, 0] == (1 << 30) - 1 and p3[0, 1] == 5  # 10 values fill 30 bits; the top two stay zero


def test_pack_rejects_values_that_do_not_fit():
    with pytest.raises(ValueError):
        pack.pack(np.array([[4]]), 2)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("k", [576, 100, 1536])
@pytest.mark.parametrize("sym", [False, True])
def test_quantize_pack_dequantize_round_trip(bits, group_size, k, sym):
    """Quantize, pack, unpack, dequantize: integers survive exactly, including a ragged last group."""
    s = QuantScheme(bits, group_size, sym)
    w = torch.randn(6, k)
    qw = quantize_weight(w, s)
    assert qw.scale.shape == (6, s.groups(k))
    q2 = torch.from_numpy(pack.unpack(pack.pack(qw.q.long(), bits), bits, k).astype(np.int64))
    assert torch.equal(q2, qw.q.long())
    again = QuantizedWeight(q2, qw.scale.half().float(), qw.zero.to(torch.uint8).float() if not sym else qw.zero, s)
    assert torch.equal(again.dequantize(), qw.dequantize())
    # scales are exactly fp16-representable and zero points integers in range
    assert torch.equal(qw.scale, qw.scale.half().float())
    assert torch.all(qw.zero == qw.zero.round()) and qw.zero.min() >= 0 and qw.zero.max() <= s.maxq
    # the error of round-to-nearest is at most half a step inside the clipping range
    err = (w - qw.dequantize()).abs()
    step = expand_groups(qw.scale, s, k)
    inside = (qw.q > 0) & (qw.q < s.maxq)
    assert torch.all(err[inside] <= step[inside] * 0.5 + 1e-6)


def test_ragged_last_group_uses_its_own_range():
    s = QuantScheme(4, 128)
    w = torch.zeros(1, 576)
    w[0, 512:] = torch.linspace(-10, 10, 64)   # only the ragged last group (64 values) is non-zero
    mn, mx = group_minmax(w, s)
    assert mn.shape == (1, 5)
    assert mn[0, 4] == -10 and mx[0, 4] == 10 and mx[0, :4].abs().sum() == 0
