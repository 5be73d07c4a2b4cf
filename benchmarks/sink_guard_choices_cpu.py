"""Which linears OWQ's --sink-guard sends back to min-max groups on qwen cut to its first K blocks (CPU; N x L
calibration windows, seed 0). A check for issue 11.

    python benchmarks/sink_guard_choices_cpu.py 4 8 256        # K blocks, N windows, L tokens
"""
import sys
import time

import torch
from edgequant.loading import load_model
from edgequant.methods import CalibOptions, get_method
from edgequant.calibrate.configs import OWQConfig
from edgequant.schemes import get_scheme
K, n, L = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(2)
fp, tok = load_model("qwen2.5-coder-0.5b")
fp.model.layers = fp.model.layers[:K]; fp.config.num_hidden_layers = K
t0 = time.time()
r = get_method("owq").run(fp, tok, get_scheme("w3g128"), CalibOptions(calib="../shared/data/calibration", nsamples=n, seqlen=L,
                          config=OWQConfig(target_bits=3.1, sink_guard=True)), progress=False)
print(f"{time.time() - t0:.0f} s")
for k, v in r.stats.items():
    print(k, v.get("sink_guard"), round(v["output_rel_err"], 5), flush=True)
