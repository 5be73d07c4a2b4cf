"""Decode GEMV time by bit width on this CPU, in one process: the int8 GEMV of tvm_schedules/cpu_int8.py on
SmolLM2-135M's linear shapes for W4 g128, W3 g128 (bytes3, the CPU export's layout, and planes3, its predecessor)
and W2 g64, rounds interleaved so that every config sees the same load.

    python benchmarks/cpu_gemv_bits.py [--rounds 7] [--calls 4] [--copies 30] [--threads 1] [--out cpu_gemv_bits]

Every (shape, config) gets --copies different random weights (30: one per SmolLM2 layer, so that, as in a decoded
token, they stream from memory instead of staying in the caches; --copies 1 measures the kernels in cache). Each
round times --calls passes over the copies of every (shape, config) in turn and keeps the process CPU time per call
(user + system of all threads: on a shared machine it moves far less with other processes' load than wall time). The
table gives the median over rounds, the ratio to W4 per round (median and range), and a "layer" row: the four shapes once each, the
GEMVs of one decoder layer. Writes benchmarks/results/<out>.md with machine, date, load and command.
"""
from __future__ import annotations

import argparse

import numpy as np

from cpu_bench import cpu_model, cpu_seconds, header, int8_cpu, table, write

# SmolLM2-135M's fused q/k/v (960 x 576), o (576 x 576), gate+up (3072 x 576), down (576 x 1536)
SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate+up", 3072, 576), ("down", 576, 1536)]
CONFIGS = [("W4 g128", 4, 128, "words"), ("W3 g128 bytes3", 3, 128, "bytes3"), ("W3 g128 planes3", 3, 128, "planes3"),
           ("W2 g64", 2, 64, "words")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=4, help="passes over the copies per (shape, config) and round")
    ap.add_argument("--copies", type=int, default=30, help="weights per (shape, config), called in turn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="cpu_gemv_bits")
    a = ap.parse_args()
    host, isa, dev, n_cores, load0 = int8_cpu(a.threads)
    import tvm

    from edgequant.pack import pack
    from edgequant.tvm_schedules import cpu_int8
    from edgequant.tvm_schedules.dequant import QuantSpec, repack_3bit_np
    rng = np.random.default_rng(0)
    calls = {}   # (shape, config) -> (function, args)
    for sname, n, k in SHAPES:
        x = rng.standard_normal((1, k)).astype(np.float16)
        for cname, bits, group, layout in CONFIGS:
            spec = QuantSpec(n, k, bits, group, False, layout)
            fn = tvm.compile(tvm.IRModule({"main": cpu_int8.int8_gemv_func(spec, isa)}), target=host)["main"]
            copies = []
            for c in range(a.copies):
                qw = pack(rng.integers(0, 1 << bits, (n, k)), bits)
                qw = qw if layout == "words" else repack_3bit_np(qw, k, layout)
                sc = (rng.random((n, spec.n_groups)) * 0.02 + 0.005).astype(np.float16)
                z = rng.integers(0, 1 << bits, (n, spec.n_groups)).astype(np.uint8)
                copies.append([tvm.runtime.tensor(v, dev) for v in (x, qw, sc, z, np.zeros((1, n), np.float32))])
                if c == 0:
                    y = cpu_int8.int8_gemv_np(spec, x[0], qw, sc, z)
                    fn(*copies[0])
                    assert np.allclose(copies[0][-1].numpy()[0], y, rtol=1e-4, atol=1e-4 * np.abs(y).max()), \
                        (sname, cname)
            calls[sname, cname] = (fn, copies)
    per = {key: [] for key in calls}   # CPU seconds per call, one entry per round
    for _ in range(a.rounds):
        for key, (fn, copies) in calls.items():
            c = cpu_seconds()
            for _ in range(a.calls):
                for args in copies:
                    fn(*args)
            per[key].append((cpu_seconds() - c) / (a.calls * len(copies)))
    for cname, *_ in CONFIGS:
        per["layer", cname] = [sum(per[s, cname][r] for s, _, _ in SHAPES) for r in range(a.rounds)]

    head = ["shape (N x K)"] + [f"{c} us" for c, *_ in CONFIGS] + [f"{c} / W4" for c, *_ in CONFIGS[1:]]
    rows = []
    for sname, n, k in SHAPES + [("layer", 0, 0)]:
        r = [sname + (f" {n}x{k}" if n else " (the four once)")]
        r += [f"{np.median(per[sname, c]) * 1e6:.1f}" for c, *_ in CONFIGS]
        for c, *_ in CONFIGS[1:]:
            ratio = np.array(per[sname, c]) / np.array(per[sname, CONFIGS[0][0]])
            r.append(f"{np.median(ratio):.3f} ({ratio.min():.3f}-{ratio.max():.3f})")
        rows.append(r)
    lines = header("Decode GEMV by bit width, one process, interleaved rounds",
                   f"{cpu_model()}, {n_cores} cores; TVM {tvm.__version__}; {a.threads} TVM thread(s); ISA {isa}",
                   load0,
                   [f"{a.rounds} rounds of {a.calls} passes over {a.copies} weight copies per (shape, config); median "
                    "CPU time per call over rounds (all threads); ratios: per round against W4 of the same round, "
                    "median (min-max)"])
    write(a.out, lines + [table(head, rows)])

if __name__ == "__main__":
    main()
