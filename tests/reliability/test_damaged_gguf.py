"""Damaged GGUF files as MODEL: one `error:` line naming the file, not an IndexError or ZeroDivisionError from the
GGUF header reader or transformers' size-mismatch traceback (the fourth hostile re-run's T3 and T4)."""
from __future__ import annotations

import struct

import pytest

KEY = b"qwen3.attention.key_length"
BLOCKS = b"qwen3.block_count"
CONTEXT = b"qwen3.context_length"
EPS = b"qwen3.attention.layer_norm_rms_epsilon"


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
}


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
    if damage.startswith(("context_length", "rms_epsilon")):
        field = "max_position_embeddings" if damage.startswith("context") else "rms_norm_eps"
        assert f"in its metadata '{field}' is" in str(e.value)
