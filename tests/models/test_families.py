"""Qwen3, Llama 3.x and Phi-3 on tiny random configs (tests/tiny_families.py) through the PyTorch side: the family's
shapes are transformers' shapes; the model rebuilt from an RTN checkpoint is transformers' model with the checkpoint's
values (exactly) and the original to the quantization error; every calibration method writes a checkpoint that loads
and stays close to the original; OWQ's weak columns follow the fused linears' ratios; LET is an equivalence before
training (and the q/k pair left out of Qwen3 would not be); OmniQuant with LWC and LET fuses into a checkpoint that
computes what the trained model computes; inspect and eval read the checkpoints."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgequant import api
from edgequant.artifact import load_quantized_model, open_checkpoint
from edgequant.models import family_for

from conftest import VOCAB, assert_fused_checkpoint_equals_live, make_tiny_model, round_like_rtn_checkpoint
from tiny_families import FAMILY_ARCHS

MODEL_TYPE = {"llama3": "llama", "qwen3": "qwen3", "phi3": "phi3"}


def make_model(arch, seed=0):
    """A tiny model whose norms (q/k norms included) are not all ones, so a misplaced norm weight shows."""
    model = make_tiny_model(arch, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer):
    out = {}
    for arch in FAMILY_ARCHS:
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        make_model(arch).save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[arch] = d
    return out


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _ids(n=2, s=24, seed=0):
    return torch.randint(0, VOCAB, (n, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_family_shapes_are_transformers_shapes(arch):
    model = make_model(arch)
    fam = family_for(model.config.model_type)
    assert model.config.model_type == MODEL_TYPE[arch]
    params = dict(model.named_parameters())
    pre = fam.layer_prefix(1)
    for rel, nk in fam.linear_shapes(model.config.to_dict()).items():
        assert tuple(params[f"{pre}.{rel}.weight"].shape) == nk
        assert f"{pre}.{rel}.bias" not in params          # none of these families has linear biases
    for rel, n in fam.norm_shapes(model.config).items():
        assert tuple(params[f"{pre}.{rel}.weight"].shape) == (n,)
    block = {n.rsplit(".", 1)[0] for n in params if n.startswith(pre + ".") and n.endswith(".weight")}
    covered = {f"{pre}.{n}" for n in fam.linear_names} | {f"{pre}.{n}" for n in fam.norm_shapes(model.config)}
    assert block == covered          # every weight of a block is a linear or a norm the family names


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_rtn_checkpoint_rebuilds_transformers_model(arch, family_dirs, tmp_path):
    from edgequant.schemes import QuantScheme
    orig = make_model(arch)
    fam = family_for(orig.config.model_type)
    ids = _ids()
    with torch.no_grad():
        want = orig(ids).logits
    errs = {}
    for bits in (4, 3, 2):
        ck = api.quantize(str(family_dirs[arch]), tmp_path / f"w{bits}", method="rtn", bits=bits, group_size=32,
                          progress=False)
        rebuilt, _ = load_quantized_model(ck)
        expect = round_like_rtn_checkpoint(copy.deepcopy(orig), fam, QuantScheme(bits, 32))   # the checkpoint's values
        with torch.no_grad():
            got = dict(rebuilt.named_parameters())
            for name, p in expect.named_parameters():
                torch.testing.assert_close(got[name], p, rtol=0, atol=0, msg=name)
            torch.testing.assert_close(rebuilt(ids).logits, expect(ids).logits, rtol=1e-5, atol=1e-5)
            errs[bits] = _rel(rebuilt(ids).logits, want)
    print(f"\n{arch}: rebuilt vs transformers, max |d logits| / max |logits|: {errs}")
    # to the quantization error, larger at fewer bits (the tiny random models' small logits make the relative error
    # large: LLaMA's own tiny config measures 0.29 / 0.52 / 1.07 at 4 / 3 / 2 bits)
    assert 0 < errs[4] < errs[3] < errs[2] and errs[4] < 0.5


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
# OmniQuant (LWC + LET) runs below through calibrate_omniquant, its checkpoint compared with the trained model
@pytest.mark.parametrize("method,opts", [("gptq", {}), ("owq", {"target_bits": 4.3})])
def test_every_method_writes_a_close_checkpoint(arch, method, opts, family_dirs, text_file, tokenizer, tmp_path):
    ck = api.quantize(str(family_dirs[arch]), tmp_path / method, method=method, bits=4, group_size=32,
                      calib=text_file, nsamples=4, seqlen=32, progress=False, **opts)
    model, _ = load_quantized_model(ck)
    text = open(text_file).read()[50000:60000]
    ids = torch.tensor(tokenizer(text)["input_ids"][:128]).reshape(2, 64)   # text, not the calibration windows
    with torch.no_grad():
        err = _rel(model(ids).logits, make_model(arch)(ids).logits)
    # on these tiny random models W4 g32 moves the small logits a lot whatever the method: on such text RTN measured
    # 0.28-0.33, GPTQ 0.32-0.33, OWQ 0.29-0.45 for llama, qwen3 and phi3 (4 calibration windows of 32 tokens)
    assert err < 0.6, err
    info = api.inspect(ck)
    assert info["model_type"] == MODEL_TYPE[arch] and info["method"].startswith(method)
    # transformers' own loader (edgequant's registered quantizer) computes the same model
    import edgequant  # noqa: F401 - registers the quantizer
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    if method == "owq":   # OWQ's budget rule per (fused) linear, with the family's ratios
        from edgequant.calibrate.owq import weak_column_counts
        fam = family_for(MODEL_TYPE[arch])
        counts = {fam.relative_name(n): c for n, c in info["outlier_columns"].items() if ".layers.0." in n}
        k = {n: nk[1] for n, nk in fam.linear_shapes(model.config).items()}
        assert counts == weak_column_counts(fam, k, 4, 4.3)
        assert counts[fam.linear_names[0]] > counts[next(n for n in fam.linear_names if "gate" in n)] > 0


def test_owq_fused_linears_get_their_parts_columns():
    """Phi-3's qkv_proj and gate_up_proj get the weak columns LLaMA's q_proj and gate_proj get for the same shapes
    (one column set serves every part's rows), so both families spend the same budget."""
    from edgequant.calibrate.owq import weak_column_counts
    llama, phi3 = family_for("llama"), family_for("phi3")
    k = {"hidden": 3072, "q": 3072, "intermediate": 8192}
    want = weak_column_counts(llama, {lin.name: k[lin.inp] for lin in llama.linears}, 3, 3.1)
    got = weak_column_counts(phi3, {lin.name: k[lin.inp] for lin in phi3.linears}, 3, 3.1)
    assert got == {"self_attn.qkv_proj": want["self_attn.q_proj"], "self_attn.o_proj": want["self_attn.o_proj"],
                   "mlp.gate_up_proj": want["mlp.gate_proj"], "mlp.down_proj": want["mlp.down_proj"]}
    assert want["self_attn.q_proj"] > want["mlp.gate_proj"] > 0


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_let_is_an_equivalence(arch):
    from edgequant.calibrate.blocks import capture_first_block_inputs
    from edgequant.calibrate.omniquant import OmniBlock, OmniConfig
    from edgequant.schemes import QuantScheme
    model = make_model(arch)
    block = model.model.layers[0]
    x = capture_first_block_inputs(model, model.model.layers, _ids())
    ob = OmniBlock(block, model.config, QuantScheme(3, 32), OmniConfig(let=True))
    expected = {"llama3": {"qkv", "fc1", "vo", "qk", "down"}, "qwen3": {"qkv", "fc1", "vo", "down"},
                "phi3": {"qkv", "fc1"}}[arch]
    assert set(ob.let.log_scales) == expected and not ob.let.shifts   # no biases: no shifts
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ob.let.log_scales.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    eff = ob.effective(quant=False, fp16_plain=False)
    assert not torch.allclose(eff["input_layernorm.weight"], block.input_layernorm.weight)
    out = torch.func.functional_call(block, eff, (x.hidden,), x.kwargs, strict=False)
    torch.testing.assert_close(out, block(x.hidden, **x.kwargs), rtol=1e-4, atol=1e-5)


def test_qwen3_qk_pair_would_break_the_equivalence():
    """Why Qwen3 declares no q/k pair: LLaMA's rope_qk algebra (q rows * s, k rows / s) on a Qwen3 block changes its
    output, since the per-head RMSNorms undo the row scales before RoPE."""
    from edgequant.calibrate.blocks import capture_first_block_inputs
    from edgequant.calibrate.omniquant import OmniBlock, OmniConfig
    from edgequant.calibrate.omniquant.let import LET
    from edgequant.models import Dims
    from edgequant.schemes import QuantScheme
    model = make_model("qwen3")
    block = model.model.layers[0]
    x = capture_first_block_inputs(model, model.model.layers, _ids())
    ob = OmniBlock(block, model.config, QuantScheme(3, 32), OmniConfig(let=True))
    ob.let = LET(family_for("llama"), Dims.from_config(model.config), ("qk",))
    with torch.no_grad():
        ob.let.log_scales["qk"].copy_(torch.randn(ob.let.log_scales["qk"].shape,
                                                  generator=torch.Generator().manual_seed(2)) * 0.7)
    out = torch.func.functional_call(block, ob.effective(quant=False, fp16_plain=False), (x.hidden,), x.kwargs,
                                     strict=False)
    assert not torch.allclose(out, block(x.hidden, **x.kwargs), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_omniquant_lwc_let_checkpoint_equals_live_model(arch, tmp_path, tokenizer):
    from edgequant.calibrate.omniquant import OmniConfig, calibrate_omniquant
    from edgequant.schemes import QuantScheme
    samples = _ids(4, 32, seed=5)
    scheme = QuantScheme(3, 32)
    model, live_model = make_model(arch), make_model(arch)
    cfg = OmniConfig(epochs=1, let=True, batch_size=2, lwc_lr=5e-2, let_lr=1e-2)
    q, _, _, live = calibrate_omniquant(model, samples, scheme, cfg, progress=False, keep_live=True)
    fused = assert_fused_checkpoint_equals_live(tmp_path, tokenizer, live_model, model, q, scheme, live, samples)
    assert not torch.equal(fused.model.layers[0].input_layernorm.weight,
                           make_model(arch).model.layers[0].input_layernorm.weight.half().float())


def test_eval_reads_family_checkpoints(family_dirs, text_file, tmp_path):
    ck = api.quantize(str(family_dirs["qwen3"]), tmp_path / "q", method="rtn", bits=4, group_size=32,
                      progress=False)
    res = api.evaluate(ck, text_file, seqlen=32, max_windows=2, reference=str(family_dirs["qwen3"]), progress=False)
    assert np.isfinite(res["perplexity"]) and res["top1_agreement"] > 0.5
    assert open_checkpoint(ck).family.name == "qwen3"


def test_help_and_unsupported_error_name_the_families(tmp_path, family_dirs):
    import json
    import shutil

    from click.testing import CliRunner

    from edgequant.cli import main
    r = CliRunner().invoke(main, ["quantize", "--help"])
    assert r.exit_code == 0 and "llama, mistral, phi3, qwen2, qwen3" in " ".join(r.output.split())
    m = tmp_path / "gpt2"
    shutil.copytree(family_dirs["qwen3"], m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (m / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["quantize", str(m), "-o", str(tmp_path / "out"), "--method", "rtn"])
    lines = [ln for ln in r.output.strip().splitlines() if ln]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert all(t in lines[0] for t in ("gpt_neox", "llama", "mistral", "qwen2", "qwen3", "phi3"))
    assert not (tmp_path / "out").exists()


def test_gguf_files_load_as_their_models(tmp_path, tokenizer):
    """A Qwen3 GGUF loads with its own head_dim (32 here; transformers' reader alone would build 128) and computes
    what the model does; a Phi-3 GGUF without longrope factors loads as the model with plain RoPE (what such a file
    means); one with longrope factors is refused, since transformers' reader would drop them."""
    from edgequant.errors import EdgequantError
    from edgequant.loading import load_model
    from tiny_families import write_gguf
    ids = _ids(1, 20)
    qwen3 = make_model("qwen3")
    write_gguf(qwen3, tokenizer, tmp_path / "qwen3.gguf")
    m, tok = load_model(tmp_path / "qwen3.gguf")
    assert m.config.head_dim == 32 and tok("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, qwen3(ids).logits, rtol=0, atol=1e-6)
    phi3 = make_model("phi3")
    phi3.config.rope_parameters = {"rope_type": "default", "rope_theta": phi3.config.rope_parameters["rope_theta"]}
    plain = type(phi3)(phi3.config).eval()
    plain.load_state_dict(phi3.state_dict())
    write_gguf(plain, tokenizer, tmp_path / "phi3.gguf")
    m, _ = load_model(tmp_path / "phi3.gguf")
    assert family_for(m.config.model_type).name == "phi3"
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, plain(ids).logits, rtol=0, atol=1e-6)
    write_gguf(plain, tokenizer, tmp_path / "phi35.gguf", rope_factors=True)
    with pytest.raises(EdgequantError, match="longrope factors"):
        load_model(tmp_path / "phi35.gguf")


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("flags", [{}, {"attention_bias": True}, {"mlp_bias": True}])
def test_biased_linears_are_transformers_biases(model_type, flags):
    """`Family.biased_linears` (what export and the model-folder check expect) against the biases transformers'
    model has for the same config: Phi-3 ignores attention_bias (a phi3 folder with it set and no biases was refused
    as a model folder, but loaded as a checkpoint; eleventh hostile re-run, S33), Qwen2's q/k/v always have one."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0,
                               **flags)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    family = family_for(model_type)
    modules = dict(model.named_modules())
    pre = family.layer_prefix(0)
    have = {lin for lin in family.linear_names if modules[f"{pre}.{lin}"].bias is not None}
    assert family.biased_linears({"model_type": model_type, **flags}) == have


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_gemma_layer_kinds_are_transformers_defaults(model_type):
    """Without layer_types in config.json, the kinds transformers' config fills in (Gemma 3: every
    `sliding_window_pattern`-th layer full, 6 by default): export used Gemma 2's alternation for Gemma 3 (fourteenth
    re-run, S38); and sliding layers without a window are refused for every command (S37: quantize wrote a
    checkpoint eval could not run)."""
    from pathlib import Path

    from transformers import AutoConfig

    from edgequant.checkpoint import check_model_config
    from edgequant.errors import EdgequantError
    for n in (1, 3, 7, 13):
        for pattern in ((None, 1, 3) if model_type == "gemma3_text" else (None,)):
            extra = {} if pattern is None else {"sliding_window_pattern": pattern}
            want = AutoConfig.for_model(model_type, num_hidden_layers=n, **extra).layer_types
            assert family_for(model_type).layer_types({"model_type": model_type, "num_hidden_layers": n,
                                                       **extra}) == want
    cfg = AutoConfig.for_model(model_type, num_hidden_layers=3, hidden_size=64, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, intermediate_size=96, vocab_size=100).to_dict()
    check_model_config(Path("config.json"), cfg)
    with pytest.raises(EdgequantError, match="need a positive 'sliding_window'"):
        check_model_config(Path("config.json"), {**cfg, "sliding_window": None})
    check_model_config(Path("config.json"), {**cfg, "sliding_window": None, "layer_types": ["full_attention"] * 3})
