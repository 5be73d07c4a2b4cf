"""Per-module schemes (`quantization_config.overrides`) and quantized vocabulary tables (`--embed-bits`): round trips
through the checkpoint, the rebuilt model's logits against the in-memory quantized model, and hostile overrides
refused with one-line errors."""
import json

import pytest
import torch

from edgequant import api
from edgequant.artifact import load_quantized_model, load_quantized_weight, open_checkpoint, save_checkpoint
from edgequant.calibrate.rtn import quantize_rtn
from edgequant.errors import CheckpointError, EdgequantError
from edgequant.quantizer import quantize_weight
from edgequant.schemes import QuantScheme
from edgequant.tables import quantize_tables

from conftest import make_tiny_model

BASE = QuantScheme(4, 32)
MIXED = {"model.layers.0.mlp.down_proj": QuantScheme(2, 32), "model.layers.1.self_attn.o_proj": QuantScheme(3, 16)}


def mixed_checkpoint(tmp_path, tokenizer, arch="llama", tie=False, embed: QuantScheme | None = None):
    """A tiny RTN checkpoint: W4 g32 with two linears on their own schemes, optionally quantized tables.
    Returns (folder, in-memory model with the quantized weights written in, quantized weights)."""
    model = make_tiny_model(arch, tie=tie)
    q, _ = quantize_rtn(model, BASE, progress=False)
    for name, s in MIXED.items():
        q[name] = quantize_weight(model.get_submodule(name).weight.detach(), s)
    if embed is not None:
        q.update(quantize_tables(model, embed))
    out = save_checkpoint(tmp_path / "ck", model, tokenizer, q, BASE, "rtn")
    with torch.no_grad():   # the reference: the same model computing with the dequantized weights, fp16 elsewhere
        for name, p in model.named_parameters():
            p.copy_(p.half().float())
        for name, qw in q.items():
            model.get_submodule(name).weight.copy_(qw.dequantize())
    return out, model, q


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("embed", [None, QuantScheme(8, 32), QuantScheme(4, -1)])
def test_round_trip_with_overrides(tmp_path, tokenizer, tie, embed):
    out, ref, q = mixed_checkpoint(tmp_path, tokenizer, tie=tie, embed=embed)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    want = {**{k: v.to_dict() for k, v in MIXED.items()},
            **({} if embed is None else {n: embed.to_dict() for n in (["model.embed_tokens"] if tie else
                                                                       ["model.embed_tokens", "lm_head"])})}
    assert qc["overrides"] == want
    assert qc["lm_head"] is (embed is not None)
    ck = open_checkpoint(out)
    for name, qw in q.items():
        assert ck.scheme_for(name) == qw.scheme
        back = load_quantized_weight(ck, name)
        assert torch.equal(back.dequantize(), qw.dequantize()), name
    assert ck.scheme_for("model.layers.1.mlp.up_proj") == BASE
    assert (ck.scheme_for("lm_head") is None) == (embed is None)
    if embed is not None:
        assert "model.embed_tokens.weight" not in ck.files and "lm_head.weight" not in ck.files
    model, _ = load_quantized_model(out)
    ids = torch.randint(0, ref.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-4)
    info = api.inspect(out)
    assert info["overrides"]["model.layers.0.mlp.down_proj"] == "w2g32"
    assert (info["tables"] is None) == (embed is None)


def test_no_overrides_keeps_the_config(tmp_path, tokenizer):
    model = make_tiny_model("llama")
    q, _ = quantize_rtn(model, BASE, progress=False)
    out = save_checkpoint(tmp_path / "ck", model, tokenizer, q, BASE, "rtn")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "overrides" not in qc and qc["lm_head"] is False


def test_embed_bits_through_the_api(tmp_path, model_dirs):
    out = api.quantize(str(model_dirs["llama"]), tmp_path / "q", method="rtn", bits=4, group_size=32,
                       embed_bits=8, embed_group_size=32, progress=False)
    ck = open_checkpoint(out)
    assert ck.scheme_for("model.embed_tokens") == QuantScheme(8, 32)
    with pytest.raises(EdgequantError, match="--embed-bits 6"):
        api.quantize(str(model_dirs["llama"]), tmp_path / "q6", method="rtn", embed_bits=6, progress=False)


@pytest.mark.parametrize("edit,match", [
    (lambda qc: qc.update(overrides=[1]), "overrides must be an object"),
    (lambda qc: qc["overrides"].update({"model.layers.9.mlp.down_proj": {"bits": 4, "group_size": 32}}), "no quantized"),
    (lambda qc: qc["overrides"].update({"model.layers.01.mlp.down_proj": {"bits": 4, "group_size": 32}}), "no quantiz"),
    (lambda qc: qc["overrides"].update({"model.norm": {"bits": 4, "group_size": 32}}), "no quantized"),
    (lambda qc: qc["overrides"].update({"model.layers.0.mlp.down_proj": {"bits": 5, "group_size": 32}}), "bits=5"),
    (lambda qc: qc["overrides"].update({"model.layers.0.mlp.down_proj": {"bits": 4}}), "not a scheme"),
    (lambda qc: qc["overrides"].update({"model.layers.0.mlp.down_proj": {"bits": 4, "group_size": 32, "x": 1}}),
     "not a scheme"),
    (lambda qc: qc["overrides"].update({"model.layers.0.mlp.down_proj": {"bits": 3, "group_size": 32}}),
     "shape"),   # the tensors were written at 2 bits
    (lambda qc: qc["overrides"].pop("model.embed_tokens"), "missing|lm_head"),
    (lambda qc: qc.update(lm_head=False), "lm_head"),
])
def test_hostile_overrides_refused(tmp_path, tokenizer, edit, match):
    out, _, _ = mixed_checkpoint(tmp_path, tokenizer, tie=True, embed=QuantScheme(8, 32))
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg["quantization_config"])
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match) as e:
        open_checkpoint(out)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tie", [False, True])
def test_transformers_reads_overrides_and_tables(tmp_path, tokenizer, tie):
    """`from_pretrained` on a checkpoint with per-module schemes and a quantized table gives the eval model's logits."""
    from transformers import AutoModelForCausalLM
    import edgequant  # noqa: F401 - registers the quantizer
    import transformers.quantizers.auto  # noqa: F401 - the registry first (its import hook loads hf_integration)
    from edgequant.hf_integration import EdgequantEmbedding, EdgequantLinear
    out, _, _ = mixed_checkpoint(tmp_path, tokenizer, tie=tie, embed=QuantScheme(4, 32))
    ref, _ = load_quantized_model(out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(hf.model.embed_tokens, EdgequantEmbedding)
    assert hf.model.layers[0].mlp.down_proj.scheme == MIXED["model.layers.0.mlp.down_proj"]
    assert isinstance(hf.lm_head, EdgequantLinear) != tie
    ids = torch.randint(0, ref.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
