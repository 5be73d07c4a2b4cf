"""A model whose weights leave fp16's range (eighteenth re-run, S44, T40): quantize wrote Inf scales, columns or
tables and exited 0 (its own reader then called the checkpoint damaged), export printed numpy's warning before its
line. Now quantize refuses such a model before calibrating, export in one line, and the checkpoint writer refuses a
tensor that is not finite in fp16 whatever produced it."""
from __future__ import annotations

import shutil

import pytest

from .harness import assert_one_line_error, run_commands

BIG = ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight")


@pytest.fixture(scope="module")
def big_weight_models(model_dirs, tmp_path_factory):
    """{tensor: a copy of the tiny llama with one value of that tensor set to 1e6}."""
    from safetensors.torch import load_file, save_file
    root, out = tmp_path_factory.mktemp("fp16-range"), {}
    for name in BIG:
        d = root / name.split(".")[-2]
        shutil.copytree(model_dirs["llama"], d)
        t = load_file(d / "model.safetensors")
        t[name].view(-1)[0] = 1e6
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})
        out[name] = d
    return out


def test_quantize_and_export_refuse_weights_past_fp16_in_one_line(big_weight_models, tmp_path):
    cases = [(name, [cmd, d, *opts, "-o", tmp_path / f"{cmd}-{d.name}", "-q"])
             for name, d in big_weight_models.items()
             for cmd, opts in (("quantize", ["--method", "rtn", "--group-size", "32"]), ("export", ["--target", "cpu"]))]
    for (name, argv), r in zip(cases, run_commands([argv for _, argv in cases], tmp_path)):
        assert_one_line_error(r, name, "restore them")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("commands.json")) == []


def test_the_checkpoint_writer_refuses_a_tensor_past_fp16(big_weight_models, tmp_path, monkeypatch):
    """The net behind the check at the input: calibration could push a value past fp16 (LET scales, OWQ columns)."""
    from edgequant import api
    from edgequant.errors import CheckpointError
    monkeypatch.setattr(api, "_check_fits_fp16", lambda model, src: None)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.down_proj.scales' holds values past fp16"):
        api.quantize(big_weight_models[BIG[0]], tmp_path / "q", method="rtn", group_size=32, progress=False)
    assert list(tmp_path.iterdir()) == []
