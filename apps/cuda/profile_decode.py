"""Where a CUDA decode step's time goes, on a machine with the TVM runtime bundle (and PyTorch for the kernel trace):
one JSON line with the step time of `Runner.generate` (greedy), of the one-step Python loop (`Runner.decode`: embed,
KV begin/end, decode, logits to the host), the step time without the logits' readback, the host's own issue time per
step (steps queued without a sync; timing only, their tokens are not valid: see Runner._generate_greedy), and, from a
CUPTI trace of a few steps (torch.profiler sees every kernel of the process, also those of TVM's CUDA graphs) of
`generate`, kernels per step, their summed time and the slowest kernels.

    source .device/tvm-runtime/setup.sh
    python3 apps/cuda/profile_decode.py DIST --ids 1,2,3 [--steps 64] [--trace OUT.json]
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

from run_dist import _import_runner


def _timed(r, ids, steps, fn):
    r.new_sequence()
    r.prefill(ids)
    tok = ids[-1]
    fn(r, tok)   # first step outside the clock
    r.dev.sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn(r, tok)
    r.dev.sync()
    return (time.perf_counter() - t) / steps * 1e3


def _no_readback(r, tok):   # the step's work and a sync, without copying the logits to the host
    r._forward("decode", [tok])
    r.dev.sync()


def _full(r, tok):
    r.decode(tok)


def _trace(r, ids, steps, path):
    import torch
    from torch.profiler import ProfilerActivity, profile
    def run(n):   # the runner's own loop: a prefill, then n - 1 decode steps; (kernels, copies, per name)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            st = r.generate(ids, n, stop_ids=())
        torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and "memcpy" not in e.name.lower()
                   and "memset" not in e.name.lower()]
        copies = [e for e in prof.events() if e.device_type.name == "CUDA" and e not in kernels]
        per = defaultdict(lambda: [0, 0.0])
        for e in kernels:
            per[e.name][0] += 1
            per[e.name][1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        return st, prof, kernels, copies, per

    _, _, k0, c0, per0 = run(1)   # the prefill alone, subtracted below
    st, prof, kernels, copies, per = run(steps + 1)
    wall = st.decode_s / steps * 1e3
    if path:
        prof.export_chrome_trace(path)
    for name, (n, us) in per0.items():
        per[name][0] -= n
        per[name][1] -= us
    kernels, copies = kernels[len(k0):], copies[len(c0):]
    busy = sum(v[1] for v in per.values()) / steps / 1e3
    top = sorted(per.items(), key=lambda kv: -kv[1][1])[:12]
    return {"steps": steps, "step_ms_under_profiler": round(wall, 3), "kernels_per_step": len(kernels) / steps,
            "copies_per_step": len(copies) / steps, "kernel_ms_per_step": round(busy, 3),
            "top": [{"name": k[:60], "per_step": n / steps, "us_per_step": round(us / steps, 2)} for k, (n, us) in top]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dist")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--trace", default="")
    a = ap.parse_args()
    Runner = _import_runner()
    r = Runner(a.dist, load_tokenizer=False)
    ids = [int(x) for x in a.ids.split(",")]
    r.generate(ids, 4, stop_ids=())
    st = r.generate(ids, a.steps + 1, stop_ids=())
    out = {"dist": a.dist, "generate_step_ms": round(st.decode_s / a.steps * 1e3, 3),
           "device_greedy": getattr(r, "_argmax", None) is not None,
           "full_step_ms": round(_timed(r, ids, a.steps, _full), 3),
           "no_readback_step_ms": round(_timed(r, ids, a.steps, _no_readback), 3)}

    def queued(r, tok):   # no sync inside: the host's issue time when it never waits for the GPU
        r._forward("decode", [tok])
    r.new_sequence()
    r.prefill(ids)
    r.dev.sync()
    t = time.perf_counter()
    for _ in range(a.steps):
        queued(r, ids[-1])
    issue = (time.perf_counter() - t) / a.steps * 1e3
    r.dev.sync()
    out["host_issue_ms"] = round(issue, 3)
    out["queued_step_ms"] = round((time.perf_counter() - t) / a.steps * 1e3, 3)
    if getattr(r, "_graph", None) is not None:   # the one-graph step (export/graph_decode.py): replays queued
        r.new_sequence()
        r.prefill(ids)
        r._graph_step(ids[-1])
        r.dev.sync()
        t = time.perf_counter()
        for _ in range(a.steps):
            r._graph_step(None)
        out["graph_issue_ms"] = round((time.perf_counter() - t) / a.steps * 1e3, 3)
        r.dev.sync()
        out["graph_queued_step_ms"] = round((time.perf_counter() - t) / a.steps * 1e3, 3)
    try:
        out["trace"] = _trace(r, ids, 8, a.trace)
    except Exception as e:  # noqa: BLE001 - the trace is extra; the timings above stand without it
        out["trace_error"] = f"{type(e).__name__}: {e}"[:300]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
