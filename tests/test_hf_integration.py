"""transformers loads edgequant checkpoints: `AutoModelForCausalLM.from_pretrained(ckpt)` after `import edgequant`
computes the same logits as `edgequant eval`'s model (the rebuild in artifact.load_model), for every method, llama and
qwen2 (q/k/v biases), with OWQ outlier columns, symmetric schemes and tied embeddings."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import edgequant  # noqa: F401 - registers the quantizer
from edgequant import api
from edgequant.artifact import load_quantized_model as load_model

# (method, arch, quantize options): every method; OWQ and OmniQuant+OWQ with fp16 outlier columns
CASES = [
    ("rtn", "llama", dict(bits=4, group_size=32)),
    ("rtn", "qwen2", dict(bits=3, group_size=32, sym=True)),
    ("gptq", "qwen2", dict(bits=3, group_size=32)),
    ("owq", "llama", dict(bits=4, group_size=32, weak_columns=2)),
    ("owq", "qwen2", dict(bits=3, group_size=-1, weak_columns=3)),
    ("omniquant", "llama", dict(bits=2, group_size=32, epochs=1, let=True)),
    ("omniquant", "qwen2", dict(bits=3, group_size=32, epochs=1, owq_target_bits=3.5)),
]


def _quantize(model_dir, out, method, text_file, opts):
    calib = None if method == "rtn" else dict(calib=text_file, nsamples=4, seqlen=32)
    return api.quantize(str(model_dir), out, method=method, progress=False, **(calib or {}), **opts)


@pytest.mark.parametrize("method,arch,opts", CASES, ids=[f"{m}-{a}" for m, a, _ in CASES])
def test_from_pretrained_logits_equal_eval_model(tmp_path, model_dirs, text_file, method, arch, opts):
    from transformers import AutoModelForCausalLM
    from edgequant.hf_integration import EdgequantLinear
    ck = _quantize(model_dirs[arch], tmp_path / "q", method, text_file, opts)
    ref, info = load_model(ck)
    hf = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    lins = [m for m in hf.modules() if isinstance(m, EdgequantLinear)]
    assert len(lins) == 7 * 2
    if "weak_columns" in opts or "owq_target_bits" in opts:
        assert any(hasattr(m, "outlier_idx") and m.outlier_idx.numel() for m in lins)
    if arch == "qwen2":
        assert hf.model.layers[0].self_attn.q_proj.bias is not None
    assert hf.config.quantization_config.bits == opts["bits"]
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids).logits, hf(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the quantized weights really are in the packed form: the rebuilt weight equals the eval model's
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(hf.get_submodule(name).dequantized_weight(), ref.get_submodule(name).weight,
                               rtol=0, atol=0)


def test_dtype_device_map_tied_and_dequantize(tmp_path, model_dirs, text_file, tokenizer):
    from transformers import AutoModelForCausalLM
    from conftest import make_tiny_model
    src = tmp_path / "tied"
    make_tiny_model("llama", tie=True).save_pretrained(src)
    tokenizer.save_pretrained(src)
    ck = _quantize(src, tmp_path / "q", "owq", text_file, dict(bits=4, group_size=32, weak_columns=2))
    ref, _ = load_model(ck)
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
        hf = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32, device_map="cpu")
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
        torch.testing.assert_close(hf(ids).logits, want, rtol=0, atol=1e-5)
        half = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.bfloat16, device_map="auto")
        up = half.model.layers[0].mlp.up_proj
        assert up.scales.dtype == torch.float16 and half.model.embed_tokens.weight.dtype == torch.bfloat16
        got = half(ids).logits.float()
        assert got.dtype == torch.float32 and (got - want).abs().max() < 0.1 * want.abs().max()
        plain = hf.dequantize()
        assert isinstance(plain.model.layers[0].mlp.up_proj, torch.nn.Linear)
        torch.testing.assert_close(plain(ids).logits, want, rtol=0, atol=1e-5)


def test_damaged_checkpoint_refused_with_edgequant_message(tmp_path, owq_checkpoint):
    import shutil
    from transformers import AutoModelForCausalLM
    from edgequant.errors import CheckpointError
    bad = tmp_path / "bad"
    shutil.copytree(owq_checkpoint, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_import_edgequant_stays_light():
    """`import edgequant` imports neither torch nor transformers; transformers' registry then gets the quantizer."""
    code = ("import sys, edgequant; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; assert 'edgequant' in M; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.slow
def test_smollm2_from_pretrained_equals_eval_model(tmp_path):
    """The real model: an RTN W3 g128 SmolLM2-135M checkpoint through from_pretrained gives the eval model's
    logits on a WikiText-2 window (RTN: calibrating OWQ on the real model takes too long for a shared CPU; the tiny
    models above cover every method)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from edgequant.loading import fetch_default_model
    from conftest import WIKI
    ck = api.quantize(fetch_default_model(False), tmp_path / "q", method="rtn", bits=3, group_size=128,
                      progress=False)
    ref, _ = load_model(ck)
    hf = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(ck)
    ids = tok(WIKI.read_text()[:4000], return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.gpu
def test_device_map_cuda(tmp_path, model_dirs, text_file):
    """On a GPU the packed tensors load onto it and dequantize there; logits match the eval model moved to it."""
    from transformers import AutoModelForCausalLM
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ck = _quantize(model_dirs["qwen2"], tmp_path / "q", "owq", text_file, dict(bits=3, group_size=32, weak_columns=2))
    ref, _ = load_model(ck, device="cuda")
    hf = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32, device_map="cuda")
    lin = hf.model.layers[0].self_attn.q_proj
    assert lin.qweight.is_cuda and lin.outlier_idx.is_cuda and lin.bias.is_cuda
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
        half = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float16, device_map="auto")
        got, want = half(ids).logits.float(), ref(ids).logits
        assert (got - want).abs().max() < 0.05 * want.abs().max()
