"""Prefill and decode of CPU exports and llama.cpp GGUFs in one process, interleaved call by call, timed in process CPU
time and wall time: the comparison that still means something on a shared machine.

    python benchmarks/cpu_interleaved.py NAME=DIST_OR_GGUF [NAME=... ...] [--threads 1] [--rounds 8] [--prompt 128]
                                         [--decode 16] [--out NAME]

Every round gives each entry the same random prompt (the order rotating from round to round): one prefill of
--prompt tokens, then --decode decode steps. CPU time (user + system of the whole process, all threads) with
--threads 1 is each runtime's own work and moves little with other processes' load; with more threads it also
counts spinning (llama.cpp's and TVM's pools spin while they wait). The ratio columns are the median over rounds of
each round's ratio to the last entry. A `.gguf` path is run by llama-cpp-python (benchmarks/llamacpp_peer.py), any
other path as a DIST by edgequant's Runner. Writes benchmarks/results/<out>.md with the machine, date, load and
command.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from cpu_bench import cores, cpu_model, header, table, write


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("entries", nargs="+", help="NAME=PATH: a DIST folder or a .gguf file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    entries = []
    for e in a.entries:
        name, sep, path = e.partition("=")
        if not sep or not Path(path).exists():
            sys.exit(f"error: {e!r} is not NAME=PATH of an existing DIST folder or .gguf file")
        entries.append((name, Path(path)))
    os.environ["EDGEQUANT_THREADS"] = str(a.threads)   # before TVM's pool starts (Runner reads it too)
    n_cores = cores()   # before the pool pins this thread
    import numpy as np

    import llamacpp_peer
    from edgequant.export.runtime import Runner
    from edgequant.export.threads import configure
    configure(a.threads)
    load0 = os.getloadavg()
    items = []
    for name, path in entries:
        if path.suffix == ".gguf":
            note = llamacpp_peer.missing()
            if note:
                sys.exit(f"error: {note}")
            llm = llamacpp_peer.Peer(path, a.threads, a.prompt + a.decode).llm

            def pre(ids, llm=llm):
                llm.reset()
                llm.eval(ids)

            def dec(tok, llm=llm):
                llm.eval([tok])
            items.append((name, pre, dec, llm.n_vocab()))
        else:
            r = Runner(str(path), load_tokenizer=False)

            def pre(ids, r=r):
                r.new_sequence()
                r.prefill(ids)
            items.append((name, pre, r.decode, r.vocab))
    rng = np.random.default_rng(0)
    vocab = min(it[3] for it in items)
    for _, pre, dec, _ in items:   # warm-up
        pre([1, 2, 3, 4])
        dec(5)
    res = {name: {k: [] for k in ("pc", "pw", "dc", "dw")} for name, *_ in items}
    for rnd in range(a.rounds):
        ids = rng.integers(0, vocab, a.prompt).tolist()
        k = rnd % len(items)
        for name, pre, dec, _ in items[k:] + items[:k]:
            c, w = time.process_time(), time.perf_counter()
            pre(ids)
            res[name]["pc"].append(time.process_time() - c)
            res[name]["pw"].append(time.perf_counter() - w)
            c, w = time.process_time(), time.perf_counter()
            for t in ids[:a.decode]:
                dec(int(t))
            res[name]["dc"].append((time.process_time() - c) / a.decode)
            res[name]["dw"].append((time.perf_counter() - w) / a.decode)
    ref = res[items[-1][0]]
    head = ["entry", f"prefill {a.prompt} CPU ms (median)", "prefill wall ms (best)",
            f"prefill CPU / {items[-1][0]}", "decode CPU ms/token (median)", "decode wall ms/token (best)",
            f"decode CPU / {items[-1][0]}"]
    lines = header("CPU exports and llama.cpp interleaved in one process",
                   f"{cpu_model()}, {n_cores} cores; {a.threads} thread(s) per runtime", load0,
                   [f"{a.rounds} rounds; each: prefill of {a.prompt} random tokens, then {a.decode} decode steps; "
                    "ratios: median over rounds of the round's CPU-time ratio"])
    rows = []
    for name, r in res.items():
        pr = np.median(np.array(r["pc"]) / np.array(ref["pc"]))
        dr = np.median(np.array(r["dc"]) / np.array(ref["dc"]))
        rows.append([name, f"{1e3 * np.median(r['pc']):.1f}", f"{1e3 * min(r['pw']):.1f}", f"{pr:.3f}",
                     f"{1e3 * np.median(r['dc']):.2f}", f"{1e3 * min(r['dw']):.2f}", f"{dr:.3f}"])
    write(a.out, lines + [table(head, rows)])

if __name__ == "__main__":
    main()
