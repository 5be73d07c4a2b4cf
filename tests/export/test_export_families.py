"""Export parity of the families beyond LLaMA/Qwen2 (tests/tiny_families.py): Qwen3 (per-head q/k norms, head_dim 32
!= hidden / heads), Llama 3.x (llama3 RoPE scaling, tied embeddings) and Phi-3 (fused qkv/gate_up as stored,
longrope short factors and attention factor). Each case is the check of test_export_parity.py (prefill, six decode
steps, every position's logits against the PyTorch model rebuilt from the same checkpoint, identical greedy tokens,
and with outlier columns a control that they matter). Together the cases cover 2, 3 and 4 bits with and without
outlier columns, at least two bit widths per family; one build per case, as every case compiles other kernels."""
from __future__ import annotations

import pytest

# the shared check and its module-scoped builder of checkpoints and libraries
from test_export_parity import exported  # noqa: F401 - a pytest fixture
from test_export_parity import test_int8_decode_stays_close_to_pytorch as check_int8
from test_export_parity import test_logits_and_greedy_tokens_match_pytorch as check_parity

pytestmark = pytest.mark.tvm

# arch, bits, group, sym, outlier columns per linear, tied embeddings (llama3 is tied by its config)
CASES = [
    ("qwen3", 4, 32, False, 0, False),
    ("qwen3", 2, 32, False, 3, False),
    ("llama3", 3, 32, False, 2, True),
    ("llama3", 4, -1, True, 0, True),
    ("phi3", 2, 32, True, 0, False),
    ("phi3", 3, 64, False, 3, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-w{c[1]}g{c[2]}{'s' if c[3] else 'a'}-o{c[4]}")
def test_family_logits_and_greedy_tokens_match_pytorch(exported, case):  # noqa: F811
    check_parity(exported, case)


def test_family_int8_decode_stays_close_to_pytorch(exported):  # noqa: F811
    """The default cpu export (int8 activations in the decode GEMV and prefill GEMM) on the family furthest from
    LLaMA's layout: Phi-3's fused linears as stored, longrope, outlier columns."""
    check_int8(exported, ("phi3", 4, 32, False, 2, False))


@pytest.mark.parametrize("arch", ["llama3", "phi3"])
def test_rope_scaling_is_visible_at_these_lengths(arch):
    """Control for the parity above: on these configs and 40 positions, the same weights with plain RoPE give logits
    far outside its 1e-2 bound, so a graph ignoring llama3 or longrope scaling would fail it."""
    import copy

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_model
    model = make_tiny_model(arch, seed=3)
    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": model.config.rope_parameters["rope_theta"]}
    plain = AutoModelForCausalLM.from_config(cfg).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.tensor([np.random.default_rng(0).integers(0, 320, 40).tolist()])
    with torch.no_grad():
        a, b = model(ids).logits[0], plain(ids).logits[0]
    assert float((a - b).abs().max() / a.abs().max()) > 0.1


def test_arch_config_reads_rope_scaling_like_transformers():
    """What export reads from real-size configs: Llama 3.2's llama3 scaling goes to the cache; Phi-3.5-mini's longrope
    gives its short factors, transformers' attention factor and a context capped at original_max_position_embeddings;
    Phi-3-mini-4k's sliding window caps the context; Qwen3's explicit head_dim and q/k norms; unsupported scalings
    are one-line errors that say what is supported."""
    from transformers import LlamaConfig, Phi3Config, Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from edgequant.errors import EdgequantError
    from edgequant.export.models.llama import ArchConfig
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    a = ArchConfig.from_hf(LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                                       vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                                       rope_scaling=dict(llama3), tie_word_embeddings=True).to_dict())
    assert a.rope_scaling == llama3 and a.rope_theta == 500000.0 and a.tie_word_embeddings
    assert a.context_window == 131072 and not a.rope_short_factors and a.vocab_size == 128256

    short = [1.0 + 0.01 * i for i in range(48)]
    cfg = Phi3Config(hidden_size=3072, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
                     original_max_position_embeddings=4096, sliding_window=262144, pad_token_id=0,
                     rope_scaling={"type": "longrope", "short_factor": short, "long_factor": [2.0] * 48})
    a = ArchConfig.from_hf(cfg.to_dict())
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu")
    assert a.rope_short_factors == tuple(short) and a.context_window == 4096
    assert abs(a.attention_factor - attention_factor) < 1e-12 and a.attention_factor > 1.1
    assert torch_like_inv_freq(a).tolist() == pytest.approx(inv_freq.tolist(), rel=1e-6)
    a = ArchConfig.from_hf(Phi3Config(max_position_embeddings=4096, sliding_window=2047, pad_token_id=0).to_dict())
    assert a.context_window == 2047 and not a.rope_short_factors

    a = ArchConfig.from_hf(Qwen3Config(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
                                       head_dim=128).to_dict())
    assert a.head_dim == 128 and a.qk_norm and a.num_heads * a.head_dim == 2048

    a = ArchConfig.from_hf(LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 4.0}).to_dict())
    assert a.rope_scale == 0.25 and a.rope_scaling == {}      # positions / 4 in the cache's RoPE
    for rope in ({"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "yarn", "factor": 4.0}):
        with pytest.raises(EdgequantError, match="not supported by export yet .*llama3, longrope"):
            ArchConfig.from_hf(LlamaConfig(rope_scaling=rope).to_dict())


def torch_like_inv_freq(a):
    """The inverse frequencies `_rope_longrope` computes (its formula, in NumPy)."""
    import numpy as np
    j = np.arange(a.head_dim // 2, dtype=np.float32)
    return 1.0 / (np.array(a.rope_short_factors, np.float32) * a.rope_theta ** (2 * j / a.head_dim))
