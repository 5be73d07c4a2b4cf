"""How far two exports of the same model disagree: prefill logits of one random prompt, the logits of decode steps
after it, and all-position logits, of DIST A against DIST B (e.g. main's library against a branch's).

    python benchmarks/dist_logits_diff.py DIST_A DIST_B [--prompt 128] [--decode 16] [--all 64] [--seed 3]

Prints max |A - B| (with max |A| for scale) and how often the argmax agrees, per part. 0 means bit-identical.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--all", type=int, default=64, help="tokens of the all-position logits")
    ap.add_argument("--seed", type=int, default=3)
    a = ap.parse_args()
    for d in (a.a, a.b):
        if not Path(d, "lib.so").is_file():
            sys.exit(f"error: {d} is not an exported DIST folder (no lib.so); pass the folders `edgequant export` wrote")
    import numpy as np

    from edgequant.export.runtime import Runner
    runners = [Runner(a.a, load_tokenizer=False), Runner(a.b, load_tokenizer=False)]
    vocab = min(r.vocab for r in runners)
    rng = np.random.default_rng(a.seed)
    ids = rng.integers(0, vocab, a.prompt).tolist()
    steps = rng.integers(0, vocab, a.decode).tolist()
    out = []
    for r in runners:
        r.new_sequence()
        pre = np.asarray(r.prefill(ids), np.float32)
        dec = np.stack([np.asarray(r.decode(int(t)), np.float32) for t in steps])
        out.append((pre, dec, np.asarray(r.logits(ids[:a.all]), np.float32)))
    for name, x, y in zip((f"prefill ({a.prompt} tokens)", f"{a.decode} decode steps",
                           f"all-position ({a.all} tokens)"), *out):
        print(f"{name}: max |A - B| {np.abs(x - y).max():.3g} (max |A| {np.abs(x).max():.3g}), "
              f"argmax equal {np.mean(x.argmax(-1) == y.argmax(-1)):.3f}")


if __name__ == "__main__":
    main()
