"""Gemma 2 and Gemma 3 (text) through the PyTorch half of the journey, on tiny random configs (tests/gemma_tiny.py):
the family's shapes are transformers' shapes; calibration feeds every block its own mask and RoPE table (sliding
vs global layers, Gemma 3's local RoPE base); the checkpoint rebuilds exactly what was quantized; every method's
rebuilt model stays within quantization error of transformers' model; LET is an equivalence before training, and
OmniQuant's fused checkpoint computes what its live blocks computed."""
from __future__ import annotations

import pytest
import torch

from edgequant.models import family_for

from conftest import VOCAB, assert_fused_checkpoint_equals_live, round_like_rtn_checkpoint
from gemma_tiny import GEMMA_ARCHS, SLIDING_WINDOW, make_tiny_gemma

SEQ = SLIDING_WINDOW + 12   # calibration windows and prompts run past the sliding window


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", GEMMA_ARCHS)
def test_family_shapes_are_transformers_shapes(arch):
    model = make_tiny_gemma(arch)
    fam = family_for(arch)
    mods = dict(model.named_modules())
    for name, (n, k) in fam.linear_shapes(model.config).items():
        lin = mods[f"{fam.layer_prefix(1)}.{name}"]
        assert (lin.out_features, lin.in_features) == (n, k), name
    for name, dim in fam.norm_shapes(model.config).items():
        assert mods[f"{fam.layer_prefix(1)}.{name}"].weight.shape == (dim,), name
    assert fam.norm_weight_offset == 1.0


@pytest.mark.parametrize("arch", GEMMA_ARCHS)
def test_each_block_gets_its_own_mask_and_rope(arch):
    """Blocks run one by one on the captured inputs reproduce the model's hidden states past the sliding window:
    a global layer fed the sliding layer's mask (or Gemma 3's local RoPE table) would not."""
    from edgequant.calibrate.blocks import capture_first_block_inputs
    model = make_tiny_gemma(arch)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    x = capture_first_block_inputs(model, model.model.layers, ids)
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states
        h = x.hidden
        for i, block in enumerate(model.model.layers[:-1]):   # the last hidden state is after the final norm
            h = block(h, **x.use_layer(i))
            torch.testing.assert_close(h, want[i + 1], rtol=1e-5, atol=1e-5)
        wrong = model.model.layers[1](want[1], **x.layer_kwargs[0])   # global layer with the sliding one's kwargs
    assert _rel(wrong, want[2]) > 1e-3


@pytest.mark.parametrize("arch", GEMMA_ARCHS)
def test_rtn_checkpoint_rebuilds_exactly_what_was_quantized(arch, tmp_path, tokenizer):
    from edgequant import api
    from edgequant.artifact import load_quantized_model
    from edgequant.schemes import QuantScheme
    fam = family_for(arch)
    orig = make_tiny_gemma(arch)
    orig.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    ck = api.quantize(str(tmp_path / "hf"), str(tmp_path / "q"), method="rtn", bits=4, group_size=32, progress=False)
    rebuilt, ckpt = load_quantized_model(ck)
    assert ckpt.family is fam
    expect = round_like_rtn_checkpoint(make_tiny_gemma(arch), fam, QuantScheme(4, 32))
    got = dict(rebuilt.named_parameters())
    for name, p in expect.named_parameters():
        torch.testing.assert_close(got[name], p, rtol=0, atol=0, msg=name)
    ids = torch.randint(0, VOCAB, (1, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, expect(ids).logits, rtol=1e-5, atol=1e-5)   # sdpa vs eager attention
        assert 1e-4 < _rel(rebuilt(ids).logits, orig(ids).logits) < 0.5   # W4 g32 on random weights: ~0.3


# GPTQ runs inside OWQ, so OWQ on one family and GPTQ on the other cover both paths (default-test time)
@pytest.mark.parametrize("arch,method,opts", [
    ("gemma2", "owq", {"weak_columns": 2}), ("gemma3_text", "gptq", {}),
    ("gemma2", "omniquant", {"let": True, "epochs": 1}), ("gemma3_text", "omniquant", {"let": True, "epochs": 1}),
], ids=["gemma2-owq", "gemma3-gptq", "gemma2-omniquant-lwc-let", "gemma3-omniquant-lwc-let"])
def test_every_method_stays_within_quantization_error(arch, method, opts, tmp_path, tokenizer, text_file):
    from edgequant import api
    from edgequant.artifact import load_quantized_model
    from edgequant.checkpoint import inspect
    orig = make_tiny_gemma(arch)
    orig.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    ck = api.quantize(str(tmp_path / "hf"), str(tmp_path / "q"), method=method, bits=4, group_size=32,
                      calib=text_file, nsamples=4, seqlen=SEQ, progress=False, **opts)
    rtn = api.quantize(str(tmp_path / "hf"), str(tmp_path / "rtn"), method="rtn", bits=4, group_size=32,
                       progress=False)
    rebuilt, ckpt = load_quantized_model(ck)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = orig(ids).logits
        err = float((rebuilt(ids).logits - want).norm() / want.norm())
        rtn_err = float((load_quantized_model(rtn)[0](ids).logits - want).norm() / want.norm())
    print(f"\n{arch} {method}: |rebuilt - hf| / |hf| logits {err:.3f} (RTN {rtn_err:.3f})")
    assert 0 < err < 1.5 * rtn_err
    if method == "owq":
        assert all(f"{n}.outlier_idx" in ckpt.files for n in ckpt.quantized_linears())
    info = inspect(ck)
    assert info["model_type"] == arch
    res = api.evaluate(ck, text_file, seqlen=SEQ, max_windows=1, progress=False)
    assert res["perplexity"] > 1


def _let_block_io(arch, layer):
    from edgequant.calibrate.blocks import capture_first_block_inputs
    model = make_tiny_gemma(arch)
    x = capture_first_block_inputs(model, model.model.layers, torch.randint(0, VOCAB, (2, SEQ)))
    return model, model.model.layers[layer], x.use_layer(layer), x.hidden


@pytest.mark.parametrize("arch,pairs", [("gemma2", {"qkv", "fc1", "vo", "qk", "down"}),
                                        ("gemma3_text", {"qkv", "fc1", "vo", "down"})])
@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "global"])
def test_let_is_an_equivalence(arch, pairs, layer):
    from edgequant.calibrate.omniquant import OmniBlock, OmniConfig
    from edgequant.schemes import QuantScheme
    model, block, kw, h = _let_block_io(arch, layer)
    ob = OmniBlock(block, model.config, QuantScheme(3, 32), OmniConfig(let=True))
    assert set(ob.let.log_scales) == pairs
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ob.let.log_scales.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        ref = block(h, **kw)
        eff = ob.effective(quant=False, fp16_plain=False)
        for norm in ("input_layernorm", "pre_feedforward_layernorm"):   # really transformed, through (1 + w)
            assert not torch.allclose(eff[f"{norm}.weight"], getattr(block, norm).weight)
        out = torch.func.functional_call(block, eff, (h,), kw, strict=False)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_gemma3_qk_pair_would_not_be_exact():
    """Why Gemma 3 has no qk pair: q_norm/k_norm renormalise each head, so scaling q_proj's rows changes the block."""
    from dataclasses import replace
    from edgequant.calibrate.omniquant import LET
    from edgequant.models import Dims, LetPair
    model, block, kw, h = _let_block_io("gemma3_text", 1)
    fam = family_for("gemma3_text")
    with_qk = replace(fam, let_pairs=fam.let_pairs + (LetPair("qk", "rope_qk", "self_attn.k_proj",
                                                              ("self_attn.q_proj",)),))
    let = LET(with_qk, Dims.from_config(model.config), pairs=["qk"])
    with torch.no_grad():
        let.log_scales["qk"].copy_(torch.randn(let.log_scales["qk"].shape, generator=torch.Generator().manual_seed(2)))
        params = {k: v for k, v in block.named_parameters()}
        out = torch.func.functional_call(block, let.transform(params), (h,), kw, strict=False)
        assert _rel(out, block(h, **kw)) > 1e-3


@pytest.mark.parametrize("arch", GEMMA_ARCHS)
def test_omniquant_let_fuses_into_the_checkpoint(arch, tmp_path, tokenizer):
    from edgequant.calibrate.omniquant import OmniConfig, calibrate_omniquant
    from edgequant.schemes import QuantScheme
    model, scheme = make_tiny_gemma(arch), QuantScheme(3, 32)
    samples = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(3))
    quantized, _, _, live = calibrate_omniquant(model, samples, scheme, OmniConfig(let=True, epochs=1),
                                                progress=False, keep_live=True)
    assert_fused_checkpoint_equals_live(tmp_path, tokenizer, make_tiny_gemma(arch), model, quantized, scheme, live,
                                        samples)


def test_quantize_help_names_the_gemma_families():
    from click.testing import CliRunner
    from edgequant.cli import main
    out = CliRunner().invoke(main, ["quantize", "--help"]).output
    assert "gemma2" in out and "gemma3_text" in out and "llama" in out
