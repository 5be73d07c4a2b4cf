"""Block-output reconstruction after GPTQ/OWQ (`--tune-epochs`): the stored checkpoint is what was tuned, the block
losses never end above their start, and the network's output moves toward the fp model's."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from edgequant import api
from edgequant.artifact import load_quantized_model


def _kl_to_fp(ck, fp_dir, ids):
    from transformers import AutoModelForCausalLM
    fp = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()
    q, _ = load_quantized_model(ck)
    with torch.no_grad():
        ref, out = fp(ids).logits.log_softmax(-1), q.eval()(ids).logits.log_softmax(-1)
    return float(torch.nn.functional.kl_div(out, ref, log_target=True, reduction="batchmean"))


def test_tuning_lowers_block_loss_and_kl(tmp_path, model_dirs, text_file, tokenizer):
    src = model_dirs["qwen2"]   # q/k/v biases and OWQ's fp16 columns: tuned too
    common = dict(method="owq", weak_columns=4, bits=3, group_size=32, calib=text_file, nsamples=8, seqlen=64, progress=False)
    base = api.quantize(src, tmp_path / "base", **common)
    tuned = api.quantize(src, tmp_path / "tuned", tune_epochs=3, tune_lr=5e-3, tune_loss="token_rel", **common)
    prov = json.loads((Path(tuned) / "edgequant.json").read_text())
    blocks = prov["calibration"]["block_tuning"]
    assert [b["block"] for b in blocks] == [0, 1]
    for b in blocks:
        assert len(b["losses"]) == 4 and b["losses"][b["kept"]] == min(b["losses"])
    assert any(b["kept"] > 0 for b in blocks)
    # held-out windows of the same text (calibration drew seed 0 windows)
    from edgequant.data import calibration_samples
    ids = calibration_samples(tokenizer, text_file, 4, 64, seed=7)
    assert _kl_to_fp(tuned, src, ids) < _kl_to_fp(base, src, ids)


def test_tuned_checkpoint_keeps_codes_and_zero_points(tmp_path, model_dirs, text_file):
    """Only the floating-point parameters move: block 0's packed codes and zero points are GPTQ's, byte for byte
    (later blocks are quantized on the tuned stream, so their codes may differ)."""
    from edgequant.artifact import open_checkpoint
    src = model_dirs["llama"]
    common = dict(method="owq", bits=3, group_size=32, calib=text_file, nsamples=8, seqlen=64, progress=False,
                  weak_columns=2)
    base = open_checkpoint(api.quantize(src, tmp_path / "base", **common)).read()
    tuned = open_checkpoint(api.quantize(src, tmp_path / "tuned", tune_epochs=2, tune_lr=5e-3, **common)).read()
    assert base.keys() == tuned.keys()
    fixed = [k for k in base if k.startswith("model.layers.0.") and k.endswith((".qweight", ".zeros", ".outlier_idx"))]
    assert fixed and all((base[k] == tuned[k]).all() for k in fixed)
    moved = [k for k in base if k.endswith((".scales", ".outlier_weight", "norm.weight"))]
    assert moved and all(not (base[k] == tuned[k]).all() for k in moved if not k.startswith("model.norm"))


class _OneLinear(torch.nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.fc = torch.nn.Linear(k, n, bias=False)

    def forward(self, x):
        return self.fc(x)


def _toy(seed=0, k=64, n=16, windows=8, tokens=16):
    """A block of one W3 g32 linear and fp targets, the first 6 windows' targets doubled (what tuning could fit by
    doubling every scale) and the last 2 windows' the true ones."""
    from edgequant.quantizer import QuantizedWeight, expand_groups, group_minmax, params_from_range, quantize_int
    from edgequant.schemes import QuantScheme
    g = torch.Generator().manual_seed(seed)
    s = QuantScheme(3, 32)
    block = _OneLinear(k, n)
    w = torch.randn(n, k, generator=g)
    sc, z = params_from_range(*group_minmax(w, s), s)
    q = quantize_int(w, expand_groups(sc, s, k), expand_groups(z, s, k), s.maxq)
    qw = QuantizedWeight(q, sc, z, s)
    with torch.no_grad():
        block.fc.weight.copy_(qw.dequantize())
    x = torch.randn(windows, tokens, k, generator=g)
    t = x @ w.T
    t[:6] *= 2
    return block, {"fc": qw}, x, t


def test_heldout_windows_stop_tuning_that_only_fits_the_training_windows():
    """--tune-heldout: what the training windows want (doubled outputs) raises the held-out windows' loss, so the
    start is kept; scored on all windows, as without it, the training windows' wish wins."""
    import pytest
    from edgequant.calibrate.blocks import BlockInputs
    from edgequant.calibrate.blocktune import tune_block
    from edgequant.errors import EdgequantError
    runs = {}
    for heldout in (0, 2):
        block, lins, x, t = _toy()
        scale0 = lins["fc"].scale.clone()
        r = tune_block(block, lins, BlockInputs(x, {}), t, epochs=3, lr=5e-2, heldout=heldout)
        runs[heldout] = (r, float((lins["fc"].scale / scale0).mean()))
    (all_r, all_grow), (held_r, held_grow) = runs[0], runs[2]
    assert all_r["kept"] > 0 and all_grow > 1.2               # fitted the doubled windows
    assert held_r["kept"] == 0 and held_grow == 1.0           # the held-out loss only rose: GPTQ's scales stay
    assert held_r["losses"][1] > held_r["losses"][0]
    with pytest.raises(EdgequantError, match="--tune-heldout"):
        block, lins, x, t = _toy()
        tune_block(block, lins, BlockInputs(x, {}), t, epochs=1, lr=1e-2, heldout=8)
