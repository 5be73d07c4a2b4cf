"""apps/runtime on this machine (x86-64): the C API and edgequant-runtime-cli give the tokens and logits of
`edgequant run` (export/runtime.py's Runner) for a tiny OWQ model's cpu export, refuse bad calls and damaged DIST
folders with a status and a one-line message, and sample reproducibly."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from .runtime_capi import ROOT, STATUS, cmake_build

pytestmark = pytest.mark.tvm

PROMPT = [1, 5, 9, 200, 17, 42, 3]
LONG = [int(x) for x in np.random.default_rng(1).integers(0, 320, 300)]   # > prefill_chunk_size (256): two chunks


@pytest.fixture(scope="module")
def runner(cpu_dist):
    from edgequant.export.runtime import Runner
    return Runner(cpu_dist, load_tokenizer=False)


@pytest.fixture
def model(capi, cpu_dist):
    s, h = capi.open(cpu_dist)
    assert s == 0, capi.error()
    yield h
    capi.lib.edgequant_close(h)


def test_cli_greedy_tokens_equal_edgequant_run(runtime_build, cpu_dist, runner):
    for ids, n in ((PROMPT, 32), (LONG, 8)):
        want = runner.generate(ids, n, stop_ids=()).tokens
        r = subprocess.run([str(runtime_build / "edgequant-runtime-cli"), str(cpu_dist), *map(str, ids), str(n)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert [int(t) for t in r.stdout.strip().split(",")] == want
        assert "decode" in r.stderr and "tok/s" in r.stderr


def test_c_api_logits_memory_and_multi_turn(capi, model, runner):
    info = capi.info(model)
    assert (info.vocab_size, info.weight_bytes, info.kv_cache_bytes) == \
        (runner.vocab, runner.weight_bytes(), runner.kv_cache_bytes())
    assert info.target == b"cpu" and info.device == b"cpu" and info.max_total_seq_len == runner.max_len
    assert capi.prefill(model, LONG) == 0, capi.error()
    runner.new_sequence()
    np.testing.assert_allclose(capi.logits(model), runner.prefill(LONG), rtol=1e-5, atol=1e-5)
    # a prefill after decoding continues the sequence: the decoded tokens are fed first
    toks = [capi.decode(model)[1] for _ in range(3)]
    assert capi.prefill(model, PROMPT) == 0, capi.error()
    assert capi.info(model).seq_len == len(LONG) + 3 + len(PROMPT)
    runner.new_sequence()
    runner.prefill(LONG)
    for t in toks:   # the decode kernels, as edgequant run feeds generated tokens
        runner.decode(t)
    np.testing.assert_allclose(capi.logits(model), runner.prefill(PROMPT), rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(capi, model):
    greedy = capi.generate(model, PROMPT, 12)
    a = capi.generate(model, PROMPT, 12, temperature=1.0, top_p=0.9, seed=7)
    assert a == capi.generate(model, PROMPT, 12, temperature=1.0, top_p=0.9, seed=7)
    assert a != capi.generate(model, PROMPT, 12, temperature=1.0, top_p=0.9, seed=8)
    assert all(0 <= t < 320 for t in a)
    # a nucleus smaller than the top token's probability keeps only that token
    assert capi.generate(model, PROMPT, 12, temperature=0.7, top_p=1e-6, seed=3) == greedy


def test_bad_calls_return_codes_and_leave_the_model_usable(capi, model, runner):
    L = capi.lib
    s, _ = capi.decode(model)
    assert s == STATUS["STATE"] and "prefill" in capi.error()
    for bad in ([320], [5, 50_000_000], [-1]):
        assert capi.prefill(model, bad) == STATUS["ARGUMENT"] and "outside the vocabulary" in capi.error()
    assert capi.info(model).seq_len == 0   # nothing of a refused prefill was fed
    assert capi.prefill(model, PROMPT) == 0
    for t, p in ((float("nan"), 1.0), (1.0, 0.0), (1.0, 1.5)):
        assert capi.decode(model, t, p)[0] == STATUS["ARGUMENT"]
    assert L.edgequant_prefill(None, None, 0) == STATUS["ARGUMENT"]
    assert capi.generate(model, PROMPT, 5) == runner.generate(PROMPT, 5, stop_ids=()).tokens


def test_kv_cache_capacity(capi, cpu_dist):
    s, h = capi.open(cpu_dist, max_total_seq_len=8)
    assert s == 0, capi.error()
    try:
        assert capi.info(h).max_total_seq_len == 8
        assert capi.prefill(h, list(range(9))) == STATUS["CAPACITY"] and "KV cache" in capi.error()
        assert capi.prefill(h, list(range(8))) == 0
        assert capi.decode(h)[0] == 0                        # sampled from the prefill's logits, nothing fed
        assert capi.decode(h)[0] == STATUS["CAPACITY"]       # would feed token 9
    finally:
        capi.lib.edgequant_close(h)


def test_open_refuses_missing_and_foreign_folders(capi, cpu_dist, tmp_path):
    import json
    import shutil
    s, h = capi.open(tmp_path / "missing")
    assert s == STATUS["NOT_FOUND"] and h is None and "not an exported model folder" in capi.error()
    for field, value, status in (("device", {"target": "android", "device": "opencl"}, "UNSUPPORTED"),
                                 ("library", {"library": "lib.tar"}, "UNSUPPORTED")):
        d = tmp_path / field
        shutil.copytree(cpu_dist, d)
        info = json.loads((d / "edgequant-export.json").read_text())
        info.update(value)
        (d / "edgequant-export.json").write_text(json.dumps(info))
        (d / "lib.tar").write_bytes(b"")
        s, h = capi.open(d)
        assert s == STATUS[status] and h is None, capi.error()
    # a library of another CPU (a cpu-arm64 export here) is not "damaged": it names the CPU it was built for
    d = tmp_path / "other_cpu"
    shutil.copytree(cpu_dist, d)
    lib = bytearray((d / "lib.so").read_bytes())
    lib[18:20] = (243).to_bytes(2, "little")   # EM_RISCV: foreign to every machine the tests run on
    (d / "lib.so").write_bytes(bytes(lib))
    s, h = capi.open(d)
    assert s == STATUS["UNSUPPORTED"] and h is None and "built for RISC-V" in capi.error(), capi.error()


# every damaged or hostile DIST that `edgequant run` refuses (tests/reliability), the C runtime refuses too, naming
# the same file or field; the tokenizer is the caller's business here
from reliability.test_damaged_dists import CASES  # noqa: E402

C_CASES = {k: v for k, v in CASES.items() if not k.startswith("tokenizer_")}


@pytest.mark.parametrize("name", list(C_CASES))
def test_open_refuses_damaged_dist(capi, cpu_dist, tmp_path, name):
    from reliability.conftest import copy_case
    damage, words = C_CASES[name]
    d = copy_case(cpu_dist, tmp_path, name)
    damage(d)
    s, h = capi.open(d)
    msg = capi.error()
    ok = ("UNSUPPORTED",) if name in ("format_version_99", "format_version_true", "format_version_float",
                                          "tvm_version_other") else ("DAMAGED", "NOT_FOUND")
    assert s in [STATUS[k] for k in ok] and h is None, (s, msg)
    assert all(w in msg for w in words) and "\n" not in msg, msg


def test_apps_cuda_command_line_runs_on_the_shared_runtime(runtime_build, cpu_dist, runner):
    """apps/cuda's edgequant-run is built over apps/runtime; on a cpu export it prints edgequant run's tokens."""
    build = cmake_build(ROOT / "build" / "test-apps-cuda-x86_64", source=ROOT / "apps" / "cuda")
    r = subprocess.run([str(build / "edgequant-run"), str(cpu_dist), "cpu", ",".join(map(str, PROMPT)), "16"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [int(t) for t in r.stdout.splitlines()[0].split(",")] == runner.generate(PROMPT, 16, stop_ids=()).tokens


def test_c_runtime_knows_every_target():
    """The C runtime keeps its own table of targets and devices (it has no Python to ask): it must be
    export/targets.py's, or a DIST of a new target is refused as damaged on the phone."""
    import re

    from edgequant.export.targets import PRESETS
    src = (ROOT / "apps/runtime/src/runtime.cc").read_text()
    table = src[src.index("static const std::map<std::string, std::string> targets"):]
    table = table[:table.index("};")]
    assert dict(re.findall(r'\{"([^"]+)",\s*"([^"]+)"\}', table)) == {n: p.device for n, p in PRESETS.items()}


def test_quantized_table_dist_runs_in_the_c_runtime(capi, tmp_path, model_dirs):
    """A DIST with per-module widths (an 8-bit tied table on a 4-bit model): the C runtime accepts its sizes and
    zero points and computes the Python runner's logits."""
    from edgequant import api
    from edgequant.export.api import export
    from edgequant.export.runtime import Runner
    from conftest import make_tiny_model, make_tokenizer
    src = tmp_path / "tied"
    make_tiny_model("llama", tie=True).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    ck = api.quantize(str(src), tmp_path / "q", method="rtn", bits=4, group_size=32, embed_bits=8, progress=False)
    dist = export(ck, "cpu", tmp_path / "dist", progress=False)
    s, h = capi.open(dist)
    assert s == 0, capi.error()
    try:
        assert capi.prefill(h, PROMPT) == 0, capi.error()
        runner = Runner(dist, load_tokenizer=False)
        runner.new_sequence()
        np.testing.assert_allclose(capi.logits(h), runner.prefill(PROMPT), rtol=1e-5, atol=1e-5)
    finally:
        capi.lib.edgequant_close(h)


@pytest.mark.slow   # one more export (~30 s on a 2-core CI machine)
def test_longrope_switch_re_encodes_like_edgequant_run(capi, tmp_path):
    """Phi-3 longrope (original context 16): the C runtime re-encodes the sequence with the long factors when it first
    grows past 16 tokens, as the Runner does (transformers' Phi-3 `generate`), whether the switch comes in a decode
    step or inside a prefill: its greedy tokens and logits are the Runner's. Control: the Runner without the
    re-encoding (short-rotated keys kept) gives other logits there."""
    from edgequant import api
    from edgequant.export.api import export
    from edgequant.export.runtime import Runner
    from conftest import make_tiny_model, make_tokenizer
    src = tmp_path / "phi3"
    model = make_tiny_model("phi3", seed=5)
    model.config.original_max_position_embeddings = 16
    model.config.rope_parameters["original_max_position_embeddings"] = 16
    model.save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    ck = api.quantize(str(src), tmp_path / "q", method="rtn", bits=4, group_size=32, progress=False)
    dist = export(ck, "cpu", tmp_path / "dist", progress=False)
    runner = Runner(dist, load_tokenizer=False)
    assert runner.long_after == 16
    prompt = [int(x) for x in np.random.default_rng(3).integers(0, 320, 20)]
    s, h = capi.open(dist)
    assert s == 0, capi.error()
    try:
        # the switch in a decode step: 12 prompt tokens, then greedy tokens across position 16
        want = runner.generate(prompt[:12], 10, stop_ids=()).tokens
        assert capi.generate(h, prompt[:12], 10) == want
        # ... and inside a prefill: 10 tokens, then 10 more that cross 16 (the whole sequence again, long factors)
        assert capi.lib.edgequant_reset(h, 0) == 0
        assert capi.prefill(h, prompt[:10]) == 0 and capi.prefill(h, prompt[10:]) == 0, capi.error()
        runner.new_sequence()
        runner.prefill(prompt[:10])
        crossed = runner.prefill(prompt[10:])
        np.testing.assert_allclose(capi.logits(h), crossed, rtol=1e-5, atol=1e-5)
        runner.new_sequence()
        runner._switches_to_long = lambda n: False   # the control: no re-encoding
        runner.prefill(prompt[:10])
        kept = runner.prefill(prompt[10:])
        assert np.abs(kept - crossed).max() > 1e-2 * np.abs(crossed).max()
    finally:
        capi.lib.edgequant_close(h)
