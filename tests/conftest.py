"""Shared fixtures: tiny random LLaMA / Mistral / Qwen2 models with a small byte-level BPE tokenizer (no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # parallel workers (-n auto) share the cores: one thread each, so neither torch's pool nor
    # TVM's spinning pool runs more threads than there are cores (what the processes they start inherit, too)
    _THREADS = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    for _var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_var, _THREADS)
    torch.set_num_threads(int(_THREADS))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CALIB = SHARED / "calibration" / "wikipedia-sample.txt"
WIKI = SHARED / "wikitext-2-raw" / "wiki.test.raw"
VOCAB = 320

_TEXT = ("The quick brown fox jumps over the lazy dog. Quantization maps weights to a few bits. "
         "Edge devices such as phones run small language models. ") * 40


def tiny_config(arch: str, tie: bool = False):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, tie_word_embeddings=tie,
                  rms_norm_eps=1e-5)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common)
    from tiny_families import tiny_family_config
    return tiny_family_config(arch, common)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = CALIB.read_text()[:200_000] if CALIB.exists() else _TEXT
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def make_tiny_model(arch: str, seed: int = 0, tie: bool = False):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tie), dtype=torch.float32).eval()
    with torch.no_grad():  # larger-than-init weights so quantization error is visible in the logits
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.08)
            if name.endswith("proj.bias"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """Calibration / evaluation text: the shared sample where present, else a generated paragraph."""
    if CALIB.exists():
        return str(CALIB)
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(_TEXT * 20)
    return str(p)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """{arch: folder} of saved tiny models, built once per session."""
    out = {}
    for arch in ("llama", "mistral", "qwen2"):
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        m = make_tiny_model(arch)
        m.save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[arch] = d
    return out


def random_quantized_linear(rng, bits, group, sym, n, k, layout="words", zeros_packed=False):
    """A random quantized weight [n, k] for the kernel tests: (spec, codes [n, k], the packed words in `layout`
    (3-bit layouts made by `dequant.repack_3bit_np`, their one owner), fp16 scales, uint8 zero points or None)."""
    import numpy as np

    from edgequant.pack import pack
    from edgequant.tvm_schedules.dequant import QuantSpec, repack_3bit_np
    spec = QuantSpec(n, k, bits, group, sym, layout, zeros_packed)
    q = rng.integers(0, 1 << bits, (n, k))
    scales = (rng.random((n, spec.n_groups)) * 0.02 + 0.005).astype(np.float16)
    zeros = None if sym else rng.integers(0, 1 << bits, (n, spec.n_groups)).astype(np.uint8)
    qweight = pack(q, bits) if layout == "words" else repack_3bit_np(pack(q, bits), k, layout)
    return spec, q, qweight, scales, zeros


def round_plain_to_fp16(model, quantized_names):
    """What the checkpoint stores for non-quantized tensors: fp16 values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[0] not in quantized_names or name.endswith(".bias"):
                p.copy_(p.half().float())


def round_like_rtn_checkpoint(model, family, scheme):
    """What an RTN checkpoint holds, in place: the family's linear weights rounded to `scheme` (dequantized), every
    other tensor in fp16."""
    from edgequant.quantizer import quantize_weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight") and family.relative_name(name.rsplit(".", 1)[0]) in family.linear_names:
                p.copy_(quantize_weight(p, scheme).dequantize())
            else:
                p.copy_(p.half().float())
    return model


def assert_fused_checkpoint_equals_live(tmp_path, tokenizer, fp_model, model, quantized, scheme, live, samples):
    """Save the fused OmniQuant result, reload it from disk, and compare its logits with the live model: the original
    blocks computing with their trained LWC/LET parameters (nothing fused), other tensors as stored (fp16).
    Returns the reloaded model."""
    from edgequant.artifact import load_quantized_model, save_checkpoint
    from edgequant.calibrate.omniquant import LiveBlock
    fused, _ = load_quantized_model(save_checkpoint(tmp_path / "ck", model, tokenizer, quantized, scheme, "omniquant"))
    round_plain_to_fp16(fp_model, set())
    for i, ob in enumerate(live):
        fp_model.model.layers[i] = LiveBlock(fp_model.model.layers[i], ob)
    with torch.no_grad():
        torch.testing.assert_close(fused(samples).logits, fp_model(samples).logits, rtol=1e-5, atol=1e-5)
    return fused


@pytest.fixture(scope="session")
def owq_checkpoint(model_dirs, text_file, tmp_path_factory):
    """A tiny OWQ W4 g32 checkpoint: zero points and fp16 outlier columns, so index checks and the outlier gather
    run. Built once for the reliability corpus and the native-runtime tests."""
    from edgequant import api
    out = tmp_path_factory.mktemp("owq-w4g32") / "owq"
    return api.quantize(model_dirs["llama"], out, method="owq", bits=4, group_size=32, calib=text_file, nsamples=4,
                        seqlen=64, weak_columns=2, progress=False)
