"""Damaged and hostile DIST folders: `run` refuses each with one `error:` line before TVM opens a path, an offset or an
index that the files name (these used to load outside files and libraries, and to segfault)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from .conftest import copy_case, dist_record, edit_dist_tensor, edit_json
from .harness import assert_one_line_error, run_commands

CACHE = "tensor-cache.json"
EXPORT = "edgequant-export.json"


def _cache(fn):
    return lambda d: edit_json(d / CACHE, fn)


def _first_shard(fn):
    def f(c):
        fn(c["records"][0])
    return _cache(f)


def _record(suffix, key, value):
    def f(c):
        for shard in c["records"]:
            for r in shard["records"]:
                if r["name"].endswith(suffix):
                    r[key] = value
                    return
    return _cache(f)


def _outside_shard(d):
    shutil.copy(d / "params_shard_0.bin", d.parent / "outside_shard.bin")
    _first_shard(lambda s: s.__setitem__("dataPath", "../outside_shard.bin"))(d)


def _outside_library(d):
    shutil.copy(d / "lib.so", d.parent / "x.so")
    edit_json(d / EXPORT, lambda i: i.__setitem__("library", "../x.so"))


def _symlinked_shard(d):
    shard = d / "params_shard_0.bin"
    shutil.move(shard, d.parent / "elsewhere.bin")
    os.symlink(d.parent / "elsewhere.bin", shard)


def _truncate_shard(d):
    f = d / "params_shard_0.bin"
    f.write_bytes(f.read_bytes()[:-4096])


def _flip_shard_bytes(d):
    f = d / "params_shard_0.bin"
    data = bytearray(f.read_bytes())
    for o in range(len(data) // 3, len(data) // 3 + 4096, 4):
        data[o] ^= 0xFF
    f.write_bytes(bytes(data))


def _pop(key):
    return lambda d: edit_json(d / EXPORT, lambda i: i.pop(key))


def _outlier(value):
    return lambda d: edit_dist_tensor(d, "self_attn.qkv_proj.outlier_idx", lambda a: np.append(a[:-1], value))


def _export(fn):
    return lambda d: edit_json(d / EXPORT, fn)


def _model(key, value):
    return _export(lambda i: i["model"].__setitem__(key, value))


def _truncate_library(d):
    f = d / "lib.so"
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 3])


def _nan_in(suffix):
    return lambda d: edit_dist_tensor(d, suffix, lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, np.inf, a))


CASES = {
    # issue 15's re-run: a truncated ELF faulted (SIGBUS) inside dlopen; a deep JSON overflowed the parsers' stacks
    "library_truncated": (_truncate_library, ["lib.so", "truncated"]),
    "tensor_cache_nested_100000_deep": (lambda d: (d / CACHE).write_text("[" * 100000 + "]" * 100000),
                                        [CACHE, "nested"]),
    "prefill_chunk_2_pow_40": (_export(lambda i: i.__setitem__("prefill_chunk_size", 2 ** 40)),
                               ["prefill_chunk_size"]),
    "context_window_2_pow_40": (_model("context_window", 2 ** 40), ["context_window"]),
    "num_layers_not_the_library": (_model("num_layers", 3), ["num_layers"]),
    "vocab_size_not_the_library": (_model("vocab_size", 400), ["vocab_size"]),
    "vocab_size_2_pow_40": (_model("vocab_size", 2 ** 40), ["vocab_size"]),
    "target_unknown": (_export(lambda i: i.__setitem__("target", "evil")), ["target"]),
    "functions_without_prefill": (_export(lambda i: i.__setitem__("functions", ["embed"])), ["functions"]),
    "format_version_99": (_export(lambda i: i.__setitem__("format_version", 99)), ["format_version"]),
    "tvm_version_other": (_export(lambda i: i.__setitem__("tvm_version", "0.1.0")), ["TVM 0.1.0"]),
    "embedding_inf": (_nan_in("embed_tokens.weight"), ["embed_tokens.weight", "infinite"]),
    "lm_head_inf": (_nan_in("lm_head.weight"), ["lm_head.weight", "infinite"]),
    "norm_inf": (_nan_in("input_layernorm.weight"), ["input_layernorm.weight", "infinite"]),

    "dataPath_leaves_folder": (_outside_shard, ["dataPath", "outside_shard.bin"]),
    "dataPath_etc_passwd": (_first_shard(lambda s: s.__setitem__("dataPath", "../../../../etc/passwd")), ["dataPath"]),
    "dataPath_absolute": (_first_shard(lambda s: s.__setitem__("dataPath", "/etc/passwd")), ["dataPath"]),
    "shard_symlink_out_of_folder": (_symlinked_shard, ["dataPath"]),
    "library_leaves_folder": (_outside_library, ["library", "x.so"]),
    "byteOffset_1e9": (_record("qkv_proj.qweight", "byteOffset", 10 ** 9), ["qkv_proj.qweight"]),
    "nbytes_wrong": (_record("qkv_proj.scales", "nbytes", 7), ["qkv_proj.scales"]),
    "shape_wrong": (_record("o_proj.qweight", "shape", [1, 1]), ["o_proj.qweight"]),
    "dtype_wrong": (_record("o_proj.scales", "dtype", "float32"), ["o_proj.scales"]),
    "outlier_index_2_pow_30": (_outlier(1 << 30), ["outlier_idx"]),
    "outlier_index_100000": (_outlier(100000), ["outlier_idx"]),
    "zero_point_255": (lambda d: edit_dist_tensor(d, "o_proj.zeros", lambda a: np.full_like(a, 255)), ["zeros"]),
    "nan_scales": (lambda d: edit_dist_tensor(d, "o_proj.scales", lambda a: np.full_like(a, np.nan)), ["scales"]),
    "shard_missing": (lambda d: (d / "params_shard_0.bin").unlink(), ["params_shard_0.bin"]),
    "shard_truncated": (_truncate_shard, ["params_shard_0.bin"]),
    # the sixth re-run of issue 15 (S19): flipped bytes inside a weight ran and gave other tokens, without an error
    "shard_bytes_flipped": (_flip_shard_bytes, ["params_shard_0.bin", "md5sum"]),
    "shard_md5sum_wrong": (_first_shard(lambda s: s.__setitem__("md5sum", "0" * 32)), ["params_shard_0.bin", "md5sum"]),
    "shard_md5sum_missing": (_first_shard(lambda s: s.pop("md5sum")), ["params_shard_0.bin", "md5sum"]),
    "tensor_cache_not_json": (lambda d: (d / CACHE).write_bytes(b"\x00{garbage"), [CACHE]),
    "tensor_cache_a_list": (lambda d: (d / CACHE).write_text("[]"), [CACHE]),
    "tensor_cache_missing": (lambda d: (d / CACHE).unlink(), [CACHE]),
    "library_random_bytes": (lambda d: (d / "lib.so").write_bytes(os.urandom(4096)), ["lib.so"]),
    # the second re-run of issue 15: a symlink loop raised a traceback while its path was resolved
    "library_symlink_loop": (lambda d: ((d / "lib.so").unlink(), os.symlink("lib.so", d / "lib.so")), ["library"]),
    "export_json_a_list": (lambda d: (d / EXPORT).write_text("[]"), [EXPORT]),
    "export_json_without_params": (_pop("params"), ["params"]),
    "export_json_bad_vocab": (lambda d: edit_json(d / EXPORT, lambda i: i["model"].__setitem__("vocab_size", -1)),
                              ["vocab_size"]),
    "tokenizer_missing": (lambda d: (d / "tokenizer.json").unlink(), ["tokenizer"]),
    # the fifteenth re-run: a non-text chat template failed in jinja when `chat` compiled it (traceback)
    "tokenizer_chat_template_a_number": (lambda d: edit_json(d / "tokenizer_config.json",
                                                             lambda c: c.__setitem__("chat_template", -1)),
                                         ["tokenizer", "chat_template"]),
    "tokenizer_max_length_a_list": (lambda d: edit_json(d / "tokenizer_config.json",
                                                        lambda c: c.__setitem__("model_max_length", [])),
                                    ["tokenizer", "cannot encode"]),
    # the second re-run of issue 15 (N8): the model block's numbers were not range-checked; the messages said
    # "missing or has the wrong type" for values that were present but out of range
    "rms_norm_eps_nan": (_model("rms_norm_eps", float("nan")), ["rms_norm_eps", "finite"]),
    "rms_norm_eps_negative": (_model("rms_norm_eps", -1), ["rms_norm_eps", "between 0 and 1"]),
    "rope_theta_zero": (_model("rope_theta", 0), ["rope_theta", "positive"]),
    "rope_theta_nan": (_model("rope_theta", float("nan")), ["rope_theta"]),
    "rope_scale_negative": (_model("rope_scale", -1.0), ["rope_scale"]),
    "rope_scaling_factor_infinite": (_model("rope_scaling", {"rope_type": "llama3", "factor": float("inf")}),
                                     ["rope_scaling.factor"]),
    "prefill_chunk_zero": (_export(lambda i: i.__setitem__("prefill_chunk_size", 0)),
                           ["prefill_chunk_size", "positive integer"]),
    "head_dim_missing": (_export(lambda i: i["model"].pop("head_dim")), ["head_dim", "missing"]),
    "library_missing": (lambda d: (d / "lib.so").unlink(), ["lib.so"]),
    # the third re-run of issue 15: heads and widths were not checked against the library (S9; the KV cache and the
    # reported memory followed the false number), the runners disagreed on model_type and format_version (S10), and
    # a tensor listed twice was accepted, the last copy used (S11)
    "num_kv_heads_1": (_model("num_kv_heads", 1), ["num_kv_heads", "qkv_proj"]),
    "num_kv_heads_3": (_model("num_kv_heads", 3), ["num_kv_heads", "qkv_proj"]),
    "head_dim_32": (_model("head_dim", 32), ["head_dim", "qkv_proj"]),
    "head_dim_8": (_model("head_dim", 8), ["head_dim", "qkv_proj"]),
    "num_heads_8": (_model("num_heads", 8), ["num_heads", "qkv_proj"]),
    "intermediate_size_half": (_model("intermediate_size", 80), ["intermediate_size", "gate_up_proj"]),
    "model_type_gpt2": (_model("model_type", "gpt2"), ["model_type", "llama"]),
    "format_version_true": (_export(lambda i: i.__setitem__("format_version", True)), ["format_version"]),
    "format_version_float": (_export(lambda i: i.__setitem__("format_version", 1.0)), ["format_version"]),
    # the fourth re-run: the same RoPE and sliding-window rules as a checkpoint's config.json (both runners)
    "sliding_window_negative": (_model("sliding_window", -1), ["sliding_window"]),
    "rope_scaling_low_equals_high": (_model("rope_scaling", {"rope_type": "llama3", "factor": 8.0,
                                                             "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                                                             "original_max_position_embeddings": 64}),
                                     ["low_freq_factor", "high_freq_factor"]),
    "rope_scaling_factor_1e308": (_model("rope_scaling", {"rope_type": "llama3", "factor": 1e308, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0}), ["rope_scaling.factor"]),
    # S18: a module's bit width that the library does not have (the C runtime used the library's, silently)
    "param_bits_not_the_librarys": (_export(lambda i: next(p for p in i["params"] if p["name"].endswith(
        "qkv_proj.qweight")).__setitem__("bits", 2)), ["differ", "export"]),
    # the tenth re-run (S31): a longrope library whose model block lost rope_long_factors ran long prompts with the
    # short factors in the C runtime (a plain library that names prefill_long stands in for it here)
    "prefill_long_without_long_factors": (_export(lambda i: i["functions"].append("prefill_long")),
                                          ["rope_long_factors", "prefill_long"]),
    # the fourteenth re-run's sweep: a JSON list or object where a name is expected was looked up in a dict
    "target_a_list": (_export(lambda i: i.__setitem__("target", [])), [EXPORT, "'target'"]),
    "param_dtype_an_object": (_export(lambda i: i["params"][1].__setitem__("dtype", {})), [EXPORT, "'params'"]),
    "model_type_a_list": (_model("model_type", [1]), [EXPORT, "model_type"]),
    # the fifteenth re-run: TVM's loader reads these keys unchecked (KeyError traceback)
    "shard_format_missing": (_first_shard(lambda s: s.pop("format")), [CACHE, "raw-shard"]),
    "record_format_missing": (_first_shard(lambda s: s["records"][0].pop("format")), [CACHE]),
    "tensor_listed_twice": (_cache(lambda c: c["records"].append(c["records"][0])), [CACHE, "listed twice"]),
    # the fourteenth re-run (T24, T25): a dtype looked up in a dict (TypeError), a dimension numpy cannot hold
    "record_dtype_a_list": (_first_shard(lambda s: s["records"][0].__setitem__("dtype", [1, 2])), [CACHE]),
    "record_dimension_2_pow_64": (_first_shard(lambda s: s["records"][0]["shape"].__setitem__(0, 2 ** 64)),
                                  [CACHE, "nbytes"]),
    "tensor_redefined_by_a_second_shard": (_cache(lambda c: c["records"].append(
        {**c["records"][0], "records": c["records"][0]["records"][:1]})), [CACHE, "listed twice"]),
}


@pytest.fixture(scope="module")
def results(good_dist, tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged-dist")
    argvs, where = [], {}
    for name, (damage, _) in CASES.items():
        d = copy_case(good_dist, root, name)
        damage(d)
        where[name] = d
        argvs.append(["run", str(d), "--prompt", "hello", "--max-new-tokens", "2"])
    return {r["argv"][1]: r for r in run_commands(argvs, root)}, where


@pytest.mark.parametrize("name", list(CASES))
def test_run_refuses_damaged_dist(results, name):
    res, where = results
    r = res[str(where[name])]
    assert_one_line_error(r, *CASES[name][1])
    assert r["stdout"] == ""   # the prompt is not echoed before the error


@pytest.mark.parametrize("name,words", [("library_missing", ["no lib.so", "copy the whole folder"]),
                                        ("prefill_chunk_zero", ["is 0"]), ("rms_norm_eps_negative", ["is -1"])])
def test_messages_name_what_is_wrong(results, name, words):
    """A missing library was called a library "for static linking", and values out of range "missing or of the wrong
    type"."""
    res, where = results
    assert_one_line_error(res[str(where[name])], *words)


def test_good_dist_runs(good_dist, tmp_path):
    r = run_commands([["run", str(good_dist), "--prompt", "hello", "--max-new-tokens", "2"]], tmp_path)[0]
    assert r["rc"] == 0 and r["traceback"] is None and r["stdout"].startswith("hello")


def test_token_ids_outside_the_vocabulary_are_refused(good_dist):
    from edgequant.errors import EdgequantError
    from edgequant.export.runtime import Runner
    r = Runner(good_dist, load_tokenizer=False)
    for bad in ([r.vocab], [5, 50_000_000], [-1]):
        with pytest.raises(EdgequantError, match="outside the vocabulary"):
            r.generate(bad, 2)
    assert len(r.generate([1, 2, 3], 2).tokens) == 2   # and the runner still works afterwards


def test_records_that_do_not_fit_their_shard_are_found_without_reading_the_weights(good_dist, tmp_path):
    """A shard named by a record exists and bounds every offset (checked from sizes and offsets)."""
    from edgequant.errors import EdgequantError
    from edgequant.export.dist import check_tensor_cache, read_export_info
    d = copy_case(good_dist, tmp_path, "offset")
    shard, rec = dist_record(d, "embed_tokens.weight")
    _record("embed_tokens.weight", "byteOffset", (d / shard["dataPath"]).stat().st_size - rec["nbytes"] + 2)(d)
    with pytest.raises(EdgequantError, match="past the end"):
        check_tensor_cache(d, read_export_info(d))


def _unsafe_template(d):
    edit_json(d / "tokenizer_config.json", lambda c: c.__setitem__(
        "chat_template", "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m.content }}{% endfor %}"))


def test_refusals_outside_the_run_corpus(good_dist, text_file, tmp_path):
    """An unsafe chat template (jinja2's sandbox raised SecurityError through), `eval` of a damaged DIST (a `note:`
    came before the error) and a cuda DIST on a machine without a CUDA driver (ctypes' OSError): one line each."""
    import ctypes.util
    tpl = copy_case(good_dist, tmp_path, "tpl")
    _unsafe_template(tpl)
    bad = copy_case(good_dist, tmp_path, "bad")
    _truncate_shard(bad)
    argvs = [["run", str(tpl), "--prompt", "hello", "--chat-template", "--max-new-tokens", "2"],
             ["eval", str(bad), "--data", text_file, "--seqlen", "32", "--max-windows", "1"]]
    cuda = None if ctypes.util.find_library("cuda") else copy_case(good_dist, tmp_path, "cuda")
    if cuda is not None:
        edit_json(cuda / EXPORT, lambda i: i.update(target="cuda", device="cuda"))
        argvs.append(["run", str(cuda), "--prompt", "hello"])
    res = run_commands(argvs, tmp_path)
    assert_one_line_error(res[0], "chat_template", "tokenizer_config.json")
    assert_one_line_error(res[1], "params_shard_0.bin")
    if cuda is not None:
        assert_one_line_error(res[2], "CUDA")


def test_chat_template_asked_for_but_missing_is_one_line(good_dist):
    """`run --chat-template` on a DIST without a template ran the raw prompt without a word (eighteenth re-run, U11)."""
    from edgequant.errors import EdgequantError
    from edgequant.export.api import run
    with pytest.raises(EdgequantError, match="--chat-template: .* has no usable chat template"):
        run(good_dist, "hi", max_new_tokens=1, chat_template=True)
    assert run(good_dist, "hi", max_new_tokens=1)["tokens"]


def test_full_disk_while_linking_is_one_line_and_leaves_nothing(tmp_path):
    """TVM reports the linker's ENOSPC as a RuntimeError; atomic_output_dir (where export links) turns it into its
    one line (`atomic.as_os_error`)."""
    from edgequant.atomic import atomic_output_dir
    from edgequant.errors import EdgequantError

    class FullDisk:
        def export_library(self, path, **kw):
            open(path, "wb").write(b"\x7fELF")
            raise RuntimeError("Compilation error:\n/usr/bin/ld: final link failed: No space left on device")
    with pytest.raises(EdgequantError, match="No space left on device"):
        with atomic_output_dir(tmp_path / "dist", marker=EXPORT) as tmp:
            FullDisk().export_library(str(tmp / "lib.so"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_checks_its_own_dist_before_it_replaces_anything(good_dist, tmp_path):
    """The third re-run (S8): export wrote a whole DIST to -o and only then called it damaged; the check now runs on
    the hidden folder inside atomic_output_dir, so a refusal leaves -o as it was."""
    from edgequant.atomic import atomic_output_dir
    from edgequant.errors import EdgequantError
    from edgequant.export.build import _check_own_output
    out = tmp_path / "dist"
    with pytest.raises(EdgequantError, match="nothing was written to") as e:
        with atomic_output_dir(out, marker=EXPORT) as tmp:
            shutil.copytree(good_dist, tmp, dirs_exist_ok=True)
            edit_json(tmp / EXPORT, lambda i: i["model"].__setitem__("context_window", 2 ** 40))
            _check_own_output(tmp, out, good_dist)
    assert "context_window" in str(e.value) and str(tmp) not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    _check_own_output(good_dist, out, good_dist)   # a good DIST passes


def test_a_chat_template_that_renders_nothing_is_refused():
    """Nothing to prefill: the runner's generate failed on it with an AttributeError (seventeenth re-run, T37)."""
    from conftest import make_tokenizer

    from edgequant.errors import EdgequantError
    from edgequant.export.api import _apply_template
    tok = make_tokenizer()
    tok.chat_template = "{% if false %}x{% endif %}"
    with pytest.raises(EdgequantError, match="renders this conversation to no tokens"):
        _apply_template(tok, [{"role": "user", "content": "hi"}], "DIST", 2048)
    tok.chat_template = '{{ "x" * 10**8 }}'   # tokenizing 10**9 of them ran for minutes past 3 GB (U5)
    with pytest.raises(EdgequantError, match="renders this conversation to 100000000 characters"):
        _apply_template(tok, [{"role": "user", "content": "hi"}], "DIST", 2048)
    tok.chat_template = "{% for m in messages %}<{{ m.content }}>{% endfor %}"
    assert _apply_template(tok, [{"role": "user", "content": "hi"}], "DIST", 2048) == tok("<hi>")["input_ids"]


@pytest.mark.parametrize("template, error", [("{{ 1/0 }}", "ZeroDivisionError"),
                                             ("{{ 1 + 'a' }}", "TypeError"),
                                             ("{% for i in range(10**9) %}x{% endfor %}", "OverflowError")])
def test_a_chat_template_that_raises_while_rendering_is_refused(template, error):
    """Errors other than jinja2's own, raised by the template's code as it renders, came through as tracebacks
    (sixteenth re-run, T32)."""
    from conftest import make_tokenizer

    from edgequant.errors import EdgequantError
    from edgequant.export.api import _apply_template
    tok = make_tokenizer()
    tok.chat_template = template
    with pytest.raises(EdgequantError, match=f"chat_template in DIST/tokenizer_config.json was refused \\({error}"):
        _apply_template(tok, [{"role": "user", "content": "hi"}], "DIST", 2048)


def test_a_prompt_of_no_tokens_is_one_line(good_dist):
    """Nothing to prefill (a prompt or template that encodes to no tokens): an AttributeError from the sampler."""
    from edgequant.errors import EdgequantError
    from edgequant.export.runtime import Runner
    with pytest.raises(EdgequantError, match="the prompt encodes to no tokens"):
        Runner(good_dist).generate([], 2)
