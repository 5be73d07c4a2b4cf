"""CUDA exports route decode (one row) through the hand-scheduled GEMV and keep dlight's fused kernels for prefill;
3-bit weights travel in the words3x32 layout. Compiles for cuda without a GPU (the kernels run in
benchmarks/gpu_decode.py and apps/cuda on a GPU machine)."""
from __future__ import annotations

import re

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
    ex, _, _, _ = build_module(open_source(checkpoint, preset.packing3), preset, "sm_90")
    src = next(m.inspect_source() for m in _walk(ex.mod) if m.kind == "cuda")
    kernels = set(re.findall(r"void __launch_bounds__\(\d+\) (\w+)\(", src))
    # qkv, o, gate_up, down: one GEMV each (shared by the layers) for decode, fused dequantize kernels for prefill
    assert len([k for k in kernels if k.startswith("decode_gemv")]) == 4
    assert any(k.startswith("fused_dequantize") for k in kernels)


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
    assert plan.spec.layout == "words3x32"
    got = dict(cuda.arrays([name]))[name]
    want = dict(stored.arrays([name]))[name]
    assert got.shape == (plan.n, plan.spec.words)
    np.testing.assert_array_equal(unpack_np(got, 3, plan.k, "words3x32"), unpack_np(want, 3, plan.k))
