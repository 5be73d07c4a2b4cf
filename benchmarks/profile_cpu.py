"""Where the time of a CPU export goes: every call the TVM VM makes during one prefill of --prompt tokens and
--decode decode steps after it, timed through the VM's instrument hook and summed per kernel.

    python benchmarks/profile_cpu.py DIST [DIST ...] [--prompt 128] [--decode 8] [--threads 1] [--clock cpu]
                                    [--repeats 3] [--out NAME]

--clock cpu (default) sums process CPU time (all threads) per call: on a shared machine it moves far less with other
processes' load than wall time, and with --threads 1 it is each kernel's own work. --clock wall measures what a user
waits for (use it on an idle machine). The KV cache's attention call (`attention_kv_cache_attention_with_fused_qkv`)
includes its split + RoPE, append and attention kernels. The instrument hook is Python: it adds a few microseconds
per call, visible in decode as time outside the listed kernels ("total" vs "instrumented").
Prints one table per DIST and phase (best of --repeats), and with --out writes them to benchmarks/results/<out>.md.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def profile(dist: str, prompt: int, decode: int, repeats: int, clock) -> list[str]:
    import numpy as np
    import tvm

    from edgequant.export.runtime import Runner
    r = Runner(dist, load_tokenizer=False)
    acc, cnt, t0 = collections.defaultdict(float), collections.Counter(), [0.0]

    def instrument(_func, sym, before, _ret, *_args):
        if before:
            t0[0] = clock()
        else:
            acc[sym] += clock() - t0[0]
            cnt[sym] += 1
        return 0

    ids = np.random.default_rng(0).integers(0, r.vocab, prompt).tolist()
    r.vm.set_instrument(tvm.runtime.convert(instrument) if hasattr(tvm.runtime, "convert") else instrument)

    def run_prefill():
        r.new_sequence()
        r.prefill(ids)

    def run_decode():
        for _ in range(decode):
            r.decode(int(ids[0]))

    lines = []
    for phase, fn, setup in ((f"prefill of {prompt} tokens", run_prefill, None),
                             (f"{decode} decode steps after {prompt} tokens", run_decode, run_prefill)):
        best = None
        for _ in range(repeats):
            if setup:
                setup()
            acc.clear()
            cnt.clear()
            t = clock()
            fn()
            total = clock() - t
            if best is None or total < best[0]:
                best = (total, dict(acc), dict(cnt))
        total, a, c = best
        lines += [f"### {Path(dist).name}: {phase}", "",
                  f"total {total * 1e3:.1f} ms, instrumented calls {sum(a.values()) * 1e3:.1f} ms", "",
                  "| kernel | calls | ms | share of total |", "|---|---|---|---|"]
        for sym, v in sorted(a.items(), key=lambda kv: -kv[1]):
            if v / total >= 0.002:
                lines.append(f"| {sym} | {c[sym]} | {v * 1e3:.2f} | {100 * v / total:.1f}% |")
        lines.append("")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dists", nargs="+")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    os.environ["EDGEQUANT_THREADS"] = str(a.threads)   # before the first Runner sizes TVM's pool
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    load0 = os.getloadavg()
    body = []
    for d in a.dists:
        body += profile(d, a.prompt, a.decode, a.repeats, clock)
    lines = ["# Per-kernel time of CPU exports (benchmarks/profile_cpu.py)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {a.threads} TVM thread(s); clock: "
             f"{'process CPU time' if a.clock == 'cpu' else 'wall time'}; best of {a.repeats}",
             f"- load averages {' / '.join(f'{v:.2f}' for v in load0)} at the start, "
             f"{' / '.join(f'{v:.2f}' for v in os.getloadavg())} at the end",
             f"- command: python benchmarks/profile_cpu.py {' '.join(sys.argv[1:])}", ""] + body
    print("\n".join(lines))
    if a.out:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{a.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
