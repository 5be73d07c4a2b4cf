"""CPU check of block tuning (`calibrate/blocktune.py`) on a real model without GPTQ's column loop: every block linear
rounded to nearest (min-max groups), then optionally each block tuned toward the fp block; perplexity on the first W
WikiText-2 windows. For machines where GPTQ itself is too slow (results: quality-issue11-acc3.md).

    python benchmarks/blocktune_rtn_cpu.py smollm2-135m w3g128 16 256 2 '[{}, {"epochs": 2, "loss": "token_rel", "lr": 2e-3}]'
"""
import sys, time, json, torch
from edgequant.loading import load_model
from edgequant.data import calibration_samples, eval_windows
from edgequant.calibrate.layerwise import calibrate_layerwise
from edgequant.calibrate.blocktune import tune_block
from edgequant.quantizer import quantize_weight
from edgequant.schemes import get_scheme
from edgequant.perplexity import evaluate
model_name, scheme_name, n, L, W = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cfgs = json.loads(sys.argv[6])
torch.set_num_threads(2)
s = get_scheme(scheme_name)
for cfg in cfgs:
    model, tok = load_model(model_name)
    samples = calibration_samples(tok, "../shared/data/calibration", n, L, 0)
    t0 = time.time()
    log = []
    def qfn(name, lin, H):
        return quantize_weight(lin.weight.detach().float(), s), {}
    tune = None
    if cfg.get("epochs"):
        def tune(i, block, linears, inputs, targets):
            r = tune_block(block, linears, inputs, targets, cfg["epochs"], cfg.get("lr", 1e-3), "cpu", 4, 0, cfg.get("loss", "mse"))
            log.append((i, round(r["losses"][0], 5), round(min(r["losses"]), 5), r["kept"]))
    if tune is None:   # plain RTN needs no block passes
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                    mod.weight.copy_(quantize_weight(mod.weight.float(), s).dequantize())
    else:
        calibrate_layerwise(model, samples, qfn, "cpu", 4, False, tune=tune)
    tq = time.time() - t0
    res = evaluate(model, eval_windows(tok, "../shared/data/wikitext-2-raw/wiki.test.raw", 2048, W), progress=False)
    print(cfg, f"ppl {res.perplexity:.3f} calib {tq:.0f}s", log, flush=True)
