"""Kernel-level CPU timings, new kernel against its predecessor in one process: the int8 prefill GEMM and the W2 / W4
decode GEMVs of tvm_schedules/cpu_int8.py against the same file at an earlier git revision (--baseline), and the KV
cache's attention kernels of tvm_schedules/cpu_attention.py against TVM 0.27's stock CPU kernels, on SmolLM2-135M's
shapes.

    python benchmarks/cpu_kernels.py [--baseline 65fbc8c] [--rows 128] [--threads 1] [--repeats 9] [--out cpu_kernels]
                                    [--parts gemm,gemv,attention]

Each kernel is compiled for this CPU, warmed up, then called --repeats times; the table gives the median process CPU
time per call (user + system of all threads: on a shared machine it moves far less with other processes' load than
wall time) and the best wall time, and the ratio old / new of CPU times. Outputs of old and new are compared (max abs
difference). --threads sets TVM's pool (1 by default: CPU time then is the kernel's own work, without spinning).
Writes benchmarks/results/<out>.md with machine, date, load and command.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from cpu_bench import cpu_model, cpu_seconds, header, int8_cpu, table, write

ROOT = Path(__file__).resolve().parent.parent
# (bits, group, N, K, layout): SmolLM2-135M's q/k/v (960 x 576), o (576 x 576), gate+up (3072 x 576), down (576 x 1536)
GEMMS = [(4, 128, 960, 576, "words"), (4, 128, 576, 576, "words"), (4, 128, 3072, 576, "words"),
         (4, 128, 576, 1536, "words"), (3, 128, 3072, 576, "planes3"), (2, 64, 3072, 576, "words")]
# the W2 g64 and W4 g128 decode GEMVs of the same shapes, and the 4-bit g32 vocabulary table as the output layer
# ('e4'; weights in cache: called on the same copy every time)
GEMVS = [(2, 64, 960, 576), (2, 64, 576, 576), (2, 64, 3072, 576), (2, 64, 576, 1536),
         (4, 128, 960, 576), (4, 128, 576, 576), (4, 128, 3072, 576), (4, 128, 576, 1536), (4, 32, 49152, 576)]
HKV, HQ, D, PAGE = 3, 9, 64, 16


def timed(fn, args, repeats):
    fn(*args)
    cpu, wall = [], []
    for _ in range(repeats):
        c, t = cpu_seconds(), time.perf_counter()
        fn(*args)
        wall.append(time.perf_counter() - t)
        cpu.append(cpu_seconds() - c)
    return float(np.median(cpu)), min(wall)


def baseline_module(rev: str):
    """tvm_schedules/cpu_int8.py as it was at git revision `rev`, imported beside the current one."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:tvm_schedules/cpu_int8.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "cpu_int8_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("edgequant.tvm_schedules.cpu_int8_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="65fbc8c", help="git revision of the GEMM to compare with")
    ap.add_argument("--rows", type=int, default=128, help="prompt rows of the GEMM and the prefill attention")
    ap.add_argument("--context", type=int, default=128, help="cached tokens of the decode attention")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default="cpu_kernels")
    ap.add_argument("--parts", default="gemm,gemv,attention", help="comma-separated subset of gemm,gemv,attention")
    a = ap.parse_args()
    host, isa, dev, n_cores, load0 = int8_cpu(a.threads)
    import tvm
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu

    from edgequant.pack import pack
    from edgequant.tvm_schedules import cpu_attention, cpu_int8, cpu_int8_rows
    from edgequant.tvm_schedules.dequant import QuantSpec, repack_planes3_np
    T = lambda x: tvm.runtime.tensor(x, dev)  # noqa: E731
    build = lambda f: tvm.compile(tvm.IRModule({"main": f}), target=host)  # noqa: E731
    old = baseline_module(a.baseline)
    rng = np.random.default_rng(0)
    rows = []

    def row(kernel, shape, old_fn, new_fn, make_args, out_index):
        res = []
        for fn in (old_fn, new_fn):
            args = make_args()
            res.append(timed(fn, args, a.repeats) + (args[out_index].numpy().astype(np.float32),))
        (c0, w0, y0), (c1, w1, y1) = res
        rows.append([kernel, shape, f"{c0 * 1e3:.3f}", f"{c1 * 1e3:.3f}", f"{w0 * 1e3:.3f}", f"{w1 * 1e3:.3f}",
                     f"{c0 / c1:.2f}x", f"{np.abs(y0 - y1).max():.1e}"])
        print(" | ".join(rows[-1]), flush=True)

    m = a.rows
    parts = set(a.parts.split(","))
    for bits, group, n, k, layout in GEMMS if "gemm" in parts else []:
        spec = QuantSpec(n, k, bits, group, False, layout)
        qw = pack(rng.integers(0, 1 << bits, (n, k)), bits)
        if layout == "planes3":
            qw = repack_planes3_np(qw, k)
        sc = (rng.random((n, spec.n_groups)) * 0.02 + 0.005).astype(np.float16)
        z = rng.integers(0, 1 << bits, (n, spec.n_groups)).astype(np.uint8)
        x = rng.standard_normal((1, m, k)).astype(np.float16)
        row(f"int8 prefill GEMM ({isa})", f"W{bits} g{group} {n}x{k}, {m} rows",
            build(old.int8_gemm_func(spec, isa)),
            build(cpu_int8.int8_gemm_func(spec, isa, lanes=cpu_int8_rows.lanes_for(host, isa))),
            lambda: [T(x), T(qw), T(sc), T(z), T(np.zeros((1, m, n), np.float32))], 4)

    for bits, group, n, k in GEMVS if "gemv" in parts else []:
        spec = QuantSpec(n, k, bits, group, False)
        qw = pack(rng.integers(0, 1 << bits, (n, k)), bits)
        sc = (rng.random((n, spec.n_groups)) * 0.02 + 0.005).astype(np.float16)
        z = rng.integers(0, 1 << bits, (n, spec.n_groups)).astype(np.uint8)
        x1 = rng.standard_normal((1, k)).astype(np.float16)
        row(f"int8 decode GEMV ({isa})", f"W{bits} g{group} {n}x{k}",
            build(old.int8_gemv_func(spec, isa)), build(cpu_int8.int8_gemv_func(spec, isa)),
            lambda: [T(x1), T(qw), T(sc), T(z), T(np.zeros((1, n), np.float32))], 4)

    if "attention" in parts:
        q = rng.standard_normal((m, HQ, D)).astype(np.float16)
        kv = rng.standard_normal((2, m, HKV, D)).astype(np.float16)
        row("ragged prefill attention (stock TVM -> cpu_attention)", f"{m} tokens causal, {HQ}/{HKV} heads x {D}",
            build(_attention_prefill_ragged_cpu(HKV, HQ, D, D, "float16", {})),
            build(cpu_attention.ragged_prefill_func(HKV, HQ, D)),
            lambda: [T(q), T(np.array([0, m], np.int32)), T(kv[0]), T(kv[1]), T(np.array([0, m], np.int32)),
                     T(np.arange(m, dtype=np.int32)), T(np.zeros(1, np.int32)), T(np.zeros((m, HQ, D), np.float16)),
                     T(np.zeros((m, HQ), np.float32)), 1, 0, 1.0, 1e4, 0.125], 7)
        n_pages = -(-a.context // PAGE)
        pages = rng.standard_normal((n_pages, 2, HKV, PAGE, D)).astype(np.float16)
        q1 = rng.standard_normal((1, HQ, D)).astype(np.float16)
        row("decode attention (stock TVM -> cpu_attention)", f"1 token after {a.context}, {HQ}/{HKV} heads x {D}",
            build(_attention_decode_cpu(HKV, HQ, D, "float16", False, {})),
            build(cpu_attention.decode_func(HKV, HQ, D)),
            lambda: [T(q1), T(pages), T(np.array([0, n_pages], np.int32)), T(np.arange(n_pages, dtype=np.int32)),
                     T(np.array([a.context - (n_pages - 1) * PAGE], np.int32)), T(np.zeros(1, np.int32)),
                     T(np.array([a.context], np.int32)), T(np.zeros((1, HQ, D), np.float16)),
                     T(np.zeros((1, HQ), np.float32)), 0, 1.0, 1e4, 0.125], 7)

    head = ["kernel", "shape", "old CPU ms", "new CPU ms", "old best wall ms", "new best wall ms",
            "old / new (CPU)", "max |old - new|"]
    lines = header("CPU kernels: new against old in one process",
                   f"{cpu_model()}, {n_cores} cores; TVM {tvm.__version__}; {a.threads} TVM thread(s); ISA {isa}",
                   load0,
                   [f"old GEMM and GEMV: tvm_schedules/cpu_int8.py at {a.baseline}; old attention: TVM's stock CPU "
                    f"kernels; median CPU time (all threads) of {a.repeats} calls after a warm-up, best wall time"])
    write(a.out, lines + [table(head, rows)])

if __name__ == "__main__":
    main()
