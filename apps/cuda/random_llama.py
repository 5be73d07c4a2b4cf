"""Speed of a LLaMA-7B-shaped (or SmolLM2-135M-shaped, `--shape smollm2-135m`) W4 g128 library on a GPU, with
random weights (the real weights are not here, or would take calls to carry).

Two steps, because the library is compiled on the build machine and the weights are made where it runs:

    python apps/cuda/random_llama.py build OUT [--arch sm_90]      # here: compile lib.so + kernels.fatbin, no weights
    python3 apps/cuda/random_llama.py weights OUT                   # on the GPU machine: random tensor cache
    python3 apps/cuda/run_dist.py OUT --ids 1,2,3 --bench 64

The library is the one `edgequant export --target cuda` builds for such a checkpoint (same model, pipeline and
kernels); only the weights are random, so the speeds are meaningful and the text is not.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LLAMA_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False}
SMOLLM2_135M = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
                "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True}
SHAPES = {"llama-7b": LLAMA_7B, "smollm2-135m": SMOLLM2_135M}


def build(out: Path, arch: str, shape: dict = LLAMA_7B):
    import tvm
    from edgequant.export import targets
    from edgequant.export.build import EXPORT_JSON, FORMAT_VERSION, _param_list, _walk, build_module, prefill_chunk
    from edgequant.export.cuda import compile_fatbin
    from edgequant.export.models.llama import ArchConfig
    from edgequant.export.params import LinearPlan, fused_linears
    from edgequant.tvm_schedules.dequant import QuantSpec

    class ShapeOnly:  # the parts of a WeightSource that compilation reads
        path = Path("random-llama-7b")
        config = shape
        quantization = "w4g128a"
        arch = ArchConfig.from_hf(shape)

        def plans(self):
            return {name: LinearPlan(name, srcs, k, sum(rows), QuantSpec(sum(rows), k, 4, 128, False), None, bias,
                                     rows) for name, srcs, rows, k, bias in fused_linears(shape)}

    out.mkdir(parents=True, exist_ok=True)
    preset = targets.get_preset("cuda")
    ex, named_params, tgt, functions = build_module(ShapeOnly(), preset, arch)
    ex.export_library(str(out / "lib.so"))
    src = next(m.inspect_source() for m in _walk(ex.mod) if m.kind == "cuda")
    cuda = compile_fatbin(src, targets.parse_archs(arch), out)
    # the fields `export/dist.py` and the runner check before they load the folder (as `edgequant export` writes
    # them: the runner compares params, context and chunk size with the library's _metadata)
    meta = {"format_version": FORMAT_VERSION, "target": "cuda", "tvm_target": str(tgt), "tvm_version": tvm.__version__,
            "device": "cuda", "library": "lib.so", "cuda": cuda, "quantization": "w4g128a",
            "model": dict(ShapeOnly.arch.__dict__),
            "functions": functions, "prefill_chunk_size": prefill_chunk(ShapeOnly.arch), "weight_bytes": 0,
            "params": _param_list(named_params, ShapeOnly().plans())}   # as the library's _metadata lists them
    (out / EXPORT_JSON).write_text(json.dumps(meta, indent=1))
    print(f"built {out}: {len(named_params)} parameters, {cuda['kernels']} kernels")


def weights(out: Path):
    import numpy as np
    from tvm.contrib import tvmjs
    info = json.loads((out / "edgequant-export.json").read_text())
    rng = np.random.default_rng(0)
    total = [0]

    def gen():
        for p in info["params"]:
            shape, dtype, name = tuple(p["shape"]), p["dtype"], p["name"]
            if dtype == "uint32":
                a = rng.integers(0, 2**32, shape, dtype=np.uint32)
            elif dtype == "uint8":
                a = np.full(shape, 8, np.uint8)
            elif name.endswith("scales"):
                a = np.full(shape, 0.002, np.float16)
            elif "norm" in name:
                a = np.ones(shape, np.float16)
            else:
                a = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
            total[0] += a.nbytes
            yield name, a

    tvmjs.dump_tensor_cache(gen(), str(out), encode_format="raw", shard_cap_mb=512, show_progress=False)
    info["weight_bytes"] = total[0]
    (out / "edgequant-export.json").write_text(json.dumps(info, indent=1))
    print(f"wrote {total[0] / 2**30:.2f} GiB of random weights")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["build", "weights"])
    ap.add_argument("out")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-7b", help="build: the model's shapes")
    a = ap.parse_args()
    if a.step == "build":
        build(Path(a.out), a.arch, SHAPES[a.shape])
    else:
        weights(Path(a.out))


if __name__ == "__main__":
    sys.exit(main())
