"""Prefill and decode tokens/s of SmolLM2-135M-Instruct exported for this machine's CPU (TVM runtime), unquantized
fp16 and RTN W4 g128 / W3 g128 / W2 g64, with the bytes of weights each library loads.

    python benchmarks/decode_cpu.py [--work DIR] [--prompt-lengths 32,128] [--decode-tokens 32] [--repeats 2]

Writes benchmarks/results/decode_cpu.md (and .json) with the machine and date. Speeds are the best of --repeats
runs of random prompt tokens, greedy decoding; the first call of each library is a warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [("fp16", None, None), ("W4 g128", 4, 128), ("W3 g128", 3, 128), ("W2 g64", 2, 64)]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/edgequant/bench-decode-cpu"))
    ap.add_argument("--prompt-lengths", default="32,128")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    from edgequant import api
    from edgequant.export import api as xapi
    from edgequant.loading import fetch_default_model
    import tvm

    load0 = os.getloadavg()[0]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    hf = fetch_default_model(progress=False)
    lengths = [int(x) for x in a.prompt_lengths.split(",")]
    rows = []
    for name, bits, group in CONFIGS:
        tag = name.replace(" ", "").lower()
        src = hf
        if bits is not None:
            src = work / f"q-{tag}"
            if not (src / "config.json").is_file():
                api.quantize(str(hf), str(src), method="rtn", bits=bits, group_size=group, progress=False)
        dist = work / f"dist-{tag}-cpu"
        t = time.time()
        xapi.export(str(src), "cpu", str(dist), progress=False)
        export_s = time.time() - t
        res = xapi.bench(str(dist), lengths, a.decode_tokens, a.repeats)
        row = {"config": name, "weight_bytes": res["weight_bytes"], "export_s": round(export_s, 1)}
        for r in res["rows"]:
            row[f"prefill_{r['prompt_tokens']}"] = r["prefill_tokens_per_s"]
            row[f"decode_{r['prompt_tokens']}"] = r["decode_tokens_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores, {platform.system()} {platform.machine()}"
    head = ["config", "weights MiB"] + [f"prefill tok/s (prompt {n})" for n in lengths] + \
           [f"decode tok/s (after {n})" for n in lengths]
    lines = [f"# SmolLM2-135M-Instruct on the CPU through TVM (edgequant export --target cpu)", "",
             f"- machine: {machine}", f"- date: {when}", f"- TVM {tvm.__version__}; RTN checkpoints; "
             f"{a.decode_tokens} decode tokens, best of {a.repeats}; batch 1; prompts of random tokens",
             f"- 1-minute load average when the run started: {load0:.2f} (2 would mean both cores already busy)",
             "- weights MiB include the fp16 embedding (54 MiB, tied to the output layer) in every row",
             "- CPU exports run 3-bit weights as bit planes (exactly 3 bits/weight; see tvm_schedules/dequant.py), "
             "with the checkpoint's 10-values-per-word layout the same W3 row decoded 5.9 tok/s "
             "(earlier run, shared CPU)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], f"{r['weight_bytes'] / 2**20:.1f}"] + [f"{r[f'prefill_{n}']:.1f}" for n in lengths] + \
                [f"{r[f'decode_{n}']:.1f}" for n in lengths]
        lines.append("| " + " | ".join(cells) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode_cpu.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "decode_cpu.json").write_text(json.dumps({"machine": machine, "date": when, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
