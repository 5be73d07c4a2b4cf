"""Paged-attention kernel speed on a CUDA GPU: edgequant's GPU kernels (`tvm_schedules/paged_attention_gpu.py`, used
where a model has a sliding window or Gemma 2's soft-cap) against TVM 0.27's stock kernels (used everywhere else), on
the same inputs in the same run, without window or cap so both compute the same thing (their outputs are compared
too). Shapes: Gemma-2-2B (8 query heads, 4 KV heads, head_dim 256) and a Mistral-7B-like GQA layer (32, 8, 128).
Cases: decode (one query against L cached keys), paged prefill (a chunk of queries against the cache) and ragged
prefill (a chunk against itself, causal).

    python benchmarks/gpu_attention.py build STAGE        # here: TIR -> CUDA C -> sm_90 fatbin (nvcc)
    python3 benchmarks/gpu_attention.py run STAGE         # on the GPU machine (TVM runtime bundle only)

`run` prints a markdown table (machine, date; microseconds per call, the median of 5 rounds of 50 calls after a
warm-up) and the largest output difference between the two kernels of each row.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"gemma2-2b": (8, 4, 256), "mistral-7b": (32, 8, 128)}   # query heads, KV heads, head_dim
CASES = [("decode", 1, 512), ("decode", 1, 4096), ("prefill", 128, 1024), ("prefill", 512, 4096),
         ("ragged", 128, 128), ("ragged", 512, 512)]   # kind, queries, keys
PAGE = 16


def build(stage: Path):
    import tvm
    from tvm.relax.frontend.nn.llm import _decode_kernels as dk
    from tvm.relax.frontend.nn.llm import _prefill_kernels as pk

    from edgequant.export.cuda import compile_fatbin
    from edgequant.tvm_schedules import paged_attention_gpu as own
    from edgequant.tvm_schedules import workarounds
    workarounds.apply()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm")
    funcs = {}
    for tag, (hq, hkv, d) in SHAPES.items():
        tag = tag.replace("-", "_")
        funcs[f"stock_decode_{tag}"] = dk._attention_decode(hkv, hq, d, "float16", False, {}, target)
        funcs[f"own_decode_{tag}"] = own.paged_decode(hkv, hq, d, "float16", False)
        funcs[f"stock_prefill_{tag}"] = pk._attention_prefill(hkv, hq, d, "float16", False, {}, target)
        funcs[f"own_prefill_{tag}"] = own.paged_prefill(hkv, hq, d, "float16", False)
        funcs[f"stock_ragged_{tag}"] = pk._attention_prefill_ragged(hkv, hq, d, d, "float16", {}, target)
        funcs[f"own_ragged_{tag}"] = own.ragged_prefill(hkv, hq, d, d, "float16")
    mod = tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()})
    ex = tvm.compile(mod, target=target)
    stage.mkdir(parents=True, exist_ok=True)
    ex.export_library(str(stage / "attn.so"))

    def walk(m):
        for i in m.imports:
            yield i
            yield from walk(i)
    src = next(m.inspect_source() for m in walk(ex.mod if hasattr(ex, "mod") else ex) if m.kind == "cuda")
    (stage / "attn.json").write_text(json.dumps(compile_fatbin(src, ["sm_90"], stage)))
    print(f"built {len(funcs)} kernels into {stage}")


def _inputs(kind: str, n_q: int, n_k: int, hq: int, hkv: int, d: int, rng):
    """numpy arguments of one call (the ABI of the stock kernels) and the indices of its outputs."""
    import numpy as np
    f16 = "float16"
    sm = 1.0 / d ** 0.5
    if kind == "ragged":
        q, k, v = (rng.normal(0, 1, (n_q, h, d)).astype(f16) for h in (hq, hkv, hkv))
        ind = np.array([0, n_q], "int32")
        return [q, ind, k, v, ind, np.arange(n_q, dtype="int32"), np.zeros(1, "int32"),
                np.zeros((n_q, hq, d), f16), np.zeros((n_q, hq), "float32"), 1, 0, 1.0, 1e4, sm], (7, 8)
    n_pages = -(-n_k // PAGE)
    pages = rng.normal(0, 1, (n_pages, 2, hkv, PAGE, d)).astype(f16)
    common = [pages, np.array([0, n_pages], "int32"), np.arange(n_pages, dtype="int32"),
              np.array([(n_k - 1) % PAGE + 1], "int32"), np.zeros(1, "int32")]
    q = rng.normal(0, 1, (n_q, hq, d)).astype(f16)
    out, lse = np.zeros((n_q, hq, d), f16), np.zeros((n_q, hq), "float32")
    if kind == "decode":
        return [q, *common, np.array([n_k - 1], "int32"), out, lse, 0, 1.0, 1e4, sm], (7, 8)
    return [q, np.array([0, n_q], "int32"), *common, np.arange(n_q, dtype="int32") + n_k, out, lse,
            0, 0, 1.0, 1e4, sm], (8, 9)


def run(stage: Path):
    import datetime
    import subprocess

    import numpy as np
    sys.path.insert(0, str(ROOT))
    import edgequant   # not installed on the GPU machine: map edgequant.export onto export/
    edgequant.__path__.append(str(ROOT))
    import tvm
    from edgequant.export.cuda import install_loader
    from edgequant.export.runtime import _device
    dev = _device("cuda")
    install_loader(stage, json.loads((stage / "attn.json").read_text()))
    lib = tvm.runtime.load_module(str(stage / "attn.so"))
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip()
    print(f"# Paged attention kernels, {gpu}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print("| shape | case | queries | keys | stock (us) | edgequant (us) | edgequant / stock | max |diff| out | "
          "max |diff| lse |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for tag, (hq, hkv, d) in SHAPES.items():
        for kind, n_q, n_k in CASES:
            args, outs = _inputs(kind, n_q, n_k, hq, hkv, d, rng)
            res, times = {}, {}
            for who in ("stock", "own"):
                f = lib[f"{who}_{kind}_{tag.replace('-', '_')}"]
                dargs = [tvm.runtime.tensor(a, dev) if isinstance(a, np.ndarray) else a for a in args]
                f(*dargs)
                dev.sync()
                res[who] = [dargs[i].numpy().astype(np.float64) for i in outs]
                rounds = []
                for _ in range(5):
                    t = time.perf_counter()
                    for _ in range(50):
                        f(*dargs)
                    dev.sync()
                    rounds.append((time.perf_counter() - t) / 50 * 1e6)
                times[who] = float(np.median(rounds))
            d_out = float(np.abs(res["own"][0] - res["stock"][0]).max())
            d_lse = float(np.abs(res["own"][1] - res["stock"][1]).max())
            print(f"| {tag} | {kind} | {n_q} | {n_k} | {times['stock']:.1f} | {times['own']:.1f} | "
                  f"{times['own'] / times['stock']:.2f} | {d_out:.1e} | {d_lse:.1e} |")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("build", "run"):
        sys.exit("usage: python benchmarks/gpu_attention.py build|run STAGE")
    {"build": build, "run": run}[sys.argv[1]](Path(sys.argv[2]))
