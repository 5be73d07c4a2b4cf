"""LWC and LET math on their own: LWC fake quantization is exactly what the checkpoint stores; LET (with GQA, RoPE and
Qwen2 biases/shifts) leaves a full-precision block's output unchanged."""
import pytest
import torch

from edgequant.calibrate.blocks import capture_first_block_inputs
from edgequant.calibrate.omniquant import LET, LWC, OmniBlock, OmniConfig
from edgequant.calibrate.omniquant.lwc import search_clip_init
from edgequant.models import Dims, family_for
from edgequant.quantizer import quantize_weight
from edgequant.schemes import QuantScheme

from conftest import make_tiny_model


@pytest.mark.parametrize("bits,group_size,sym", [(3, 64, False), (2, 32, False), (4, -1, False), (3, 64, True)])
def test_lwc_forward_is_what_the_checkpoint_stores(bits, group_size, sym):
    torch.manual_seed(0)
    w = torch.randn(24, 200) * 0.05       # K=200 with G=64 leaves a ragged last group of 8
    s = QuantScheme(bits, group_size, sym)
    lwc = LWC(24, 200, s, init=4.0)
    with torch.no_grad():
        lwc.upper.uniform_(0.0, 4.0)
        if lwc.lower is not None:
            lwc.lower.uniform_(0.0, 4.0)
    w_hat = lwc(w)
    scale, zero = lwc.params(w)
    qw = quantize_weight(w, s, scale.detach(), zero.detach())
    assert torch.equal(w_hat.detach(), qw.dequantize())      # bit-identical, not just close
    assert torch.equal(qw.scale, qw.scale.half().float()) and torch.equal(qw.zero, qw.zero.round())
    assert qw.zero.min() >= 0 and qw.zero.max() <= s.maxq
    # gradients reach the clipping strengths (straight-through rounding)
    w_hat.pow(2).sum().backward()
    assert lwc.upper.grad is not None and lwc.upper.grad.abs().sum() > 0
    if not sym:
        assert lwc.lower.grad.abs().sum() > 0


def test_lwc_without_learning_is_rtn_and_clipping_helps():
    torch.manual_seed(0)
    w = torch.randn(32, 256) * 0.05
    w[:, 3] *= 12                           # an outlier column: clipping pays off
    s = QuantScheme(3, 128)
    assert torch.equal(LWC(32, 256, s, learn=False)(w), quantize_weight(w, s).dequantize())
    lwc = LWC(32, 256, s)
    search_clip_init(lwc, w)
    err = lambda a: float(((w - a) ** 2).sum())  # noqa: E731
    assert err(lwc(w).detach()) < err(quantize_weight(w, s).dequantize())


def _block_io(arch):
    model = make_tiny_model(arch)
    layers = model.model.layers
    x = capture_first_block_inputs(model, layers, torch.randint(0, 320, (2, 24)))
    return model, layers[0], x


def _random_let(ob, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ob.let.log_scales.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        for p in ob.let.shifts.values():
            p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_let_is_an_equivalence_with_gqa_and_rope(arch):
    model, block, x = _block_io(arch)
    cfg = OmniConfig(let=True)
    ob = OmniBlock(block, model.config, QuantScheme(3, 32), cfg)
    sh = Dims.from_config(model.config)
    assert sh.kv_heads < sh.heads                         # the tiny models use grouped-query attention
    assert (len(ob.let.shifts) > 0) == (arch == "qwen2")  # shifts only where biases can carry them
    _random_let(ob)
    ref = block(x.hidden, **x.kwargs)
    eff = ob.effective(quant=False, fp16_plain=False)
    assert not torch.allclose(eff["input_layernorm.weight"], block.input_layernorm.weight)   # really transformed
    out = torch.func.functional_call(block, eff, (x.hidden,), x.kwargs, strict=False)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_let_rope_pairing_is_needed():
    """Control: q/k scales that differ on the two channels RoPE rotates together break the equivalence."""
    model, block, x = _block_io("llama")
    ob = OmniBlock(block, model.config, QuantScheme(3, 32), OmniConfig(let=True, let_pairs=("qk",)))
    g = torch.Generator().manual_seed(3)
    unpaired = torch.exp(torch.randn(ob.let.dims.kv, generator=g) * 0.7)
    ob.let.qk_full = lambda _pair: unpaired
    out = torch.func.functional_call(block, ob.effective(quant=False, fp16_plain=False), (x.hidden,), x.kwargs,
                                     strict=False)
    assert not torch.allclose(out, block(x.hidden, **x.kwargs), rtol=1e-3, atol=1e-4)


def test_let_gqa_vo_scale_has_one_value_per_kv_channel():
    model, block, _ = _block_io("mistral")
    let = LET(family_for("mistral"), Dims.from_config(model.config))
    sh = let.dims
    assert let.log_scales["vo"].numel() == sh.kv_heads * sh.head_dim
    assert let.log_scales["qk"].numel() == sh.kv_heads * sh.head_dim // 2
    with torch.no_grad():
        let.log_scales["vo"].copy_(torch.arange(sh.kv_heads * sh.head_dim).float() / 100)
    per_q = let.input_scale("self_attn.o_proj").reshape(sh.heads, sh.head_dim)
    for h in range(sh.heads):   # each query head's o columns use the scale of the kv head it reads
        assert torch.equal(per_q[h], let.scale("vo").reshape(sh.kv_heads, sh.head_dim)[h // sh.n_rep])
