"""End-to-end tuning after a method (`--e2e-epochs`): only the stored floating-point values move, the kept epoch is
the best on the held-out windows and is what the checkpoint holds, and the network moves toward the fp model."""
from __future__ import annotations

import pytest
import torch

from edgequant import api
from edgequant.artifact import load_quantized_model, open_checkpoint
from edgequant.calibrate.e2e import kl_to_teacher
from edgequant.data import calibration_samples
from edgequant.errors import EdgequantError


def _kl_to_fp(ck, fp_dir, ids):
    from transformers import AutoModelForCausalLM
    fp = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()
    q, _ = load_quantized_model(ck)
    with torch.no_grad():
        return float(kl_to_teacher(q.eval()(ids).logits, fp(ids).logits))


@pytest.fixture(scope="module")
def repeated_text(tmp_path_factory):
    """One paragraph over and over: a random tiny model learns nothing from real text that carries over from one
    window to another, so its held-out KL would only show noise; here every window holds the same text."""
    from conftest import _TEXT
    p = tmp_path_factory.mktemp("text") / "repeated.txt"
    p.write_text(_TEXT * 20)
    return str(p)


@pytest.fixture(scope="module")
def owq_pair(model_dirs, repeated_text, tmp_path_factory):
    """OWQ W3 g32 on the tiny qwen2 model (q/k/v biases, fp16 columns), without and with 3 epochs end to end."""
    d = tmp_path_factory.mktemp("e2e")
    common = dict(method="owq", weak_columns=4, bits=3, group_size=32, calib=repeated_text, nsamples=12, seqlen=64,
                  progress=False)
    base = api.quantize(model_dirs["qwen2"], d / "base", **common)
    tuned = api.quantize(model_dirs["qwen2"], d / "tuned", e2e_epochs=3, e2e_lr=3e-3, e2e_heldout=4, **common)
    return base, tuned, common


def test_e2e_moves_only_floating_values(owq_pair):
    """Codes, zero points and column indices are the method's, byte for byte (the method ran the same way before
    the tuning); scales, fp16 columns, norms and biases moved."""
    base, tuned, _ = (open_checkpoint(p).read() if i < 2 else p for i, p in enumerate(owq_pair))
    assert base.keys() == tuned.keys()
    fixed = [k for k in base if k.endswith((".qweight", ".zeros", ".outlier_idx"))]
    assert fixed and all((base[k] == tuned[k]).all() for k in fixed)
    for suffix in (".scales", ".outlier_weight", "norm.weight", "proj.bias"):
        moved = [k for k in base if k.endswith(suffix)]
        assert moved and any(not (base[k] == tuned[k]).all() for k in moved), suffix
    assert (base["model.embed_tokens.weight"] == tuned["model.embed_tokens.weight"]).all()


def test_e2e_keeps_the_best_heldout_epoch_and_stores_it(owq_pair, model_dirs, tokenizer):
    _, tuned, common = owq_pair
    e2e = api.inspect(tuned)["calibration"]["e2e_tuning"]
    kl, kept = e2e["kl"], e2e["kept"]
    assert len(kl) == 4 and e2e["heldout"] == 4 and kl[kept] == min(kl) and kept > 0
    # the recorded held-out KL is the stored checkpoint's (its fp16 norms and biases aside)
    heldout = calibration_samples(tokenizer, common["calib"], common["nsamples"], common["seqlen"], 0)[-4:]
    assert _kl_to_fp(tuned, model_dirs["qwen2"], heldout) == pytest.approx(kl[kept], rel=0.02)


def test_e2e_lowers_kl_on_unseen_windows(owq_pair, model_dirs, tokenizer):
    base, tuned, common = owq_pair
    ids = calibration_samples(tokenizer, common["calib"], 4, 64, seed=7)   # windows neither step drew
    assert _kl_to_fp(tuned, model_dirs["qwen2"], ids) < _kl_to_fp(base, model_dirs["qwen2"], ids)


def test_e2e_after_rtn_reads_the_calibration_options(tmp_path, model_dirs, text_file):
    """RTN reads no calibration text of its own; with --e2e-epochs the windows are the tuning's."""
    ck = api.quantize(model_dirs["llama"], tmp_path / "q", method="rtn", bits=3, group_size=32, calib=text_file,
                      nsamples=6, seqlen=32, seed=3, e2e_epochs=1, e2e_heldout=2, progress=False)
    cal = api.inspect(ck)["calibration"]
    assert (cal["nsamples"], cal["seqlen"], cal["seed"]) == (6, 32, 3) and len(cal["e2e_tuning"]["kl"]) == 2


def test_e2e_tunes_on_the_methods_own_windows(tmp_path, model_dirs, text_file, monkeypatch):
    """The windows GPTQ drew are the ones tuned on: the calibration text is read and tokenized once."""
    import edgequant.data as data
    drawn = []

    def counted(*a, **kw):
        drawn.append(real(*a, **kw))
        return drawn[-1]
    real = data.calibration_samples
    monkeypatch.setattr(data, "calibration_samples", counted)
    ck = api.quantize(model_dirs["llama"], tmp_path / "q", method="gptq", bits=3, group_size=32, calib=text_file,
                      nsamples=6, seqlen=32, e2e_epochs=1, e2e_heldout=2, progress=False)
    assert len(drawn) == 1 and len(api.inspect(ck)["calibration"]["e2e_tuning"]["kl"]) == 2


@pytest.mark.parametrize("kw,msg", [
    ({"method": "gptq", "e2e_lr": 0.01}, "--e2e-lr only apply with --e2e-epochs"),
    ({"method": "gptq", "e2e_heldout": 3}, "--e2e-heldout only apply with --e2e-epochs"),
    ({"method": "gptq", "e2e_epochs": 1, "e2e_heldout": 8, "nsamples": 8}, "--e2e-heldout 8 leaves no training"),
    ({"method": "gptq", "e2e_epochs": 1, "e2e_heldout": 0}, "--e2e-heldout must be"),
    ({"method": "rtn", "e2e_epochs": 1, "calib": None}, "--e2e-epochs tunes on calibration text: pass --calib"),
])
def test_e2e_option_errors(tmp_path, model_dirs, text_file, kw, msg):
    kw = {"calib": text_file, **kw}
    with pytest.raises(EdgequantError, match=msg):
        api.quantize(model_dirs["llama"], tmp_path / "q", progress=False, **kw)
    assert not (tmp_path / "q").exists()
