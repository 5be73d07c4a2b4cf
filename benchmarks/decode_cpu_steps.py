"""Decode speed of several CPU exports in one process, interleaved token by token: on a machine shared with other
work, whole-run rounds (benchmarks/decode_cpu.py) see different load from one row to the next; here every row decodes
one token in turn, so neighbouring steps of all rows see the same load, and the ratios are taken step by step.

    python benchmarks/decode_cpu_steps.py DIST [DIST ...] [--names W4,W3] [--prompt 128] [--tokens 64] [--rounds 5]
                                          [--threads 1] [--out decode_cpu_steps]

DIST folders come from `edgequant export --target cpu` (benchmarks/decode_cpu.py --work leaves them as
WORK/dist-<config>-cpu). Each round starts a new sequence in every DIST with the same random prompt, then decodes
--tokens greedy tokens, one step per DIST in turn (the order rotating from step to step); every step is timed in wall
time and in process CPU time (user + system of all threads; with --threads 1, the default, that is the step's own
work, whatever else runs). The table
gives median ms per token and the tok/s they mean, and each row's ratio to the first row's time: the median over all
steps of the step's ratio to the first row's step next to it, with the 10th-90th percentiles. Writes
benchmarks/results/<out>.md with machine, date, load and command.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from cpu_bench import cores, cpu_model, cpu_seconds, header, table, write


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dists", nargs="+")
    ap.add_argument("--names", default=None, help="comma-separated row names (default: the DIST folder names)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="decode_cpu_steps")
    a = ap.parse_args()
    names = a.names.split(",") if a.names else [Path(d).name for d in a.dists]
    if len(names) != len(a.dists):
        sys.exit(f"error: {len(names)} names for {len(a.dists)} DIST folders; pass one name per folder")
    os.environ["EDGEQUANT_THREADS"] = str(a.threads)
    n_cores = cores()   # before TVM's pool pins this thread
    from edgequant.export.runtime import Runner
    from edgequant.export.threads import configure
    tvm_threads = configure(a.threads)
    import tvm

    runners = [Runner(d, load_tokenizer=False) for d in a.dists]
    load0 = os.getloadavg()
    rng = np.random.default_rng(0)
    wall = [[] for _ in runners]
    cpu = [[] for _ in runners]
    for rnd in range(-1, a.rounds):          # round -1: warm-up, not kept
        prompt = rng.integers(0, runners[0].vocab, a.prompt).tolist()
        tokens = []
        for r in runners:
            r.new_sequence()
            tokens.append(int(np.argmax(r.prefill(prompt))))
        for step in range(a.tokens):
            # the order rotates every step: no row always runs right after the same other row
            for i in np.roll(np.arange(len(runners)), -step):
                r = runners[i]
                c, t = cpu_seconds(), time.perf_counter()
                logits = r.decode(tokens[i])
                w = time.perf_counter() - t
                if rnd >= 0:
                    wall[i].append(w)
                    cpu[i].append(cpu_seconds() - c)
                tokens[i] = int(np.argmax(logits))
    wall, cpu = np.array(wall), np.array(cpu)

    head = ["DIST", "wall ms / token", "tok/s (wall)", "CPU ms / token", "tok/s (CPU)", "wall / first row's",
            "CPU / first row's"]
    rows = []
    for i, name in enumerate(names):
        rw, rc = wall[i] / wall[0], cpu[i] / np.maximum(cpu[0], 1e-9)
        pct = lambda v: f"{np.median(v):.3f} ({np.percentile(v, 10):.3f}-{np.percentile(v, 90):.3f})"  # noqa: E731
        rows.append([name, f"{np.median(wall[i]) * 1e3:.2f}", f"{1 / np.median(wall[i]):.1f}",
                     f"{np.median(cpu[i]) * 1e3:.2f}", f"{1 / np.median(cpu[i]):.1f}", pct(rw), pct(rc)])
    lines = header("CPU decode, DISTs interleaved token by token",
                   f"{cpu_model()}, {n_cores} cores; TVM {tvm.__version__}; {tvm_threads} TVM thread(s)", load0,
                   [f"{a.rounds} rounds (after a warm-up round) of {a.tokens} greedy decode steps per DIST after a "
                    f"{a.prompt}-token random prompt, the DISTs taking turns step by step; medians over the "
                    f"{a.rounds * a.tokens} steps; ratios: per step against the first row's step of the same turn, "
                    "median (10th-90th percentile)"])
    write(a.out, lines + [table(head, rows)])

if __name__ == "__main__":
    main()
