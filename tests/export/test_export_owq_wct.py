"""An OWQ checkpoint after weak-column tuning still exports, and the library computes what PyTorch computes."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.tvm


def test_tuned_owq_checkpoint_exports_with_parity(tmp_path, model_dirs, text_file, capfd):
    from edgequant import api
    from edgequant.artifact import load_quantized_model
    from edgequant.export.api import export
    from edgequant.export.runtime import Runner
    ck = api.quantize(str(model_dirs["qwen2"]), tmp_path / "owq", method="owq", bits=3, group_size=32,
                      calib=text_file, nsamples=8, seqlen=64, weak_columns=4, progress=False)
    tuned = api.tune_weak_columns(ck, text_file, tmp_path / "wct", epochs=1, lr=3e-3, seqlen=64, nsamples=16,
                                  heldout=2, progress=False)["checkpoint"]
    capfd.readouterr()
    dist = export(tuned, "cpu", tmp_path / "dist", progress=False)
    # the embedding and outlier-column gathers clamp their indices: TVM's "fast mode segfaults" warning is gone
    assert "segfault" not in capfd.readouterr().err.lower()
    ref, _ = load_quantized_model(tuned)
    ids = np.random.default_rng(0).integers(0, ref.config.vocab_size, 24).tolist()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    got = Runner(dist).logits(ids)
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-2
