"""OmniQuant + OWQ: weak columns chosen first stay fp16 in the fused checkpoint, which computes exactly what the live
LWC/LET model with those columns computes."""
import copy

import pytest
import torch

from edgequant import api
from edgequant.artifact import load_quantized_weight, open_checkpoint
from edgequant.calibrate.omniquant import OmniConfig, calibrate_omniquant
from edgequant.calibrate.owq import weak_column_counts
from edgequant.models import family_for
from edgequant.schemes import QuantScheme

from conftest import assert_fused_checkpoint_equals_live, make_tiny_model


@pytest.mark.parametrize("arch,let", [("llama", True), ("qwen2", False)])
def test_combined_fused_checkpoint_equals_live_model(tmp_path, tokenizer, arch, let):
    samples = torch.randint(0, 320, (8, 48), generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme(3, 32)
    model = make_tiny_model(arch)
    live_model = copy.deepcopy(model)
    cfg = OmniConfig(epochs=2, let=let, batch_size=2, lwc_lr=5e-2, owq_target_bits=3.5, **({"let_lr": 1e-2} if let else {}))
    q, stats, _, live = calibrate_omniquant(model, samples, scheme, cfg, progress=False, keep_live=True)
    counts = weak_column_counts(family_for(arch), {n: (160 if n == "mlp.down_proj" else 64) for n in
                                                   family_for(arch).linear_names}, 3, 3.5)
    for name, qw in q.items():
        k = counts[name.split(".", 3)[-1]]
        assert len(qw.outlier_idx) == k and stats[name]["weak_columns"] == k
        assert torch.all(qw.q[:, qw.outlier_idx] == qw.zero[:, qw.outlier_idx // 32])
    assert_fused_checkpoint_equals_live(tmp_path, tokenizer, live_model, model, q, scheme, live, samples)


def test_cli_option_reaches_the_checkpoint(tmp_path, model_dirs, text_file):
    ck = api.quantize(str(model_dirs["llama"]), tmp_path / "q", method="omniquant", bits=3, group_size=32,
                      calib=text_file, nsamples=4, seqlen=64, epochs=1, owq_target_bits=3.5, progress=False)
    c = open_checkpoint(ck)
    qw = load_quantized_weight(c, "model.layers.0.self_attn.q_proj")
    assert qw.outlier_idx is not None and len(qw.outlier_idx) > 0
    info = api.inspect(ck)
    assert info["method"] == "omniquant" and info["outlier_columns"]
