"""GPTQ against round-to-nearest on the same layer, and the mechanics GPTQ's later users rely on."""
import pytest
import torch

from edgequant.calibrate.gptq import gptq_quantize
from edgequant.quantizer import quantize_weight
from edgequant.schemes import QuantScheme


def _layer(n=96, k=192, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mix          # correlated inputs, as real activations are
    x[:, :4] *= 8                                          # a few large channels
    w = torch.randn(n, k, generator=g) * 0.05
    H = 2 * x.T @ x / tokens
    return w, x, H


def _out_err(w, w_hat, x):
    return float(((x @ (w - w_hat).T) ** 2).mean())


@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 64), (2, 32), (3, -1), (4, 128)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn(bits, group_size, act_order):
    w, x, H = _layer()
    s = QuantScheme(bits, group_size)
    rtn = quantize_weight(w, s).dequantize()
    qw, loss = gptq_quantize(w, H, s, act_order=act_order)
    gq = qw.dequantize()
    assert loss > 0
    assert _out_err(w, gq, x) < 0.9 * _out_err(w, rtn, x)
    # what GPTQ returns is storable: integers in range, fp16 scales, integer zeros
    assert qw.q.min() >= 0 and qw.q.max() <= s.maxq and torch.equal(qw.q, qw.q.round())
    assert torch.equal(qw.scale, qw.scale.half().float()) and torch.equal(qw.zero, qw.zero.round())


def test_gptq_ragged_groups():
    w, x, H = _layer(k=200)   # groups of 64: 64, 64, 64, 8
    s = QuantScheme(3, 64)
    qw, _ = gptq_quantize(w, H, s)
    assert qw.scale.shape == (96, 4)
    assert _out_err(w, qw.dequantize(), x) < _out_err(w, quantize_weight(w, s).dequantize(), x)


def test_kept_columns_are_exact_and_absorb_updates():
    w, x, H = _layer()
    s = QuantScheme(3, 64)
    keep = torch.tensor([0, 1, 2, 3, 50])
    qw, _ = gptq_quantize(w, H, s, keep=keep)
    assert torch.equal(qw.outlier_idx, keep)
    assert torch.all(qw.q[:, keep] == qw.zero[:, keep // 64])     # quantized part is zero at kept columns
    deq = qw.dequantize()
    assert torch.equal(deq[:, keep], qw.outlier_weight)
    # the kept columns carry compensation, so they differ from the original weights, and the output is better
    assert not torch.allclose(qw.outlier_weight, w[:, keep])
    plain, _ = gptq_quantize(w, H, s)
    assert _out_err(w, deq, x) < _out_err(w, plain.dequantize(), x)


def test_dead_inputs_do_not_break_cholesky():
    w, x, H = _layer()
    H[5, :] = 0
    H[:, 5] = 0
    qw, _ = gptq_quantize(w, H, QuantScheme(4, 64))
    assert torch.isfinite(qw.dequantize()).all()


def test_hessian_collector_can_skip_leading_tokens():
    from edgequant.calibrate.blocks import HessianCollector
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(2, 10, 8)
    x[:, 0] *= 1000                        # an attention-sink-like first token
    full, skip = HessianCollector(lin), HessianCollector(lin, skip_tokens=1, first_token=True)
    lin(x[:1])
    lin(x[1:])                             # two batches: H_first is the mean over every window's first token
    Hf, Hs = full.remove(), skip.remove()
    rest = x[:, 1:].reshape(-1, 8)
    torch.testing.assert_close(Hs, 2 * rest.T @ rest / rest.shape[0])
    # entries ~1e6 from the 1000x token: fp32 sums in another order differ in the last bits
    torch.testing.assert_close(skip.H_first, 2 * x[:, 0].T @ x[:, 0] / 2, rtol=1e-5, atol=1e-3)
    assert full.H_first is None
    assert Hf.diagonal().mean() > 100 * Hs.diagonal().mean()
