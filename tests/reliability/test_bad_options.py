"""Bad options and arguments on every command: one `error:` line naming the option, exit 1 or 2, no traceback, and no
output folder created (all command lines run in one child process; see harness.py)."""
from __future__ import annotations

import json
import os

import pytest

from .harness import assert_one_line_error, run_commands


def _cases(ckpt, dist, text, out):
    q = ["quantize", "MODEL", "-o", out, "--method", "rtn", "-q"]
    ev = ["eval", ckpt, "--data", text, "-q"]
    wct = ["tune-weak-columns", ckpt, "--data", text, "-o", out, "-q"]
    return {
        "eval_seqlen_0": (ev + ["--seqlen", "0"], "--seqlen"),
        "eval_seqlen_negative": (ev + ["--seqlen", "-5"], "--seqlen"),
        # one token predicts nothing: ZeroDivisionError (sixteenth re-run, T34), through the DIST path too
        "eval_seqlen_1": (ev + ["--seqlen", "1"], "--seqlen"),
        "eval_dist_seqlen_1": (["eval", dist, "--data", text, "-q", "--seqlen", "1"], "--seqlen"),
        # ignored without a word (sixteenth re-run, U4)
        "eval_dist_reference": (["eval", dist, "--data", text, "-q", "--reference", ckpt], "--reference applies"),
        "eval_max_windows_negative": (ev + ["--max-windows", "-1"], "--max-windows"),
        "eval_max_windows_0": (ev + ["--max-windows", "0"], "--max-windows"),
        "eval_device_bogus": (ev + ["--device", "bogus"], "--device"),
        "eval_missing_data_file": (["eval", ckpt, "--data", out + ".nope.txt", "-q"], "nope.txt"),
        "eval_missing_checkpoint": (["eval", out + "-nope", "--data", text, "-q"], "nope"),
        "quantize_batch_size_0": (q + ["--batch-size", "0"], "--batch-size"),
        "quantize_nsamples_0": (q + ["--nsamples", "0"], "--nsamples"),
        "quantize_bits_5": (q + ["--bits", "5"], "--bits"),
        "quantize_group_size_7": (q + ["--group-size", "7"], "group_size"),
        "quantize_lwc_lr_nan": (q[:5] + ["omniquant", "--lwc-lr", "nan", "--calib", text], "--lwc-lr"),
        "quantize_epochs_negative": (q[:5] + ["omniquant", "--epochs", "-1", "--calib", text], "--epochs"),
        "quantize_device_bogus": (q + ["--device", "tpu"], "--device"),
        "quantize_cuda_without_gpu": (q + ["--device", "cuda:7"], "cuda:7"),
        "quantize_missing_model_folder": (["quantize", out + "-none/", "-o", out, "--method", "rtn", "-q"], "not found"),
        "quantize_output_is_a_file": (["quantize", "MODEL", "-o", text, "--method", "rtn", "-q"], "is a file"),
        "wct_seqlen_0": (wct + ["--seqlen", "0"], "--seqlen"),
        "wct_nsamples_0": (wct + ["--nsamples", "0"], "--nsamples"),
        "wct_heldout_0": (wct + ["--heldout", "0"], "--heldout"),
        "wct_batch_size_0": (wct + ["--batch-size", "0"], "--batch-size"),
        "wct_lr_nan": (wct + ["--lr", "nan"], "--lr"),
        "export_prefix_not_a_c_symbol": (["export", ckpt, "--target", "iphone", "-o", out, "--system-lib-prefix",
                                          "a b;rm", "-q"], "--system-lib-prefix"),
        "export_output_is_the_input": (["export", ckpt, "-o", ckpt, "-q"], "-o"),
        "export_unknown_target": (["export", ckpt, "--target", "gameboy", "-o", out, "-q"], "gameboy"),
        "run_empty_prompt": (["run", dist, "--prompt", ""], "--prompt"),
        "run_top_p_0": (["run", dist, "-p", "hi", "--top-p", "0"], "--top-p"),
        "run_top_p_negative": (["run", dist, "-p", "hi", "--top-p", "-1"], "--top-p"),
        "run_temperature_nan": (["run", dist, "-p", "hi", "--temperature", "nan"], "--temperature"),
        "run_seed_negative": (["run", dist, "-p", "hi", "--seed", "-1"], "--seed"),
        "run_not_a_dist": (["run", ckpt, "-p", "hi"], "edgequant export"),
        "bench_prompt_length_0": (["bench", dist, "--prompt-lengths", "0"], "--prompt-lengths"),
        "bench_prompt_length_negative": (["bench", dist, "--prompt-lengths", "-5"], "--prompt-lengths"),
        "bench_prompt_length_abc": (["bench", dist, "--prompt-lengths", "abc"], "--prompt-lengths"),
        "bench_repeats_0": (["bench", dist, "--repeats", "0"], "--repeats"),
        "bench_context_0": (["bench", dist, "--context", "0"], "--context"),
        "inspect_context_0": (["inspect", ckpt, "--context", "0"], "--context"),
        "eval_record_on_a_model": (["eval", "MODEL", "--data", text, "--record", "-q"], "--record"),
        "report_nothing_to_plot": (["report", "-o", out + ".png"], "give checkpoints"),
        "report_no_recorded_ppl_no_data": (["report", ckpt, "-o", out + ".png"], "--data"),
        "report_not_a_png": (["report", ckpt, "--baseline", "1", "--data", text, "-o", out + ".jpg"], ".png"),
        "report_results_missing": (["report", "--results", out + ".nope.json", "-o", out + ".png"], "nope"),
        "report_results_not_a_table": (["report", "--results", ckpt + "/config.json", "-o", out + ".png"],
                                       "no column"),
        "report_max_y_negative": (["report", ckpt, "--max-y", "-1", "-o", out + ".png"], "--max-y"),
        "unknown_command": (["quantise"], "quantise"),
        # issue 15's re-run: these reached torch, TVM or nvcc and ended in tracebacks
        "quantize_seed_2_pow_70": (q + ["--seed", str(2 ** 70)], "--seed"),
        "quantize_group_size_1e9": (q + ["--group-size", "1000000000"], "--group-size"),
        "quantize_lwc_init_nan": (q[:5] + ["omniquant", "--lwc-init", "nan", "--calib", text], "--lwc-init"),
        "quantize_lwc_init_inf": (q[:5] + ["omniquant", "--lwc-init", "inf", "--calib", text], "--lwc-init"),
        "quantize_pickle_only_model": (["quantize", "PICKLED", "-o", out, "--method", "rtn", "-q"], "safetensors"),
        "export_arch_sm_0": (["export", ckpt, "--target", "cuda", "--arch", "sm_0", "-o", out, "-q"], "--arch"),
        # the third re-run (T2): windows are drawn with replacement, so the text did not bound --nsamples; torch was
        # asked for 8 TiB after minutes of loading
        "quantize_nsamples_2_pow_40": (q[:5] + ["gptq", "--calib", text, "--seqlen", "32", "--nsamples", str(2 ** 40)],
                                       "--nsamples"),
        "wct_nsamples_2_pow_40": (wct + ["--nsamples", str(2 ** 40)], "--nsamples"),
        # the fifth re-run (T11): a damping too small to make the Hessian positive definite was a LinAlgError traceback
        "quantize_percdamp_1e-12": (q[:5] + ["gptq", "--calib", text, "--seqlen", "32", "--nsamples", "2",
                                             "--percdamp", "1e-12", "-q"], "--percdamp"),
        # absurd sizes (issue 15, after the third re-run): a memory plan of millions of TiB, a numpy traceback, runs
        # that never end, or a reply cut off when the KV cache filled; each is refused before any work
        "inspect_context_2_pow_62": (["inspect", ckpt, "--context", str(2 ** 62)], "--context 1024"),
        "inspect_context_past_the_window": (["inspect", ckpt, "--context", "1025"], "--context 1024"),
        "bench_context_2_pow_62": (["bench", dist, "--context", str(2 ** 62)], "--context 1024"),
        "bench_prompt_length_2_pow_62": (["bench", dist, "--prompt-lengths", str(2 ** 62)], "--prompt-lengths"),
        "bench_prompt_length_past_the_cache": (["bench", dist, "--prompt-lengths", "8,1000", "--decode-tokens", "64"],
                                               "--decode-tokens 25"),
        "bench_decode_tokens_2_pow_62": (["bench", dist, "--decode-tokens", str(2 ** 62)], "--decode-tokens 1023"),
        "bench_repeats_2_pow_62": (["bench", dist, "--repeats", str(2 ** 62)], "--repeats"),
        "run_max_new_tokens_2_pow_62": (["run", dist, "-p", "hi", "--max-new-tokens", str(2 ** 62)],
                                        "--max-new-tokens 1023"),
        "quantize_epochs_2_pow_62": (q[:5] + ["omniquant", "--epochs", str(2 ** 62), "--calib", text], "--epochs"),
        "quantize_batch_size_2_pow_70": (q + ["--batch-size", str(2 ** 70)], "--batch-size"),
        "quantize_weak_columns_2_pow_62": (q[:5] + ["owq", "--weak-columns", str(2 ** 62), "--calib", text,
                                                    "--nsamples", "2", "--seqlen", "32"], "--weak-columns"),
        "wct_epochs_2_pow_62": (wct + ["--epochs", str(2 ** 62)], "--epochs"),
        "wct_seed_2_pow_70": (wct + ["--seed", str(2 ** 70)], "--seed"),
        "wct_batch_size_2_pow_70": (wct + ["--batch-size", str(2 ** 70)], "--batch-size"),
        "quantize_lwc_init_1e308": (q[:5] + ["omniquant", "--lwc-init", "1e308", "--calib", text], "--lwc-init"),
        "quantize_lwc_lr_1e308": (q[:5] + ["omniquant", "--lwc-lr", "1e308", "--calib", text], "--lwc-lr"),
        "wct_lr_1e308": (wct + ["--lr", "1e308"], "--lr"),
        # the fourth re-run (S17): ignored without a word
        "quantize_embed_group_size_without_embed_bits": (q + ["--embed-group-size", "7"], "--embed-bits"),
        "demo_nsamples_2_pow_62": (["demo", "--nsamples", str(2 ** 62), "--methods", "rtn", "-o", out, "-q"],
                                   "--nsamples"),
    }


def _pickle_only_model(src, d):
    """A model folder whose weights are only a pytorch_model.bin pickle that would run a command when unpickled."""
    import pickle
    import shutil
    d.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, d / f.name)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'PWNED'}",))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    return d


@pytest.fixture(scope="module")
def results(good_ckpt, good_dist, text_file, model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-options")
    out = str(root / "out")
    cases = _cases(str(good_ckpt), str(good_dist), text_file, out)
    pickled = _pickle_only_model(model_dirs["llama"], root / "pickled")
    argvs = [[{"MODEL": model_dirs["llama"], "PICKLED": pickled}.get(a, a) for a in argv] for argv, _ in cases.values()]
    res = run_commands(argvs, root)
    return dict(zip(cases, res)), {k: w for k, (_, w) in cases.items()}, root


@pytest.mark.parametrize("name", list(_cases("C", "D", "T", "O")))
def test_bad_option_is_one_line_error(results, name):
    res, words, root = results
    assert_one_line_error(res[name], words[name])
    assert not (root / "out").exists()
    assert not (root / "pickled" / "PWNED").exists()


def test_unwritable_output_is_refused_before_any_work(model_dirs, tmp_path):
    """As root a chmod does not stop writes, so use a folder of a read-only file system."""
    r = run_commands([["quantize", model_dirs["llama"], "-o", "/proc/edgequant-out", "--method", "rtn", "-q"]],
                     tmp_path)[0]
    assert_one_line_error(r, "cannot write")


def test_missing_path_is_not_looked_up_on_an_unreachable_hub(tmp_path, monkeypatch):
    """`base/x` that does not exist here, with no way to reach the hub: an immediate error (it used to retry the
    network for ~30 s and then print transformers' message)."""
    import socket

    from edgequant import api
    from edgequant.errors import EdgequantError

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(EdgequantError, match="model path not found: base/owq-nope"):
        api.quantize("base/owq-nope", tmp_path / "o", method="rtn", progress=False)
    assert not (tmp_path / "o").exists()


def test_mistyped_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """`models/nope` beside a local `models/` folder is a missing path (it used to try the hub for ~30 s)."""
    from edgequant import api
    from edgequant.errors import EdgequantError
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EdgequantError, match="model path not found: models/nope"):
        api.quantize("models/nope", tmp_path / "o", method="rtn", progress=False)
    assert not (tmp_path / "o").exists()


def test_diverged_weak_column_tuning_writes_nothing(good_ckpt, text_file, tmp_path, monkeypatch):
    """Training that ends in NaN columns (--lr 1e308 did, before the rate was bounded) is refused, not saved as a
    checkpoint that loads and runs."""
    from edgequant import api
    from edgequant.calibrate import wct
    from edgequant.errors import EdgequantError

    def diverge(model, modules, *a, **k):
        for m in modules.values():
            m.weak.data.fill_(float("nan"))
        return [float("nan")]
    monkeypatch.setattr(wct, "train_weak_columns", diverge)
    with pytest.raises(EdgequantError, match="diverged.*nothing was written: lower --lr"):
        api.tune_weak_columns(good_ckpt, text_file, tmp_path / "t", progress=False, seqlen=32, nsamples=2, heldout=1)
    assert list(tmp_path.iterdir()) == []   # no checkpoint, no hidden temporary or lock left


CONSOLE = "import sys; from edgequant_console import main; sys.exit(main())"


def test_stdout_on_a_full_device_is_one_line(good_ckpt):
    """`inspect > /dev/full`: the printed result cannot be written (the fourth re-run's T9, an OSError traceback)."""
    import subprocess
    import sys
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-c", CONSOLE, "inspect", str(good_ckpt)], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=300)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert lines[0].startswith("error: cannot write the result (No space left on device)"), lines


def test_stdout_full_after_the_output_was_written_says_it_was(model_dirs, tmp_path):
    """`quantize ... > /dev/full`: the checkpoint is complete; only the summary after it is lost. The line called the
    result unwritable, read as the checkpoint (eighteenth re-run, U8)."""
    import subprocess
    import sys
    out = tmp_path / "q"
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-c", CONSOLE, "quantize", str(model_dirs["llama"]), "--method", "rtn",
                            "--group-size", "32", "-o", str(out), "-q"], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=300)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert lines[0].startswith(f"error: {out} was written, but its summary could not be printed (No space left"), lines
    assert (out / "model.safetensors").is_file()


def test_chat_reads_a_bounded_line_from_a_pipe(good_dist, tmp_path, monkeypatch):
    """`chat < /dev/zero` read one endless line until memory ran out, then named --nsamples in its error (eighteenth
    re-run, U6); a long line within the bound is refused by length before it is tokenized."""
    import subprocess
    import sys

    from edgequant.errors import EdgequantError
    from edgequant.export import cli
    monkeypatch.setattr(cli, "MAX_MESSAGE_CHARS", 1000)
    with open("/dev/zero") as zero:
        monkeypatch.setattr(sys, "stdin", zero)
        with pytest.raises(EdgequantError, match="a message of more than 1000 characters came in"):
            cli._read_line(">>> ")
    long = tmp_path / "long.txt"
    long.write_text("x" * 500_000 + "\n")
    with open(long) as f:
        p = subprocess.run([sys.executable, "-c", CONSOLE, "chat", str(good_dist), "--max-new-tokens", "2"], stdin=f,
                           capture_output=True, text=True, timeout=300)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert "500000 characters, more than" in lines[0] and "context" in lines[0], lines


def test_chat_with_stdin_closed_ends_like_eof(good_dist):
    """`chat <&-` (a service manager may start it so): no input is the end of the chat, not an AttributeError (T10)."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", CONSOLE, "chat", str(good_dist)], preexec_fn=lambda: os.close(0),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr and "error" not in p.stderr, p.stderr


@pytest.mark.parametrize("lang", ["C.UTF-8", "en_US.UTF-8"])
def test_input_that_is_not_utf8_is_text_with_replacement_characters(good_dist, lang):
    """Bytes that are not UTF-8 in `run -p` and on `chat`'s stdin were tokenizer TypeErrors, or a UnicodeDecodeError
    where stdin decodes strictly (sixteenth re-run, T35): they become U+FFFD, as a terminal shows them."""
    import subprocess
    import sys
    env = {**os.environ, "LANG": lang, "LC_ALL": lang, "PYTHONIOENCODING": ""}
    chat = subprocess.run([sys.executable, "-c", CONSOLE, "chat", str(good_dist), "--max-new-tokens", "2"],
                          input=b"hi \xd6\xff there\n", capture_output=True, timeout=300, env=env)
    run = subprocess.run([sys.executable, "-c", CONSOLE, "run", str(good_dist), "-p", b"hi \xd6\xff",
                          "--max-new-tokens", "2", "--json"], capture_output=True, timeout=300, env=env)
    for p in (chat, run):
        assert p.returncode == 0 and b"Traceback" not in p.stderr and b"error" not in p.stderr, p.stderr
    assert len(json.loads(run.stdout)["tokens"]) == 2
    from edgequant.export.api import user_text
    assert user_text(b"hi \xd6\xff".decode("utf-8", "surrogateescape")) == "hi \ufffd\ufffd"
    assert user_text("x\ud800") == "x?"


def test_results_table_nested_too_deeply(tmp_path):
    """`report --results` of 100,000 nested lists was a RecursionError traceback (the fourth re-run's T7)."""
    from edgequant.errors import EdgequantError
    from edgequant.plots import read_table
    f = tmp_path / "deep.json"
    f.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(EdgequantError, match="deep.json is not valid JSON") as e:
        read_table(f)
    assert "\n" not in str(e.value)


def test_nan_in_the_input_model_is_refused_where_it_enters(model_dirs, tmp_path):
    """One NaN in a Hugging Face folder's embedding: quantize, export (fp16) and convert wrote outputs that eval/run
    then refused (the fourth re-run's S16); now each says so and writes nothing."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file
    src = tmp_path / "nan-model"
    shutil.copytree(model_dirs["llama"], src)
    t = load_file(str(src / "model.safetensors"))
    t["model.embed_tokens.weight"][0, 0] = np.nan
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    argvs = [["quantize", str(src), "-o", str(tmp_path / "q"), "--method", "rtn", "-q"],
             ["export", str(src), "-o", str(tmp_path / "d"), "-q"],
             ["convert", str(src), "-o", str(tmp_path / "c"), "-q"]]
    for r in run_commands(argvs, tmp_path):
        assert_one_line_error(r, "model.embed_tokens.weight", "NaN")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["commands.json", "commands.json.out", "nan-model"]
