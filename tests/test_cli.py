"""The user's journey on a tiny model through the command line: quantize (rtn, gptq), inspect, eval, errors."""
import json

import pytest
from click.testing import CliRunner

from edgequant.cli import main
from edgequant.errors import EdgequantError


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def test_help_lists_commands(runner):
    r = runner.invoke(main, ["--help"])
    assert r.exit_code == 0
    for cmd in ("quantize", "eval", "inspect", "demo"):
        assert cmd in r.output


@pytest.mark.parametrize("arch", ["llama", pytest.param("mistral", marks=pytest.mark.slow),
                                  pytest.param("qwen2", marks=pytest.mark.slow)])   # CI time
def test_gptq_beats_rtn_end_to_end(runner, tmp_path, model_dirs, text_file, arch):
    model = str(model_dirs[arch])
    common = ["--bits", "3", "--group-size", "32", "-q"]
    r = runner.invoke(main, ["quantize", model, "-o", str(tmp_path / "rtn"), "--method", "rtn", *common])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["quantize", model, "-o", str(tmp_path / "gptq"), "--method", "gptq", "--calib", text_file,
                             "--nsamples", "16", "--seqlen", "128", *common])
    assert r.exit_code == 0, r.output
    assert "bits/weight" in r.output

    r = runner.invoke(main, ["inspect", str(tmp_path / "gptq"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["method"] == "gptq" and info["scheme"] == "w3g32"
    assert info["calibration"]["nsamples"] == 16 and info["calibration"]["seqlen"] == 128
    assert info["bits_per_weight"] == pytest.approx(32 * 7 / 64 + 24 / 32, rel=0.02)  # K=64: 7 words of 10 values
    layer = info["layers"]["model.layers.0.self_attn.q_proj"]
    assert 0 < layer["output_rel_err"] < 1

    def kl(ck):  # a random model's perplexity is about its vocabulary size, so compare distributions instead
        r = runner.invoke(main, ["eval", ck, "--data", text_file, "--seqlen", "128", "--max-windows", "12",
                                 "--reference", model, "--json", "-q"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["kl_divergence"]

    kl_rtn, kl_gptq = kl(str(tmp_path / "rtn")), kl(str(tmp_path / "gptq"))
    assert 0 < kl_gptq < 0.8 * kl_rtn, (kl_gptq, kl_rtn)


def test_eval_reference_reports_kl(runner, tmp_path, model_dirs, text_file):
    model = str(model_dirs["llama"])
    runner.invoke(main, ["quantize", model, "-o", str(tmp_path / "q"), "--method", "rtn", "--bits", "2", "-q"])
    r = runner.invoke(main, ["eval", str(tmp_path / "q"), "--data", text_file, "--seqlen", "64", "--max-windows", "4",
                             "--reference", model, "--json", "-q"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["kl_divergence"] > 0 and 0 < res["top1_agreement"] < 1
    r = runner.invoke(main, ["eval", model, "--data", text_file, "--seqlen", "64", "--max-windows", "4",
                             "--reference", model, "--json", "-q"])
    same = json.loads(r.stdout)
    assert same["kl_divergence"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1.0


@pytest.mark.slow   # CI time: test_checkpoint_stability's recorded layouts and errors (gptq among them) are a stricter check
def test_calibration_is_reproducible(runner, tmp_path, model_dirs, text_file):
    model = str(model_dirs["llama"])
    args = ["--method", "gptq", "--calib", text_file, "--nsamples", "4", "--seqlen", "64", "-q", "--seed", "3"]
    for name in ("a", "b"):
        assert runner.invoke(main, ["quantize", model, "-o", str(tmp_path / name), *args]).exit_code == 0
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_gptq_without_calibration_is_a_clear_error(runner, tmp_path, model_dirs):
    r = runner.invoke(main, ["quantize", str(model_dirs["llama"]), "-o", str(tmp_path / "x"), "--method", "gptq"])
    assert r.exit_code == 1 and "--calib" in r.output


@pytest.mark.slow   # CI time (80 s): the CLI test below runs the demo; OmniQuant beats RTN per block in its tests
def test_demo_runs_every_method_and_omniquant_beats_rtn(tmp_path, model_dirs, text_file, monkeypatch):
    """The demo's orchestration on a tiny model (the real one is fetched from PyPI; see benchmarks for its numbers)."""
    from edgequant import api, loading
    monkeypatch.setattr(loading, "fetch_default_model", lambda progress=True: model_dirs["llama"])
    rows = api.demo(tmp_path / "demo", bits=2, group_size=32, calib=text_file, data=text_file, nsamples=4, seqlen=64,
                    eval_seqlen=64, max_windows=4, progress=False)
    by = {r["method"].split()[0]: r for r in rows[1:]}
    assert list(by) == ["rtn", "gptq", "omniquant", "owq"]
    assert by["owq"]["method"] == "owq target-bits=2.1" and by["omniquant"]["calibration"] == "32x256"
    assert by["omniquant"]["perplexity"] < by["rtn"]["perplexity"]
    assert all(r["perplexity"] > rows[0]["perplexity"] * 0.98 for r in rows[1:])
    with pytest.raises(EdgequantError, match="choose from"):
        api.demo(tmp_path / "x", methods=("awq",), calib=text_file, data=text_file)


@pytest.fixture
def tiny_demo(monkeypatch, model_dirs, tmp_path):
    """The demo on the tiny llama, with its cache folder under tmp_path."""
    from edgequant import loading
    monkeypatch.setattr(loading, "fetch_default_model", lambda progress=True: model_dirs["llama"])
    monkeypatch.setenv("EDGEQUANT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.slow   # CI time: the CLI test below prints the same rows as they come
def test_demo_reports_each_row_as_it_finishes(tiny_demo, text_file, monkeypatch):
    from edgequant import api
    evals = []
    real_evaluate = api.evaluate
    monkeypatch.setattr(api, "evaluate", lambda *a, **k: evals.append(a[0]) or real_evaluate(*a, **k))
    seen = []
    rows = api.demo(bits=2, group_size=32, methods=("rtn", "gptq"), calib=text_file, data=text_file, nsamples=4,
                    seqlen=64, eval_seqlen=64, max_windows=2, progress=False,
                    on_row=lambda row, left: seen.append((row["method"], len(evals), left)))
    # each row arrives right after its own evaluation, before the next method starts
    assert [(m, n) for m, n, _ in seen] == [("fp32 (dequantized GGUF)", 1), ("rtn", 2), ("gptq", 3)]
    assert seen[0][2] > 0 and seen[1][2] > 0 and seen[2][2] is None
    assert [r["method"] for r in rows] == [m for m, _, _ in seen]
    assert rows[1]["bits_target"] == 2.0 and rows[1]["bits_per_weight"] > 2


def test_demo_cli_prints_rows_and_checkpoint_folder_in_edgequant_cache(runner, tiny_demo, text_file):
    r = runner.invoke(main, ["demo", "--bits", "2", "--group-size", "32", "--methods", "rtn,owq", "--calib", text_file,
                             "--data", text_file, "--nsamples", "4", "--seqlen", "64", "--max-windows", "2", "-q"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith(f"checkpoints: {tiny_demo / 'demo'}")
    rows = [line for line in lines if line.startswith("[")]
    assert rows[0].startswith("[1/3] fp32") and "left" in rows[0]
    assert rows[1].startswith("[2/3] rtn (w2g32, 2 bits/weight target, 2.") and "left" in rows[1]
    assert rows[2].startswith("[3/3] owq target-bits=2.1 (w2g32, 2.1 bits/weight target, 2.")
    assert "left" not in rows[2]
    assert "| 2.1 / 2." in r.output  # the table's target / stored column
    assert (tiny_demo / "demo" / "owq-w2g32" / "edgequant.json").is_file()
    assert f"edgequant export {tiny_demo / 'demo' / 'owq-w2g32'} --target cpu" in r.output


def test_quantize_says_when_it_replaced_a_checkpoint(runner, tmp_path, model_dirs):
    args = ["quantize", str(model_dirs["llama"]), "-o", str(tmp_path / "q"), "--method", "rtn", "--bits", "3", "-q"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "3 bits/weight target, 3." in first.output and "replaced" not in first.output
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and "replaced the checkpoint that was there" in again.output


def test_eval_help_says_a_dist_is_slower(runner):
    r = runner.invoke(main, ["eval", "--help"])
    assert r.exit_code == 0 and "9x slower" in r.output


@pytest.mark.parametrize("seqlen", [1, 0, True, 2.5])
def test_an_evaluation_window_holds_at_least_two_tokens(seqlen):
    """The Python API checks what the CLI's option type checks (one token predicts nothing: sixteenth re-run, T34)."""
    from edgequant.data import check_eval_seqlen
    from edgequant.errors import EdgequantError
    with pytest.raises(EdgequantError, match="--seqlen must be at least 2 tokens"):
        check_eval_seqlen(seqlen)
    check_eval_seqlen(2)
