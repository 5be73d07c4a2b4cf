"""OmniQuant on a GPU with the paper's settings (128 x 2048 tokens, 20 epochs, LWC init 4.0, lr 1e-2), then WikiText-2
perplexity of the checkpoint (and, with --baseline, of the unquantized model). Prints the time each block finished,
so a run cut by a time limit shows where it got to (run it again: it resumes from the last finished block).

    python benchmarks/quality_omniquant_gpu.py --bits 3 --group-size 128 --batch-size 4 --baseline \\
        --model smol.gguf --out results/   # results: benchmarks/results/quality-omniquant-gpu.md
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from edgequant import api
from edgequant.calibrate.omniquant import trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default=str(SHARED / "calibration"))
    ap.add_argument("--data", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4, help="windows per step (the paper uses 1)")
    ap.add_argument("--work", default="omniquant-gpu", help="checkpoint folder")
    ap.add_argument("--out", default=".", help="folder for result-w*g*.json and the checkpoint's edgequant.json")
    ap.add_argument("--baseline", action="store_true", help="also evaluate the unquantized model")
    a = ap.parse_args(argv)
    t0 = time.time()
    trainer._after_block = lambda i: print(f"block {i} done at {time.time() - t0:.0f} s", flush=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    t = time.time()
    ck = api.quantize(a.model, a.work, method="omniquant", bits=a.bits, group_size=a.group_size, calib=a.calib,
                      nsamples=128, seqlen=2048, device="cuda", batch_size=a.batch_size, epochs=20, progress=False)
    res["quantize_s"] = time.time() - t
    res["omniquant"] = api.evaluate(ck, a.data, max_windows=40, device="cuda", progress=False)
    print("omniquant ppl", res["omniquant"]["perplexity"], flush=True)
    out = Path(a.out)
    shutil.copy(ck / "edgequant.json", out / f"edgequant-w{a.bits}g{a.group_size}.json")
    if a.baseline:
        res["baseline"] = api.evaluate(a.model, a.data, max_windows=40, device="cuda", progress=False)
        print("baseline ppl", res["baseline"]["perplexity"], flush=True)
    (out / f"result-w{a.bits}g{a.group_size}.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
