"""CPU stand-in for `error_by_block.py` on qwen cut to its first K blocks: GPTQ W3 g128 against OWQ variants,
calibrated in memory on N x L windows (seed 0), the stream error after each block on 8 x 256 held-out windows (seed 1).

    python benchmarks/error_by_block_truncated.py 4 16 256    # K blocks, N windows, L tokens (results: quality-issue11-acc3.md)
"""
import sys, copy, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from error_by_block import block_outputs, rel, local_errors
from edgequant.loading import load_model
from edgequant.methods import CalibOptions, get_method
from edgequant.calibrate.configs import OWQConfig
from edgequant.budget import GPTQConfig
from edgequant.calibrate.blocks import capture_first_block_inputs
from edgequant.data import calibration_samples
from edgequant.schemes import get_scheme
K, n, L = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(2)
fp, tok = load_model("qwen2.5-coder-0.5b")
fp.model.layers = fp.model.layers[:K]
fp.config.num_hidden_layers = K
ids = calibration_samples(tok, "../shared/data/calibration", 8, 256, 1)
fs, _ = block_outputs(fp, fp.model.layers, ids, 4)
inp = capture_first_block_inputs(fp, fp.model.layers, ids)
s = get_scheme("w3g128")
variants = [("gptq", GPTQConfig()), ("owq3.1", OWQConfig(target_bits=3.1)), ("owq3.1-nosearch", OWQConfig(target_bits=3.1, clip_search=False)),
            ("owq0cols-search", OWQConfig(weak_columns=0))]
for tag, cfg in variants:
    m = copy.deepcopy(fp)
    t0 = time.time()
    meth = get_method("owq" if tag.startswith("owq") else "gptq")
    r = meth.run(m, tok, s, CalibOptions(calib="../shared/data/calibration", nsamples=n, seqlen=L, config=cfg), progress=False)
    st, _ = block_outputs(m, m.model.layers, ids, 4)
    loc = local_errors(m, m.model.layers, fs, inp.hidden, inp.use_layer, 4)
    out = [f"{i}: acc {rel(a, b)[0]:.4g} tok0 {rel(a, b)[1]:.3g} local {lo:.4g}" for i, (a, b, lo) in enumerate(zip(st, fs, loc))]
    oe = {k.split('layers.')[1]: round(v["output_rel_err"], 5) for k, v in r.stats.items()}
    print(tag, f"{time.time() - t0:.0f}s", " | ".join(out), flush=True)
    print("   linear output_rel_err:", oe, flush=True)
