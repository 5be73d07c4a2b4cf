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
