"""Run an exported DIST folder where only the TVM runtime is installed (no compiler, no transformers, no edgequant
install): greedy tokens for given prompt token ids, then decode speed. Prints one JSON line.

    source .device/tvm-runtime/setup.sh
    python3 apps/cuda/run_dist.py DIST --ids 1,2,3 --new-tokens 32 [--bench 64]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _import_runner():
    # the checkout is not pip-installed here: map edgequant.export onto the export/ folder by hand
    sys.path.insert(0, str(ROOT))
    import edgequant
    edgequant.__path__.append(str(ROOT))
    from edgequant.export.runtime import Runner
    return Runner


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dist")
    ap.add_argument("--ids", required=True, help="prompt token ids, comma separated")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--bench", type=int, default=0, help="also time this many decode steps after each prompt of "
                    "--bench-prompts random tokens")
    ap.add_argument("--check", type=int, default=0, help="compare this many decode steps' logits with prefill's "
                    "(decode and prefill run different kernels: the CUDA decode GEMV against dlight's)")
    ap.add_argument("--bench-prompts", default="32,128,512", help="prompt lengths of --bench, comma separated")
    a = ap.parse_args()
    Runner = _import_runner()
    t = time.time()
    r = Runner(a.dist, load_tokenizer=False)
    load_s = time.time() - t
    ids = [int(x) for x in a.ids.split(",")]
    r.generate(ids, 4, stop_ids=())  # warm-up (first calls allocate workspaces)
    st = r.generate(ids, a.new_tokens, stop_ids=())
    out = {"device": str(r.dev), "load_s": round(load_s, 2), "tokens": st.tokens,
           "prefill_tokens_per_s": round(st.prefill_tps, 1), "decode_tokens_per_s": round(st.decode_tps, 1)}
    if a.check:
        import numpy as np
        toks = st.tokens[:a.check]
        r.new_sequence()
        r.prefill(ids)
        dec = np.stack([r.decode(t) for t in toks]).astype(np.float32)
        ref = r.logits(ids + toks)[len(ids):len(ids) + len(toks)].astype(np.float32)
        out["check"] = {"steps": len(toks), "max_abs_diff": float(np.abs(dec - ref).max()),
                        "max_abs_logit": float(np.abs(ref).max()),
                        "same_argmax": int((dec.argmax(-1) == ref.argmax(-1)).sum())}
    if a.bench:
        import numpy as np
        rows = []
        for n in (int(x) for x in a.bench_prompts.split(",")):
            prompt = np.random.default_rng(0).integers(0, r.vocab, n).tolist()
            b = r.generate(prompt, a.bench, stop_ids=())
            rows.append({"prompt_tokens": n, "prefill_tokens_per_s": round(b.prefill_tps, 1),
                         "decode_tokens_per_s": round(b.decode_tps, 1)})
        out["bench"] = rows
    print(json.dumps(out))


if __name__ == "__main__":
    main()
