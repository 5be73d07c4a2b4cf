"""Checkpoint save -> load, parity of the rebuilt model, and refusal of damaged checkpoints with one-line errors."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgequant import api
from edgequant.artifact import load_quantized_model, load_quantized_weight, open_checkpoint
from edgequant.calibrate.rtn import quantize_rtn
from edgequant.errors import CheckpointError
from edgequant.perplexity import evaluate
from edgequant.schemes import QuantScheme

from conftest import make_tiny_model, round_plain_to_fp16


@pytest.fixture(scope="module")
def rtn_ckpt(tmp_path_factory, model_dirs):
    out = tmp_path_factory.mktemp("ck") / "rtn"
    return api.quantize(str(model_dirs["llama"]), out, method="rtn", bits=3, group_size=32, progress=False)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (3, 64, False), (2, -1, True), (3, 48, True)])
def test_save_load_identical_tensors(tmp_path, tokenizer, arch, bits, group_size, sym):
    from edgequant.artifact import save_checkpoint
    model = make_tiny_model(arch)
    s = QuantScheme(bits, group_size, sym)
    q, _ = quantize_rtn(model, s, progress=False)
    out = save_checkpoint(tmp_path / "ck", model, tokenizer, q, s, "rtn")
    ck = open_checkpoint(out)
    assert ck.scheme == s and ck.method == "rtn"
    assert len(ck.quantized_linears()) == len(q)
    for name, qw in q.items():
        back = load_quantized_weight(ck, name)
        assert torch.equal(back.q.long(), qw.q.long()), name
        assert torch.equal(back.scale, qw.scale), name
        assert torch.equal(back.zero, qw.zero), name
        assert torch.equal(back.dequantize(), qw.dequantize()), name
    if arch == "qwen2":  # q/k/v biases survive (as fp16)
        b = ck.read(["model.layers.0.self_attn.q_proj.bias"])["model.layers.0.self_attn.q_proj.bias"]
        ref = model.model.layers[0].self_attn.q_proj.bias.detach().half().numpy()
        np.testing.assert_array_equal(b, ref)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["bits"] == bits and cfg["group_size"] == group_size and cfg["quant_method"] == "edgequant"
    assert (out / "tokenizer.json").exists() and (out / "edgequant.json").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_saved_checkpoint_evaluates_like_in_memory_model(tmp_path, tokenizer, arch):
    from edgequant.artifact import save_checkpoint
    model = make_tiny_model(arch, tie=(arch == "qwen2"))
    s = QuantScheme(4, 32)
    q, _ = quantize_rtn(model, s, progress=False)
    out = save_checkpoint(tmp_path / "ck", model, tokenizer, q, s, "rtn")
    with torch.no_grad():
        for name, qw in q.items():
            model.get_submodule(name).weight.copy_(qw.dequantize())
    round_plain_to_fp16(model, set(q))
    loaded, _ = load_quantized_model(out)
    windows = torch.randint(0, 320, (3, 64), generator=torch.Generator().manual_seed(0))
    a = evaluate(model, windows, progress=False)
    b = evaluate(loaded, windows, progress=False)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5)
    x = windows[:1]
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint(tmp_path, tokenizer):
    from edgequant.artifact import save_checkpoint
    model = make_tiny_model("llama")
    s = QuantScheme(4, 32)
    q, _ = quantize_rtn(model, s, progress=False)
    out = save_checkpoint(tmp_path / "ck", model, tokenizer, q, s, "rtn", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists()
    a, _ = load_quantized_model(out)
    b, _ = load_quantized_model(save_checkpoint(tmp_path / "ck1", model, tokenizer, q, s, "rtn"))
    x = torch.randint(0, 320, (1, 16))
    assert torch.equal(a(x).logits, b(x).logits)


# ---------------------------------------------------------------- damaged input: one line, no traceback
def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "edgequant.cli", *args], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def _assert_one_line_error(rc, err, *words):
    assert rc != 0
    assert "Traceback" not in err, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def _copy(ck, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(ck, dst)
    return dst


def test_truncated_safetensors(rtn_ckpt, tmp_path):
    d = _copy(rtn_ckpt, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(d)
    _assert_one_line_error(*_cli("inspect", str(d))[::2], "truncated")


def test_corrupt_safetensors_header(rtn_ckpt, tmp_path):
    d = _copy(rtn_ckpt, tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"#" * 32
    f.write_bytes(bytes(data))
    rc, out, err = _cli("eval", str(d), "--data", str(f))
    _assert_one_line_error(rc, err, "corrupt")


def _rewrite_without(d, drop=None, reshape=None):
    from safetensors.numpy import load_file, save_file
    f = d / "model.safetensors"
    t = load_file(str(f))
    if drop:
        del t[drop]
    if reshape:
        t[reshape] = t[reshape][:, :-1].copy()
    save_file(t, str(f))


def test_missing_tensor(rtn_ckpt, tmp_path):
    d = _copy(rtn_ckpt, tmp_path)
    _rewrite_without(d, drop="model.layers.1.mlp.up_proj.scales")
    rc, _, err = _cli("inspect", str(d))
    _assert_one_line_error(rc, err, "model.layers.1.mlp.up_proj.scales", "missing")


def test_wrong_shape(rtn_ckpt, tmp_path):
    d = _copy(rtn_ckpt, tmp_path)
    _rewrite_without(d, reshape="model.layers.0.self_attn.k_proj.qweight")
    rc, _, err = _cli("inspect", str(d))
    _assert_one_line_error(rc, err, "model.layers.0.self_attn.k_proj.qweight", "shape")


def test_a_bias_the_model_lacks(rtn_ckpt, tmp_path):
    """A bias on a linear whose model has none: export built it in and `run` generated with it, while eval's
    transformers model had no place for it (eleventh hostile re-run, S32)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file
    d = _copy(rtn_ckpt, tmp_path)
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.mlp.down_proj.bias"] = np.ones(t["model.layers.0.mlp.down_proj.scales"].shape[0], np.float16)
    save_file(t, str(d / "model.safetensors"))
    for argv in (["inspect", str(d)], ["export", str(d), "--target", "cpu", "-o", str(tmp_path / "dist"), "-q"]):
        rc, _, err = _cli(*argv)
        _assert_one_line_error(rc, err, "model.layers.0.mlp.down_proj.bias", "no bias")
    assert not (tmp_path / "dist").exists()


def test_unsupported_architecture(rtn_ckpt, tmp_path, model_dirs):
    d = _copy(rtn_ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    _assert_one_line_error(*_cli("inspect", str(d))[::2], "gpt2", "llama")
    # and when quantizing an unsupported model
    m = tmp_path / "gpt2"
    shutil.copytree(model_dirs["llama"], m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (m / "config.json").write_text(json.dumps(cfg))
    rc, _, err = _cli("quantize", str(m), "-o", str(tmp_path / "out"), "--method", "rtn")
    _assert_one_line_error(rc, err, "gpt2", "supported")
    assert not (tmp_path / "out").exists()


def test_not_a_checkpoint_and_missing_path(tmp_path, model_dirs):
    _assert_one_line_error(*_cli("inspect", str(tmp_path / "nope"))[::2], "not found")
    _assert_one_line_error(*_cli("inspect", str(model_dirs["llama"]))[::2], "quantize")
    rc, _, err = _cli("quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--method", "rtn")
    _assert_one_line_error(rc, err, "not found")


def test_bad_calibration_path_fails_before_work(tmp_path, model_dirs):
    rc, _, err = _cli("quantize", str(model_dirs["llama"]), "-o", str(tmp_path / "o"), "--method", "gptq",
                      "--calib", str(tmp_path / "missing.txt"))
    _assert_one_line_error(rc, err, "missing.txt")
    assert not (tmp_path / "o").exists()


def test_output_folder_of_someone_else_is_never_replaced(tmp_path, model_dirs):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    rc, _, err = _cli("quantize", str(model_dirs["llama"]), "-o", str(precious), "--method", "rtn")
    _assert_one_line_error(rc, err, "not an output of this command")
    assert (precious / "notes.txt").read_text() == "keep me"
    # a previous edgequant checkpoint is replaced
    out = tmp_path / "q"
    for _ in range(2):
        rc, _, err = _cli("quantize", str(model_dirs["llama"]), "-o", str(out), "--method", "rtn", "-q")
        assert rc == 0, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary folders left behind


def test_safetensors_bytes_depend_only_on_contents(tmp_path):
    from safetensors.numpy import load_file

    from edgequant.checkpoint import save_safetensors
    tensors = {"w": np.arange(12, dtype=np.int32).reshape(3, 4), "s": np.linspace(0, 1, 5).astype(np.float16)}
    # a dozen metadata keys make a random hash-map order all but certain to differ between two plain writes
    meta = {f"key{i}": str(i) for i in range(12)}
    blobs = []
    for name in ("a", "b", "c"):
        save_safetensors(tensors, tmp_path / f"{name}.safetensors", meta)
        blobs.append((tmp_path / f"{name}.safetensors").read_bytes())
    assert blobs[0] == blobs[1] == blobs[2]
    back = load_file(tmp_path / "a.safetensors")
    assert all(np.array_equal(back[k], v) for k, v in tensors.items())


def test_a_checkpoint_readers_would_refuse_never_replaces_the_output(tmp_path, model_dirs, monkeypatch):
    """quantize checks what it wrote the way every reader opens it, before the swap: a refused result leaves the
    previous checkpoint at -o as it was (fifth hostile re-run, L5)."""
    from edgequant import api, artifact
    out = tmp_path / "q"
    api.quantize(str(model_dirs["llama"]), str(out), method="rtn")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def refuse(path, config):
        raise artifact.CheckpointError(f"{path / 'config.json'}: refused for the test")
    monkeypatch.setattr(artifact, "check_model_config", refuse)
    with pytest.raises(artifact.CheckpointError, match="refused for the test"):
        api.quantize(str(model_dirs["llama"]), str(out), method="rtn", bits=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
