"""OmniQuant on the GPU with the paper's settings (128 x 2048, 20 epochs, LWC init 4.0, lr 1e-2), then perplexity."""
import json, os, sys, time
import torch
from edgequant import api
from edgequant.calibrate.omniquant import trainer

T0 = time.time()
trainer._after_block = lambda i: print(f"block {i} done at {time.time() - T0:.0f} s", flush=True)
out = os.environ.get("OUT", "/tmp/out")
bits, gs, bs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
t = time.time()
ck = api.quantize("/tmp/smol.gguf", f"/tmp/q{bits}g{gs}", method="omniquant", bits=bits, group_size=gs,
                  calib=".device/a/calibration", nsamples=128, seqlen=2048, device="cuda", batch_size=bs,
                  epochs=20, progress=False)
res["quantize_s"] = time.time() - t
print("quantized", res, flush=True)
r = api.evaluate(ck, ".device/a/wiki.test.raw", max_windows=40, device="cuda", progress=False)
res["omniquant"] = r
print("omniquant ppl", r["perplexity"], flush=True)
import shutil
shutil.copy(ck / "edgequant.json", f"{out}/edgequant-w{bits}g{gs}.json")
if len(sys.argv) > 4:
    b = api.evaluate("/tmp/smol.gguf", ".device/a/wiki.test.raw", max_windows=40, device="cuda", progress=False)
    res["baseline"] = b
    print("baseline ppl", b["perplexity"], flush=True)
json.dump(res, open(f"{out}/result-w{bits}g{gs}.json", "w"), indent=1, default=str)
