"""Damaged GGUF files as MODEL: one `error:` line naming the file, not an IndexError or ZeroDivisionError from the
GGUF header reader or transformers' size-mismatch traceback (the fourth hostile re-run's T3 and T4)."""
from __future__ import annotations

import struct

import pytest

KEY = b"qwen3.attention.key_length"
BLOCKS = b"qwen3.block_count"
CONTEXT = b"qwen3.context_length"
EPS = b"qwen3.attention.layer_norm_rms_epsilon"
EOS = b"tokenizer.ggml.eos_token_id"


def _key_at(b: bytes, key: bytes = KEY) -> int:
    return b.find(key) + len(key)   # then the value's uint32 type and the uint32 value


def _set_u32(b: bytes, key: bytes, value: int) -> bytes:
    at = _key_at(b, key) + 4
    return b[:at] + struct.pack("<I", value) + b[at + 4:]


def _set_f32(b: bytes, key: bytes, value: float) -> bytes:
    at = _key_at(b, key) + 4
    return b[:at] + struct.pack("<f", value) + b[at + 4:]


DAMAGE = {
    "random_header": lambda b: b"GGUF" + struct.pack("<IQQ", 3, 2 ** 63 - 1, 2 ** 63 - 1) + bytes(range(100)),
    "truncated_24": lambda b: b[:24],
    "truncated_200": lambda b: b[:200],
    "tensor_count_2_pow_62": lambda b: b[:8] + struct.pack("<Q", 2 ** 62) + b[16:],
    "first_key_length_2_pow_40": lambda b: b[:24] + struct.pack("<Q", 2 ** 40) + b[32:],
    "head_dim_0": lambda b: b[:_key_at(b) + 4] + struct.pack("<I", 0) + b[_key_at(b) + 8:],
    "head_dim_7": lambda b: b[:_key_at(b) + 4] + struct.pack("<I", 7) + b[_key_at(b) + 8:],
    "head_dim_2_pow_31": lambda b: b[:_key_at(b) + 4] + struct.pack("<I", 2 ** 31) + b[_key_at(b) + 8:],
    "head_dim_typed_as_string": lambda b: b[:_key_at(b)] + struct.pack("<I", 8) + b[_key_at(b) + 4:],
    # transformers built the layers first: 1e6 never finished (eleventh hostile re-run, H6)
    "block_count_1e6": lambda b: _set_u32(b, BLOCKS, 1_000_000),
    "block_count_1": lambda b: _set_u32(b, BLOCKS, 1),
    # the header's numbers pass config.json's checks: these were converted or quantized (twelfth re-run, S34)
    "context_length_0": lambda b: _set_u32(b, CONTEXT, 0),
    "context_length_u32_max": lambda b: _set_u32(b, CONTEXT, 2 ** 32 - 1),
    "rms_epsilon_nan": lambda b: _set_f32(b, EPS, float("nan")),
    "rms_epsilon_negative": lambda b: _set_f32(b, EPS, -1.0),
    # transformers' IndexError naming config.json (thirteenth re-run, S34b)
    "eos_id_past_vocabulary": lambda b: _set_u32(b, EOS, 2 ** 32 - 1),
    # the tokenizers library's plain Exception ("Error while initializing BPE: Token ... out of vocabulary"; the
    # sixteenth session's GGUF sweep)
    "merge_of_unknown_tokens": lambda b: _first_merge_renamed(b),
}


def _first_merge_renamed(b: bytes) -> bytes:
    """The first merge rule ("left right", a length-prefixed string) with its left token replaced by DEL bytes, which
    byte-level vocabularies never hold raw."""
    at = b.find(b"tokenizer.ggml.merges") + len(b"tokenizer.ggml.merges") + 4 + 4 + 8   # value type, item type, count
    n = struct.unpack("<Q", b[at:at + 8])[0]
    rule = b[at + 8:at + 8 + n]
    left, _, right = rule.partition(b" ")
    return b[:at + 8] + b"\x7f" * len(left) + b" " + right + b[at + 8 + n:]


@pytest.fixture(scope="module")
def qwen3_gguf(tmp_path_factory, tokenizer):
    from conftest import make_tiny_model
    from tiny_families import write_gguf
    p = tmp_path_factory.mktemp("gguf") / "qwen3.gguf"
    write_gguf(make_tiny_model("qwen3"), tokenizer, p)
    return p.read_bytes()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_gguf_is_one_line(qwen3_gguf, tmp_path, damage):
    from edgequant.errors import EdgequantError
    from edgequant.loading import load_model
    f = tmp_path / f"{damage}.gguf"
    f.write_bytes(DAMAGE[damage](qwen3_gguf))
    with pytest.raises(EdgequantError) as e:
        load_model(f)
    assert "\n" not in str(e.value) and f.name in str(e.value)
    if damage.startswith("head_dim_") and damage != "head_dim_typed_as_string":
        assert "qwen3.attention.key_length" in str(e.value)
    if damage.startswith("block_count"):
        assert "qwen3.block_count is" in str(e.value) and "the file holds 2 blocks" in str(e.value)
    if damage == "merge_of_unknown_tokens":
        assert "its tokenizer cannot be built from its metadata (Error while initializing BPE" in str(e.value)
    if damage.startswith("eos_id"):
        assert "'tokenizer.ggml.eos_token_id' is 4294967295" in str(e.value)
    if damage.startswith(("context_length", "rms_epsilon")):
        field = "max_position_embeddings" if damage.startswith("context") else "rms_norm_eps"
        assert f"in its metadata '{field}' is" in str(e.value)


# RoPE metadata transformers' reader drops (thirteenth re-run): another scaling or a partial rotary width would compute
# another model, silently
ROPE = {
    "scaling_yarn": (lambda w, g: (w.add_rope_scaling_type(g.RopeScalingType.YARN), w.add_rope_scaling_factor(4.0)),
                     "RoPE scaling 'yarn' is not read"),
    "scaling_factor_nan": (lambda w, g: (w.add_rope_scaling_type(g.RopeScalingType.LINEAR),
                                         w.add_rope_scaling_factor(float("nan"))), "rope.scaling.factor' is nan"),
    "scaling_factor_negative": (lambda w, g: w.add_rope_scaling_factor(-1.0), "rope.scaling.factor' is -1.0"),
    "dimension_count_7": (lambda w, g: w.add_rope_dimension_count(7), "rope.dimension_count' is 7, not the head"),
    # another head width transformers' reader ignores (fourteenth re-run, S39)
    "value_length_16": (lambda w, g: w.add_value_length(16), "attention.value_length' is 16, not the head"),
}


@pytest.mark.parametrize("case", list(ROPE) + ["phi3_linear"])
def test_gguf_rope_metadata_the_reader_drops_is_refused(tmp_path, tokenizer, case):
    import gguf

    from conftest import make_tiny_model
    from edgequant.errors import EdgequantError
    from edgequant.loading import load_model
    from tiny_families import write_gguf
    # Phi-3's config takes no linear scaling (convert's config save raised: fifteenth re-run, T31)
    add, words = ROPE[case] if case in ROPE else (
        lambda w, g: (w.add_rope_scaling_type(g.RopeScalingType.LINEAR), w.add_rope_scaling_factor(4.0)),
        "linear RoPE scaling cannot be carried into a phi3 config")
    f = tmp_path / f"{case}.gguf"
    model = make_tiny_model("phi3" if case == "phi3_linear" else "qwen3")
    if case == "phi3_linear":   # longrope factors aside (tests/models/test_families: a plain Phi-3)
        model.config.rope_parameters = {"rope_type": "default", "rope_theta": model.config.rope_parameters["rope_theta"]}
        model = type(model)(model.config).eval()
    write_gguf(model, tokenizer, f, extra=lambda w: add(w, gguf))
    with pytest.raises(EdgequantError, match=words) as e:
        load_model(f)
    assert "\n" not in str(e.value) and f.name in str(e.value)


def test_gguf_linear_rope_scaling_is_the_models(tmp_path, tokenizer):
    """Linear RoPE scaling in a GGUF computes what the Hugging Face model with that scaling does (transformers'
    reader dropped it: the long-context model was loaded as its unscaled base)."""
    import gguf
    import torch

    from conftest import make_tiny_model
    from edgequant.loading import load_model
    from tiny_families import write_gguf
    base = make_tiny_model("qwen3")
    f = tmp_path / "linear.gguf"
    write_gguf(base, tokenizer, f, extra=lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
                                                    w.add_rope_scaling_factor(4.0), w.add_rope_dimension_count(32)))
    m, _ = load_model(f)
    cfg = base.config
    cfg.rope_parameters = {**cfg.rope_parameters, "rope_type": "linear", "factor": 4.0}
    scaled = type(base)(cfg).eval()
    scaled.load_state_dict(base.state_dict())
    ids = torch.arange(1, 25)[None]
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, scaled(ids).logits, rtol=0, atol=1e-5)
        assert (m(ids).logits - base(ids).logits).abs().max() > 1e-3


def test_convert_quiet_draws_no_bar(tmp_path, tokenizer, capfd):
    from conftest import make_tiny_model
    from edgequant.api import convert
    from tiny_families import write_gguf
    f = tmp_path / "m.gguf"
    write_gguf(make_tiny_model("qwen3"), tokenizer, f)
    capfd.readouterr()
    convert(f, tmp_path / "out", progress=False)
    assert capfd.readouterr().err == "" and (tmp_path / "out" / "config.json").exists()
