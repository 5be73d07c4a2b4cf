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
