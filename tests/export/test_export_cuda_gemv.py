"""CUDA exports route decode (one row) through the hand-scheduled GEMV and prefill through the tensor-core GEMM;
3-bit weights travel in the dp4a3r4 layout (the int8-activation GEMV's; dp4a3 where N % 4; words3x32 for the fp16
one). Compiles for cuda without a GPU (the kernels run in benchmarks/gpu_decode.py and apps/cuda on a GPU
machine)."""
from __future__ import annotations

import re

import json

import numpy as np
import pytest

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def checkpoint(model_dirs, tmp_path_factory):
    from edgequant import api
    out = tmp_path_factory.mktemp("q") / "q"
    return api.quantize(str(model_dirs["llama"]), str(out), method="rtn", bits=4, group_size=32, progress=False)


def test_cuda_decode_uses_the_gemv_kernels(checkpoint):
    from edgequant.export import targets
    from edgequant.export.build import _walk, build_module
    from edgequant.export.params import open_source
    preset = targets.get_preset("cuda")
    ex, _, _, functions = build_module(open_source(checkpoint, preset.packing3), preset, "sm_90")
    src = next(m.inspect_source() for m in _walk(ex.mod) if m.kind == "cuda")
    kernels = set(re.findall(r"void __launch_bounds__\([\d, ]+\) (\w+)\(", src))
    # qkv, o, gate_up, down: one GEMV each (shared by the layers) for decode and, for prefill, one tensor-core GEMM
    # each with its two or three tile kernels (picked by prompt length at launch); no dequantize kernel left
    assert len([k for k in kernels if k.startswith("decode_gemv") and "dense" not in k]) == 4
    # the fp16 output layer: the dense GEMV (tvm_schedules/dense_gemv.py), not dlight's
    assert "decode_gemv_dense_kernel" in kernels
    # decode fusions: qkv and gate_up take the RMSNorm weight (norm on load), o and down add the residual, down takes
    # [gate | up] (no separate norm, add or silu kernels between the GEMVs)
    args = {k: a for k, a in re.findall(r"void __launch_bounds__\([\d, ]+\) (decode_gemv\w*)\(([^)]*)\)", src)
            if "dense" not in k}
    assert sorted(a.count("nw_ptr") for a in args.values()) == [0, 0, 1, 1]
    assert sorted(a.count("res_ptr") for a in args.values()) == [0, 0, 1, 1]
    # sm_90 only: the GEMVs are built for programmatic dependent launch (export/pdl.py), and only they
    head = r'extern "C" __global__ void __launch_bounds__\([\d, ]+\) (\w+)\([^)]*\) \{'
    defs = {m.group(1): m.group(2) for m in re.finditer(head + r'(.*?)(?=\nextern "C"|\Z)', src, re.S)}
    # (and the one-graph step's attention kernels, which let o_proj's GEMV launch early)
    assert {k for k, b in defs.items() if "cudaGridDependencySynchronize" in b} == {
        k for k in defs if k.startswith(("decode_gemv", "decode_attention", "decode_combine"))} \
        and len(defs) == len(kernels)
    # greedy sampling on the device
    assert "argmax" in functions and any(k.startswith("argmax") for k in kernels)
    prefill = [k for k in kernels if k.startswith("prefill_gemm")]
    assert len({k.removesuffix("_1").removesuffix("_2") for k in prefill}) == 4 and 8 <= len(prefill) <= 12
    assert "mma.sync.aligned.m16n8k16" in src
    assert not any("dequantize" in k for k in kernels)
    # decode and prefill replay their static kernel sequences as CUDA graphs (launch overhead); decode_graph is one
    # graph from the embedding to the argmax (export/graph_decode.py): one capture, no KV-cache builtin
    assert "cuda_graph.run_or_capture" in ex.as_text()
    assert {"decode_graph", "graph_cache_fill"} <= set(functions) and "decode_attention" in " ".join(kernels)
    text = ex.as_text()
    body = text[text.index("@decode_graph:"):]
    body = body[:body.index("\n@", 1)] if "\n@" in body[1:] else body
    assert body.count("run_or_capture") == 1 and "kv_state" not in body and "attention" not in body


def test_cuda_preset_repacks_3_bit_weights(model_dirs, tmp_path):
    from edgequant import api
    from edgequant.export import targets
    from edgequant.export.params import open_source
    from edgequant.tvm_schedules.dequant import unpack_np
    q = api.quantize(str(model_dirs["llama"]), str(tmp_path / "q3"), method="rtn", bits=3, group_size=32,
                     progress=False)
    cuda, stored = open_source(q, targets.get_preset("cuda").packing3), open_source(q)
    name = "model.layers.0.mlp.down_proj.qweight"
    plan = cuda.plans()["model.layers.0.mlp.down_proj"]
    assert plan.n % 4 == 0 and plan.spec.layout == "dp4a3r4"   # 4 rows interleaved (dp4a3 where N % 4)
    got = dict(cuda.arrays([name]))[name]
    want = dict(stored.arrays([name]))[name]
    assert got.shape == (plan.n, plan.spec.words)
    np.testing.assert_array_equal(unpack_np(got, 3, plan.k, "dp4a3r4"), unpack_np(want, 3, plan.k))


@pytest.mark.parametrize("arch,bits,group,sym,n_out,act,pairs", [
    pytest.param("llama", 4, 32, False, 0, "fp16", False, marks=pytest.mark.slow),   # CI time: fp16 is not the default
    ("qwen2", 3, -1, False, 2, "fp16", False),
    pytest.param("qwen2", 2, 64, True, 3, "fp16", False, marks=pytest.mark.slow),
    ("llama", 4, 32, False, 0, "int8", False), ("qwen2", 3, -1, False, 2, "int8", False),
    ("qwen2", 2, 64, True, 3, "int8", False), ("llama", 4, 32, False, 0, "int8", True)])
def test_decode_through_the_gemv_wiring_matches_pytorch(model_dirs, tmp_path, monkeypatch, tokenizer, arch, bits,
                                                         group, sym, n_out, act, pairs):
    """The CUDA decode path as exported (arguments, words3x32 / dp4a3r4 repacking, folded zero points, outlier columns
    in fp32, bias) through the GEMV's serial CPU twin on the cpu target: decode logits equal PyTorch's (fp16
    activations), or move by the int8 rounding of the activations only (int8, the CUDA default). Both decode paths
    of a CUDA library: the one-graph step on its own cache (export/graph_decode.py, its kernels' twins) and the paged
    cache's (EDGEQUANT_DECODE_GRAPH=0 at run time). `pairs`: every GEMV in steps of 2 rows x 2, as LLaMA-7B's
    gate_up is at 4 bits, so that gate_up's GEMV computes silu(gate) * up in its epilogue and down reads it plain."""
    import dataclasses

    import torch
    from edgequant import api
    from edgequant.artifact import load_quantized_model
    from edgequant.export import targets
    from edgequant.errors import EdgequantError
    from edgequant.export import graph_decode
    from edgequant.export.api import export
    from edgequant.export.models import llama as export_llama
    from edgequant.export.runtime import Runner
    from test_export_parity import add_outlier_columns
    monkeypatch.setattr(export_llama, "DECODE_GEMV_TWIN_ON_CPU", True)
    epilogues = []
    if pairs:
        from edgequant.export.quant_linear import QuantLinear
        from edgequant.tvm_schedules import gemv
        real_config, real_fused = gemv.default_config, QuantLinear.decode_fused

        def paired(spec, sms=132, act="fp16", n_outliers=0):
            c = real_config(spec, sms, act, n_outliers)
            return dataclasses.replace(c, rows=2, steps=2) if spec.n % 4 == 0 and spec.layout != "dp4a3r4" else c

        def spy(self, x, norm=None, glu=False, residual=None, silu_out=False):
            y = real_fused(self, x, norm, glu, residual, silu_out)
            epilogues.append(silu_out and y is not None)
            return y
        monkeypatch.setattr(gemv, "default_config", paired)
        monkeypatch.setattr(QuantLinear, "decode_fused", spy)
    monkeypatch.setattr(graph_decode, "ON_CPU", True)
    monkeypatch.setenv("EDGEQUANT_ACT_DTYPE", act)   # fp16: prefill exact too (the cpu default quantizes activations)
    packing3 = "words3x32" if act == "fp16" else targets.PRESETS["cuda"].packing3
    monkeypatch.setitem(targets.PRESETS, "cpu", dataclasses.replace(targets.PRESETS["cpu"], packing3=packing3))
    hf = tmp_path / "hf"
    from transformers import AutoModelForCausalLM
    from conftest import tiny_config
    cfg = tiny_config(arch)
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 128, 256, 32   # whole GEMV chunks at 2, 3 and 4 bits
    torch.manual_seed(bits)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("proj.weight", "proj.bias")):
                p.normal_(0, 0.08)
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    ck = api.quantize(str(hf), str(tmp_path / "q"), method="rtn", bits=bits, group_size=group, sym=sym,
                      progress=False)
    if n_out:
        ck = add_outlier_columns(ck, tmp_path / "q-owq", hf, n_out)
    dist = export(ck, "cpu", tmp_path / "dist", progress=False)
    assert (dist / "lib.so").read_bytes().count(b"decode_gemv") >= 4   # all four linears took the GEMV
    assert any(epilogues) == pairs
    ref, _ = load_quantized_model(ck)
    ids = np.random.default_rng(1).integers(0, ref.config.vocab_size, 24).tolist()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    assert graph_decode.FUNC in json.loads((dist / "edgequant-export.json").read_text())["functions"]
    greedy = {}
    for path in ("graph", "paged"):
        monkeypatch.setenv("EDGEQUANT_DECODE_GRAPH", "1" if path == "graph" else "0")
        runner = Runner(dist)
        assert (runner._graph is not None) == (path == "graph")
        runner.new_sequence()
        runner.prefill(ids[:12])
        got = [runner.decode(ids[j]) for j in range(12, 20)]
        got.append(runner.prefill(ids[20:22]))   # a prefill after graph steps: the paged cache catches up first
        got += [runner.decode(ids[j]) for j in range(22, 24)]
        err = max(float(np.abs(g - want[j]).max() / np.abs(want[j]).max())
                  for g, j in zip(got, [*range(12, 20), 21, 22, 23]))
        print(f"\n{arch} W{bits} {act} decode ({path}): max |tvm - torch| / max |torch| {err:.1e}")
        # int8: the bound of test_export_parity's int8 test; the cpu int8 export of the llama W4 model gives the
        # same per-step errors (up to 3.6e-2) as this twin
        assert err < (1e-2 if act == "fp16" else 4e-2)
        # the CUDA greedy loop (the library's argmax; on the graph path the step's last kernel writes the token and
        # the position in place, so the host only reads), and the host's np.argmax on the same decode
        runner._argmax = runner.vm["argmax"]
        greedy[path] = runner.generate(ids[:10], 8).tokens
        runner._argmax = None
        assert runner.generate(ids[:10], 8).tokens == greedy[path]
        with pytest.raises(EdgequantError, match="outside the vocabulary"):   # before any kernel reads it
            runner.decode(runner.vocab)
    assert greedy["graph"] == greedy["paged"]


@pytest.mark.slow
def test_cuda_export_of_3_bit_weights_compiles(model_dirs, tmp_path):
    """A 3-bit CUDA export (dp4a3r4: the decode GEMV, and the prefill's dlight dequantize kernel through weight_te)
    builds, and its CUDA C compiles with nvcc where nvcc is on PATH. Both failed once for dp4a3: a uint cast of a
    possibly negative shift stopped TVM's device passes, a vectorised index Select became code nvcc rejects."""
    import shutil
    import subprocess

    from edgequant import api
    from edgequant.export import targets
    from edgequant.export.build import _walk, build_module
    from edgequant.export.params import open_source
    q = api.quantize(str(model_dirs["llama"]), str(tmp_path / "q3"), method="rtn", bits=3, group_size=32,
                     progress=False)
    preset = targets.get_preset("cuda")
    ex, _, _, _ = build_module(open_source(q, preset.packing3), preset, "sm_90")
    src = next(m.inspect_source() for m in _walk(ex.mod) if m.kind == "cuda")
    assert "decode_gemv" in src
    if shutil.which("nvcc"):
        (tmp_path / "k.cu").write_text(src)
        r = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-o", str(tmp_path / "k.cubin"), str(tmp_path / "k.cu")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
