"""The OpenCL C of the `android` target and the WGSL of the `webgpu` target, executed: PoCL (pyopencl) and Mesa's
lavapipe (wgpu) run the kernels of a quantized linear layer as the export schedules them, with the launch extents
TVM's host code records, and the result is compared with the NumPy reference for 2/3/4 bits, groups (ragged last
group, per channel), symmetric and asymmetric zero points, outlier columns and bias, at prefill (symbolic rows) and
decode (one row). `.ci/install-gpu-sw.sh` installs the drivers and Python bindings; a test skips, with the reason,
only where one of them is missing. Metal cannot run here: the `iphone`/`metal` exports keep the object checks of
test_export_targets.py.
"""
import numpy as np
import pytest

from edgequant.pack import pack

pytestmark = pytest.mark.tvm

CASES = [  # bits, group, sym, K, outliers, bias, N
    (4, 32, False, 96, 0, False, 80),
    (3, 32, False, 100, 2, False, 80),     # ragged last group (100 = 3 * 32 + 4), 10 values per word
    (2, 48, True, 72, 0, True, 80),        # ragged last group (72 = 48 + 24), symmetric
    (4, -1, True, 70, 3, True, 80),        # per channel, symmetric, K not a multiple of the 8 values per word
    (3, -1, False, 64, 1, False, 80),
    (4, 128, False, 576, 2, False, 1536),  # SmolLM2-135M's up projection at W4 g128 (several column blocks)
]


def _runner(kind):
    from tests.export import mobile_gpu
    try:
        return mobile_gpu.OpenCLRunner() if kind == "opencl" else mobile_gpu.WebGPURunner()
    except ImportError as e:
        pytest.skip(f"{e.name} is not installed: run .ci/install-gpu-sw.sh")
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module", params=["opencl", "webgpu"])
def backend(request):
    import os
    target_name = {"opencl": "android", "webgpu": "webgpu"}[request.param]
    runner = _runner(request.param)
    if os.environ.get("EDGEQUANT_RECORD_KERNELS"):   # to replay the launches on other drivers (mobile_gpu.py)
        from tests.export.mobile_gpu import Recorder
        runner = Recorder(runner, request.param, os.environ["EDGEQUANT_RECORD_KERNELS"])
    return target_name, runner


def _layer(rng, bits, group, sym, k, n_out, bias, n, zeros_packed):
    from edgequant.tvm_schedules.dequant import QuantSpec, pack_zeros_np
    spec = QuantSpec(n, k, bits, group, sym, zeros_packed=zeros_packed)
    w = {"qweight": pack(rng.integers(0, 1 << bits, (n, k)), bits),
         "scales": (rng.random((n, spec.n_groups)) * 0.02 + 0.005).astype(np.float16)}
    if not sym:
        w["zeros"] = rng.integers(0, 1 << bits, (n, spec.n_groups)).astype(np.uint8)
        if zeros_packed:
            w["zeros"] = pack_zeros_np(w["zeros"])
    if n_out:
        w["outlier_idx"] = np.sort(rng.choice(k, n_out, replace=False)).astype(np.int32)
        w["outlier_weight"] = rng.standard_normal((n, n_out)).astype(np.float16)
    if bias:
        w["bias"] = rng.standard_normal(n).astype(np.float16)
    return spec, w


@pytest.mark.parametrize("bits,group,sym,k,n_out,bias,n", CASES)
@pytest.mark.parametrize("rows", ["prefill", "decode"])
def test_quant_linear_kernels_match_numpy(backend, bits, group, sym, k, n_out, bias, n, rows):
    from tvm.relax.frontend import nn

    from edgequant.export import targets
    from edgequant.export.quant_linear import QuantLinear
    from edgequant.tvm_schedules.dequant import quant_matmul_np
    from tests.export.mobile_gpu import run_graph, scheduled_module

    target_name, runner = backend
    preset = targets.get_preset(target_name)
    rng = np.random.default_rng(bits * 1000 + k + n_out)
    spec, w = _layer(rng, bits, group, sym, k, n_out, bias, n, preset.zeros_packed)

    class Layer(nn.Module):
        def __init__(self):
            self.lin = QuantLinear(spec, n_out, bias)

        def forward(self, x):
            return self.lin(x)

    m = 19 if rows == "prefill" else 1    # several blocks of rows
    shape = ("m", k) if rows == "prefill" else (1, 1, k)
    tgt = targets.tvm_target(preset)
    mod = scheduled_module(Layer(), {"forward": {"x": nn.spec.Tensor(shape, "float16")}}, tgt)
    x = rng.standard_normal((m, k)).astype(np.float16)
    inputs = {"x": x.reshape((m, k) if rows == "prefill" else (1, 1, k))}
    inputs.update({f"lin_{name}": a for name, a in w.items()})
    y = run_graph(mod, "forward", inputs, runner, tgt).reshape(m, n)
    ref = quant_matmul_np(spec, x, w["qweight"], w["scales"], w.get("zeros"), w.get("outlier_idx"),
                          w.get("outlier_weight"), w.get("bias"))
    np.testing.assert_allclose(y.astype(np.float32), ref, rtol=2e-3, atol=3e-3 * np.abs(ref).max())
