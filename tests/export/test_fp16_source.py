"""An fp16 export reads the model folder's safetensors itself (no torch-side loading): the weights it would write
equal the Hugging Face model's, rounded to fp16, for fp32 and bf16 folders; `edgequant convert` makes such a folder."""
import subprocess
import sys

import numpy as np
import torch

NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.qkv_proj.bias",
         "model.layers.1.mlp.gate_up_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"]


def _expected(model, names):
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    out = {}
    for n in names:
        pre, lin, leaf = n.rsplit(".", 2) if n.count(".") > 2 else (None, None, None)
        if lin in fused:
            out[n] = torch.cat([sd[f"{pre}.{m}.{leaf}"] for m in fused[lin]]).half().numpy()
        else:
            out[n] = sd[n].half().numpy()
    return out


def test_converted_folder_exports_the_models_fp16_weights(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from edgequant import api
    from edgequant.export.params import open_source
    folder = api.convert(model_dirs["qwen2"], tmp_path / "plain", progress=False)
    got = dict(open_source(folder).arrays(NAMES))
    want = _expected(AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"]), NAMES)
    for n in NAMES:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)
    code = ("import sys\nfrom edgequant.export.params import open_source\n"
            f"dict(open_source({str(folder)!r}).arrays({NAMES!r}))\n"
            "print(sorted(m for m in ('edgequant.loading', 'edgequant.artifact', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_bf16_weights_are_widened_exactly(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from edgequant.export.params import open_source
    model = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"], dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    got = dict(open_source(tmp_path / "bf16").arrays(NAMES))
    want = _expected(model, NAMES)
    for n in NAMES:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)


def test_a_missing_or_unused_weight_is_one_line_not_a_keyerror_or_dropped(model_dirs, tmp_path):
    """An fp16 export of a folder without one of its weights ended in a KeyError traceback; one with a weight the
    graph has no place for dropped it silently (hostile-input corpus)."""
    import shutil

    import pytest
    from safetensors.numpy import load_file, save_file

    from edgequant.errors import EdgequantError
    from edgequant.export.params import open_source
    names = [n for n in NAMES if "qkv" not in n]
    for damage in ("drop", "extra"):
        folder = tmp_path / damage
        shutil.copytree(model_dirs["llama"], folder)
        f = next(folder.glob("*.safetensors"))
        tensors = load_file(f)
        if damage == "drop":
            del tensors["model.layers.1.mlp.up_proj.weight"]
        else:
            tensors["model.layers.0.mlp.extra.weight"] = np.ones((4, 4), np.float32)
        save_file(tensors, f, metadata={"format": "pt"})
        src = open_source(folder)
        if damage == "drop":
            with pytest.raises(EdgequantError, match="has no weight 'model.layers.1.mlp.up_proj.weight'"):
                dict(src.arrays(names))
        else:
            with pytest.raises(EdgequantError, match="no place for: model.layers.0.mlp.extra.weight"):
                src.check_all_used(_all_names(model_dirs["llama"]))
            open_source(model_dirs["llama"]).check_all_used(_all_names(model_dirs["llama"]))   # undamaged: all used


def _all_names(folder):
    """The export names of a tiny llama folder: its tensors with q/k/v and gate/up fused as the graph reads them."""
    from safetensors.numpy import load_file
    names = set()
    for k in load_file(next(folder.glob("*.safetensors"))):
        pre, lin, leaf = k.rsplit(".", 2) if k.count(".") > 2 else (None, None, None)
        fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                 "up_proj": "gate_up_proj"}
        names.add(f"{pre}.{fused[lin]}.{leaf}" if lin in fused else k)
    return sorted(names)


def test_an_untied_model_without_its_output_layer_is_refused_and_a_tied_one_with_another_is_too(model_dirs, tmp_path):
    """The embedding stood in for a missing untied lm_head.weight (other tokens, exit 0), and a tied model's own,
    different lm_head.weight was dropped (seventh hostile re-run, S22)."""
    import json
    import shutil

    import pytest
    from safetensors.numpy import load_file, save_file

    from edgequant.errors import EdgequantError
    from edgequant.export.params import open_source
    untied = tmp_path / "untied"
    shutil.copytree(model_dirs["llama"], untied)
    f = next(untied.glob("*.safetensors"))
    tensors = load_file(f)
    assert "lm_head.weight" in tensors   # the tiny llama is untied
    del tensors["lm_head.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(EdgequantError, match="has no weight 'lm_head.weight'"):
        dict(open_source(untied).arrays(["lm_head.weight"]))
    tied = tmp_path / "tied"
    shutil.copytree(untied, tied)
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    names = [n for n in _all_names(tied)]
    open_source(tied).check_all_used(names)   # tied and saved once: fine
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] * 2
    save_file(tensors, next(tied.glob("*.safetensors")), metadata={"format": "pt"})
    with pytest.raises(EdgequantError, match="ties the output layer to the embedding, these differ"):
        open_source(tied).check_all_used(names)


def test_a_member_of_a_fused_linear_with_another_shape_or_a_scalar_norm_is_one_line(model_dirs, tmp_path):
    """q/k/v and gate/up are stacked before the graph's shape check: a member of the wrong shape (or a 0-d tensor
    anywhere) ended in NumPy's concatenate traceback (eighth hostile re-run, T14)."""
    import shutil

    import pytest
    from safetensors.numpy import load_file, save_file

    from edgequant.errors import EdgequantError
    from edgequant.export.params import open_source
    for name, bad in (("model.layers.0.self_attn.v_proj.weight", lambda t: t.T.copy()),
                      ("model.layers.0.mlp.up_proj.weight", lambda t: t.reshape(-1)),
                      ("model.norm.weight", lambda t: np.float32(1.0))):
        folder = tmp_path / name
        shutil.copytree(model_dirs["llama"], folder)
        f = next(folder.glob("*.safetensors"))
        tensors = load_file(f)
        want = list(tensors[name].shape)
        tensors[name] = np.asarray(bad(tensors[name]))
        save_file(tensors, f, metadata={"format": "pt"})
        export_name = name.replace("v_proj", "qkv_proj").replace("up_proj", "gate_up_proj")
        with pytest.raises(EdgequantError, match=rf"weight '{name}' is \[.*\], the model's config.json makes it "
                                                 rf"\[{', '.join(map(str, want))}\]"):
            from edgequant.checkpoint import check_weight_shape
            src = open_source(folder)
            for n, arr in src.arrays([export_name]):
                check_weight_shape(folder, n, arr.shape, want)   # what write_tensor_cache does with the graph's shapes


def test_a_tied_model_saved_under_the_output_layers_name_exports_as_transformers_loads_it(model_dirs, tmp_path):
    """A tied model whose one table is saved as lm_head.weight: transformers loads it as the embedding too;
    export ended in a KeyError traceback (eighth hostile re-run, T15)."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    from edgequant.export.params import open_source
    tied = tmp_path / "tied"
    shutil.copytree(model_dirs["llama"], tied)
    f = next(tied.glob("*.safetensors"))
    tensors = load_file(f)
    table = tensors.pop("model.embed_tokens.weight")
    tensors["lm_head.weight"] = table
    save_file(tensors, f, metadata={"format": "pt"})
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    src = open_source(tied)
    names = _all_names(tied) + ["model.embed_tokens.weight"]
    src.check_all_used(names)
    got = dict(src.arrays(["model.embed_tokens.weight", "lm_head.weight"]))
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], table.astype(np.float16))
    np.testing.assert_array_equal(got["lm_head.weight"], table.astype(np.float16))


def test_a_size_field_of_the_wrong_type_is_one_line_in_export(model_dirs, tmp_path):
    """export read config.json's sizes unchecked: "num_hidden_layers": "2" ended in a TypeError (ninth hostile
    re-run, T18); quantize already refused it."""
    import json
    import shutil

    import pytest

    from edgequant.errors import EdgequantError
    from edgequant.export.params import open_source
    folder = tmp_path / "m"
    shutil.copytree(model_dirs["llama"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": str(cfg["num_hidden_layers"])}))
    with pytest.raises(EdgequantError, match="'num_hidden_layers' must be a positive integer"):
        open_source(folder)


def test_sizes_that_disagree_with_the_weights_are_refused_before_compiling(model_dirs, tmp_path):
    """`head_dim: 1000000000` in a model folder's config.json: export compiled the attention for that size first and
    never finished (tenth hostile re-run); quantize already refused the folder."""
    import json
    import shutil

    import pytest

    from edgequant.errors import EdgequantError
    from edgequant.export.params import open_source
    folder = tmp_path / "m"
    shutil.copytree(model_dirs["llama"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "head_dim": 1_000_000_000}))
    with pytest.raises(EdgequantError, match=r"weight 'model.layers.0.self_attn.q_proj.weight' is \[64, 64\], the "
                                             r"model's config.json makes it \[4000000000, 64\]"):
        open_source(folder)
    # an odd head size, even with weights of that shape, is refused before TVM's rotary kernel fails on it
    (folder / "config.json").write_text(json.dumps({**cfg, "head_dim": 3}))
    with pytest.raises(EdgequantError, match=r"head size \(3: .*must be even"):
        open_source(folder)


def test_bias_flags_the_weights_lack_are_refused(model_dirs, tmp_path):
    """`attention_bias: true` over a llama without bias tensors was exported as the bias-free model (tenth hostile
    re-run); quantize, eval and convert refused it (transformers: missing weights)."""
    import json
    import shutil

    import pytest

    from edgequant.errors import EdgequantError
    from edgequant.export.params import open_source
    folder = tmp_path / "m"
    shutil.copytree(model_dirs["llama"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
    with pytest.raises(EdgequantError, match=r"lacks weight\(s\) its config.json's model has: "
                                             r"model.layers.0.self_attn.k_proj.bias, .* and 5 more"):
        open_source(folder)
    # qwen2's q/k/v biases under a llama config without the flag: transformers drops them, export added them
    folder = tmp_path / "b"
    shutil.copytree(model_dirs["qwen2"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(EdgequantError, match=r"holds bias\(es\) its config.json's model does not have: "
                                             r"model.layers.0.self_attn.q_proj.bias"):
        open_source(folder)
