"""Damaged and hostile checkpoints: every case is refused by `eval` (which reads every tensor) with one `error:` line
that names the problem, no traceback, and nothing written; a few also go through `inspect` and `export`."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from .conftest import copy_case, edit_header, edit_json, edit_tensor
from .harness import assert_one_line_error, run_commands

LIN = "model.layers.0.self_attn.q_proj"


def _qc(key, value=None, drop=False):
    def f(c):
        if drop:
            c["quantization_config"].pop(key)
        else:
            c["quantization_config"][key] = value
    return lambda d: edit_json(d / "config.json", f)


def _cfg(key, value=None, drop=False):
    def f(c):
        if drop:
            c.pop(key)
        else:
            c[key] = value
    return lambda d: edit_json(d / "config.json", f)


def _header(fn):
    return lambda d: edit_header(d / "model.safetensors", fn)


def _rename_key(h):
    h[f"{LIN}.scalez"] = h.pop(f"{LIN}.scales")


def _overlap(h):
    a = h[f"{LIN}.scales"]
    b = h[f"{LIN}.zeros"]
    start = a["data_offsets"][0]
    b["data_offsets"] = [start, start + b["data_offsets"][1] - b["data_offsets"][0]]


def _index_escape(d):
    outside = d.parent / "outside.safetensors"
    shutil.move(d / "model.safetensors", outside)
    names = json.loads(outside.read_bytes()[8:8 + int.from_bytes(outside.read_bytes()[:8], "little")])
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../outside.safetensors" for k in names if k != "__metadata__"}}))


def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def _no_tokenizer(d):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / name).unlink(missing_ok=True)


def _tensor(name, fn):
    return lambda d: edit_tensor(d, name, fn)


def _set(i, v):
    def f(a):
        a = a.astype(np.int64)
        a[i] = v
        return a
    return f


def _token_ids_past_the_vocabulary(d):
    """The checkpoint's tokenizer maps every word to an id far past the model's embedding rows."""
    def f(t):
        t["model"]["vocab"] = {k: v + 50_000_000 for k, v in t["model"]["vocab"].items()}
    edit_json(d / "tokenizer.json", f)


def _deep(name):
    """JSON nested 100,000 levels deep: a recursive parser's stack overflows (issue 15's second re-run)."""
    return lambda d: (d / name).write_text("[" * 100_000 + "]" * 100_000)


def _deep_header(d):
    h = b'{"__metadata__":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    h += b" " * (-len(h) % 8)
    (d / "model.safetensors").write_bytes(len(h).to_bytes(8, "little") + h)


def _extra_tensor(d):
    from safetensors.numpy import load_file, save_file
    t = load_file(d / "model.safetensors")
    t["model.layers.0.mlp.extra.weight"] = np.ones((4, 4), np.float16)
    save_file(t, d / "model.safetensors")


def _embedding_as_int32(d):
    from safetensors.numpy import load_file, save_file
    t = load_file(d / "model.safetensors")
    t["model.embed_tokens.weight"] = np.round(t["model.embed_tokens.weight"]).astype(np.int32)
    save_file(t, d / "model.safetensors")


# name: (damage, words the one-line error must contain)
CASES = {
    "config_nested_deep": (_deep("config.json"), ["config.json"]),
    "index_nested_deep": (_deep("model.safetensors.index.json"), ["model.safetensors.index.json"]),
    "header_nested_deep": (_deep_header, ["model.safetensors"]),
    # issue 15's re-run: 10**9 layers grew memory without end; the other fields were accepted silently
    "num_hidden_layers_1e9": (_cfg("num_hidden_layers", 10 ** 9), ["num_hidden_layers", "2 layers"]),
    "max_position_embeddings_negative": (_cfg("max_position_embeddings", -1), ["max_position_embeddings"]),
    # the third re-run (S8): 2**40 was accepted; export compiled it and left a DIST that it then called damaged
    "max_position_embeddings_2_pow_40": (_cfg("max_position_embeddings", 2 ** 40),
                                         ["max_position_embeddings", "up to 16777216"]),
    "pack_msb": (_qc("pack", "msb"), ["pack"]),
    # issue 15's second re-run (N7): numbers the model computes with, out of range, gave "perplexity nan"
    "rms_norm_eps_nan": (_cfg("rms_norm_eps", math.nan), ["rms_norm_eps", "finite"]),
    "rms_norm_eps_negative": (_cfg("rms_norm_eps", -1), ["rms_norm_eps", "between 0 and 1"]),
    "rms_norm_eps_zero": (_cfg("rms_norm_eps", 0), ["rms_norm_eps"]),
    "rope_theta_zero": (_cfg("rope_theta", 0), ["rope_theta", "positive"]),
    "rope_theta_infinite": (_cfg("rope_theta", math.inf), ["rope_theta", "finite"]),
    "rope_scaling_factor_negative": (_cfg("rope_scaling", {"rope_type": "linear", "factor": -2.0}),
                                     ["rope_scaling.factor"]),
    # the fourth re-run: RoPE values that give NaN or divide by zero in export (T5, T6, S12), relations between RoPE
    # fields (S13) and Gemma's sliding window (S14) were accepted
    "sliding_window_negative": (_cfg("sliding_window", -1), ["sliding_window"]),
    # the twelfth re-run: export wrote a DIST for these (S35)
    "layer_types_too_few": (_cfg("layer_types", ["full_attention"]), ["layer_types"]),
    "layer_types_bogus": (_cfg("layer_types", ["bogus", "full_attention"]), ["layer_types"]),
    "layer_types_a_string": (_cfg("layer_types", "full_attention"), ["layer_types"]),
    # the thirteenth re-run (S35, S35c): llama's forward ignores them, its generation slides the cache
    "layer_types_sliding_on_llama": (_cfg("layer_types", ["sliding_attention", "full_attention"]),
                                     ["layer_types", "sliding-window"]),
    "rope_llama3_low_equals_high": (_cfg("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                                             "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                                                             "original_max_position_embeddings": 64}),
                                    ["low_freq_factor", "high_freq_factor"]),
    "rope_llama3_factor_1e308": (_cfg("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4, "factor": 1e308,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 64}),
                                 ["rope_parameters.factor"]),
    "rope_original_max_past_the_window": (_cfg("rope_parameters", {
        "rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 2 ** 40}), ["original_max_position_embeddings", "max_position_embeddings"]),
    "rope_per_layer_type_factor_0": (_cfg("rope_parameters", {
        "full_attention": {"rope_type": "linear", "factor": 0.0, "rope_theta": 1e4},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), ["rope_parameters.full_attention.factor"]),
    "rope_per_layer_type_theta_negative": (_cfg("rope_parameters", {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": -10.0}}),
        ["rope_parameters.sliding_attention.rope_theta"]),
    "rope_longrope_short_factor_0": (_cfg("rope_parameters", {
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 7 + [0.0], "long_factor": [1.0] * 8,
        "original_max_position_embeddings": 64}), ["short_factor[7]"]),
    "initializer_range_nan": (_cfg("initializer_range", math.nan), ["initializer_range"]),
    "values_per_word_3": (_qc("values_per_word", 3), ["values_per_word"]),
    "lm_head_quantized": (_qc("lm_head", True), ["lm_head"]),
    "method_unknown": (_qc("method", "nope"), ["method", "nope"]),
    "tokenizer_ids_past_the_vocabulary": (_token_ids_past_the_vocabulary, ["outside the vocabulary"]),
    "config_is_a_list": (lambda d: (d / "config.json").write_text("[1, 2]"), ["config.json"]),
    "config_not_json": (lambda d: (d / "config.json").write_bytes(b"\xff\xfe{"), ["config.json"]),
    "bits_missing": (_qc("bits", drop=True), ["bits"]),
    "bits_a_string": (_qc("bits", "4"), ["bits"]),
    "group_size_a_list": (_qc("group_size", [32]), ["group_size"]),
    "hidden_size_a_string": (_cfg("hidden_size", "64"), ["hidden_size"]),
    "num_hidden_layers_missing": (_cfg("num_hidden_layers", drop=True), ["num_hidden_layers"]),
    "heads_do_not_divide_hidden": (_cfg("num_attention_heads", 6), ["num_attention_heads"]),
    "unknown_model_type": (_cfg("model_type", "gpt9"), ["gpt9"]),
    "quantization_config_removed": (_cfg("quantization_config", drop=True), ["quantization_config"]),
    "sym_with_zero_points": (_qc("sym", True), ["zeros", "symmetric"]),
    "zero_point_255_at_4_bits": (_tensor(f"{LIN}.zeros", lambda a: np.full_like(a, 255)), [f"{LIN}.zeros"]),
    "outlier_index_100000": (_tensor(f"{LIN}.outlier_idx", _set(-1, 100000)), ["outlier_idx"]),
    "outlier_index_2_pow_30": (_tensor(f"{LIN}.outlier_idx", _set(-1, 1 << 30)), ["outlier_idx"]),
    "outlier_index_negative": (_tensor(f"{LIN}.outlier_idx", _set(0, -3)), ["outlier_idx"]),
    "outlier_index_duplicated": (_tensor(f"{LIN}.outlier_idx", lambda a: np.full_like(a, a[0])), ["outlier_idx"]),
    "nan_scales": (_tensor(f"{LIN}.scales", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a)),
                   [f"{LIN}.scales", "NaN"]),
    "inf_embedding": (_tensor("model.embed_tokens.weight", lambda a: a * np.float16(math.inf)), ["embed_tokens"]),
    "header_key_renamed": (_header(_rename_key), [f"{LIN}.scales"]),
    "header_a_json_list": (_header(lambda h: [h]), ["model.safetensors"]),
    "header_offsets_overlap": (_header(_overlap), ["overlaps"]),
    # the fourteenth re-run (T23): a dtype that is a JSON object or list was looked up in a dict (TypeError)
    "header_dtype_an_object": (_header(lambda h: h[f"{LIN}.scales"].__setitem__("dtype", {})), [f"{LIN}.scales"]),
    # S36: metadata safetensors' reader refuses (eval, export) passed inspect
    "header_metadata_a_list": (_header(lambda h: h.__setitem__("__metadata__", [])), ["__metadata__"]),
    "weights_truncated": (_truncate, ["truncated"]),
    "index_path_leaves_folder": (_index_escape, ["outside.safetensors"]),
    "tokenizer_missing": (_no_tokenizer, ["tokenizer"]),
    # the sixteenth re-run (S41): export copied it into a DIST no runner could use, and exited 0
    "tokenizer_json_garbage": (lambda d: (d / "tokenizer.json").write_text("{garbage"), ["tokenizer"]),
    # the fourteenth re-run: transformers takes tokenizer_config.json's fields unchecked (TypeError at the first encode)
    "tokenizer_max_length_a_string": (lambda d: edit_json(d / "tokenizer_config.json",
                                                          lambda c: c.__setitem__("model_max_length", "x")),
                                      ["tokenizer", "cannot encode"]),
    # the eighth re-run (S25): a tied config beside its own lm_head.weight was exported and evaluated (which table?)
    "tied_config_with_an_output_layer": (_cfg("tie_word_embeddings", True), ["lm_head.weight", "no place", "ties"]),
    "a_tensor_nothing_reads": (_extra_tensor, ["model.layers.0.mlp.extra.weight", "no place"]),
    # the ninth re-run (S28): an integer embedding was read as numbers
    "embedding_as_int32": (_embedding_as_int32, ["model.embed_tokens.weight", "I32", "F16"]),
}
EXPORTED = ["quantization_config_removed", "rms_norm_eps_zero", "rope_theta_zero", "num_hidden_layers_1e9", "max_position_embeddings_negative",
            "max_position_embeddings_2_pow_40", "pack_msb", "index_path_leaves_folder", "zero_point_255_at_4_bits", "outlier_index_2_pow_30", "nan_scales",
            "sym_with_zero_points", "config_is_a_list", "rope_llama3_low_equals_high", "rope_per_layer_type_factor_0",
            "tied_config_with_an_output_layer", "a_tensor_nothing_reads", "embedding_as_int32", "layer_types_bogus",
            "tokenizer_json_garbage"]


@pytest.fixture(scope="module")
def results(good_ckpt, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged-ckpt")
    argvs, where = [], {}
    for name, (damage, _) in CASES.items():
        d = copy_case(good_ckpt, root, name)
        damage(d)
        where[name] = d
        argvs.append(["eval", str(d), "--data", text_file, "--seqlen", "64", "--max-windows", "1", "-q"])
    for name in EXPORTED:
        argvs.append(["export", str(where[name]), "--target", "cpu", "-o", str(where[name].parent / "dist"), "-q"])
    argvs.append(["inspect", str(where["outlier_index_2_pow_30"])])
    argvs.append(["inspect", str(where["num_hidden_layers_1e9"])])
    argvs.append(["inspect", str(where["lm_head_quantized"])])
    argvs.append(["inspect", str(where["rms_norm_eps_nan"])])
    argvs.append(["inspect", str(where["max_position_embeddings_2_pow_40"])])
    res = run_commands(argvs, root)
    return {tuple(r["argv"][:2]): r for r in res}, where


@pytest.mark.parametrize("name", list(CASES))
def test_eval_refuses_damaged_checkpoint(results, name):
    res, where = results
    assert_one_line_error(res[("eval", str(where[name]))], *CASES[name][1])


@pytest.mark.parametrize("name", EXPORTED)
def test_export_refuses_damaged_checkpoint_and_writes_nothing(results, name):
    res, where = results
    assert_one_line_error(res[("export", str(where[name]))])
    left = sorted(p.name for p in where[name].parent.iterdir() if p.name != "outside.safetensors")
    assert left == [where[name].name]   # no DIST, no left-overs


def test_export_of_a_checkpoint_without_quantization_config_says_so(results):
    res, where = results
    assert_one_line_error(res[("export", str(where["quantization_config_removed"]))], "quantization_config",
                          "edgequant quantize")


@pytest.mark.parametrize("name,word", [("outlier_index_2_pow_30", "outlier_idx"),
                                       ("num_hidden_layers_1e9", "num_hidden_layers"),
                                       ("lm_head_quantized", "lm_head"), ("rms_norm_eps_nan", "rms_norm_eps"),
                                       ("max_position_embeddings_2_pow_40", "max_position_embeddings")])
def test_inspect_refuses(results, name, word):
    res, where = results
    assert_one_line_error(res[("inspect", str(where[name]))], word)


def test_good_checkpoint_passes_the_same_checks(good_ckpt, text_file, tmp_path):
    """The corpus's baseline: the undamaged copy evaluates and inspects (so each case fails for its damage)."""
    res = run_commands([["eval", str(good_ckpt), "--data", text_file, "--seqlen", "64", "--max-windows", "1", "-q"],
                        ["inspect", str(good_ckpt)]], tmp_path)
    assert [r["rc"] for r in res] == [0, 0], res
    assert "perplexity" in res[0]["stdout"]


def test_damaged_provenance_is_not_fatal_but_inspect_says_so(good_ckpt, tmp_path):
    damaged, missing = copy_case(good_ckpt, tmp_path, "prov"), copy_case(good_ckpt, tmp_path, "noprov")
    (damaged / "edgequant.json").write_text("[1, 2]")
    (missing / "edgequant.json").unlink()
    # a per-layer entry or a section of another type (inspect raised TypeError/AttributeError: fourteenth re-run)
    shaped = []
    for i, (key, value) in enumerate([("layers", {"model.layers.0.mlp.down_proj": 3}), ("options", [1]),
                                      ("time_s", "x")]):
        d = copy_case(good_ckpt, tmp_path, f"prov{i}")
        edit_json(d / "edgequant.json", lambda p: p.__setitem__(key, value))
        shaped.append(d)
    res = run_commands([["inspect", str(damaged), "--json"], ["inspect", str(missing)]]
                       + [["inspect", str(d)] for d in shaped], tmp_path)
    for r, state in zip(res, ("damaged", "missing", "damaged", "damaged", "damaged")):
        assert r["rc"] == 0 and r["traceback"] is None
        assert r["stderr"].startswith("warning: ") and f"edgequant.json is {state}" in r["stderr"]
    assert json.loads(res[0]["stdout"])["method"] == "owq"
    assert "calibration     unknown (edgequant.json missing)" in res[1]["stdout"]


def test_a_null_provenance_section_is_not_damage(model_dirs, tmp_path):
    """RTN records `"calibration": null`: inspect called every RTN checkpoint's edgequant.json damaged after the
    section types were checked (null is "not recorded")."""
    from edgequant import api
    from edgequant.checkpoint import inspect
    ck = api.quantize(model_dirs["llama"], tmp_path / "rtn", method="rtn", group_size=32, progress=False)
    assert json.loads((ck / "edgequant.json").read_text())["calibration"] is None
    assert inspect(ck)["provenance"] == "ok"


def test_fp16_table_beside_the_quantized_one_is_refused(model_dirs, tmp_path):
    """An `--embed-bits 4` checkpoint with a zero fp16 `model.embed_tokens.weight` added: the fp16 one was loaded in
    place of the packed table (uniform logits, exit 0; the fourth re-run's S15)."""
    from safetensors.numpy import load_file, save_file

    from edgequant import api
    from edgequant.artifact import load_quantized_model
    from edgequant.errors import CheckpointError
    ck = api.quantize(model_dirs["llama"], tmp_path / "emb4", method="rtn", group_size=32, embed_bits=4,
                      progress=False)
    f = ck / "model.safetensors"
    t = load_file(str(f))
    assert "model.embed_tokens.qweight" in t and "model.embed_tokens.weight" not in t
    t["model.embed_tokens.weight"] = np.zeros((320, 64), np.float16)
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'model.embed_tokens.weight' is stored beside its quantized form"):
        load_quantized_model(ck)


def test_original_context_is_checked_only_where_rope_uses_it():
    """A Phi-3 config without original_max_position_embeddings gets transformers' 4096 beside a shorter context;
    default RoPE never reads it, so it is no reason to refuse (fifth hostile re-run, L5); longrope reads it."""
    from edgequant.checkpoint import number_problem
    cfg = {"model_type": "phi3", "max_position_embeddings": 1024, "original_max_position_embeddings": 4096}
    for rope in ({"rope_type": "default", "rope_theta": 1e4}, None):
        assert number_problem({**cfg, "rope_parameters": rope}) is None
    longrope = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [1.0]}
    assert "original_max_position_embeddings" in number_problem({**cfg, "rope_parameters": longrope})
