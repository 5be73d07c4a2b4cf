"""Why OmniQuant loses to GPTQ (issue 11): a CPU stand-in that calibrates only the first K blocks of a real model
(every later block stays fp32), then scores WikiText NLL on 2048-token windows, split into the first token's
successor, positions 1-511 and 512-2047 (the calibration windows are shorter than the evaluation's).

    python benchmarks/omniquant_gptq_cpu.py qwen2.5-coder-0.5b w3g128 6 16 256 2 gptq,omni,omni-tokrel

Arguments: model, scheme, K blocks, N calibration windows of L tokens (seed 0), evaluation windows, variants.
Each variant is GPTQ (act-order) or OmniQuant (LWC) with one change against the row the GPU tables use (2 epochs,
lr 5e-2, search init); `VARIANTS` below names them ('fp': no quantization). Both methods see the same windows
(equal settings). Results: the notes of benchmarks/results/quality-issue11-acc8-cuda.md and -acc9-cuda.md.
"""
import copy
import math
import sys
import time

import torch
import torch.nn.functional as F

from edgequant.budget import GPTQConfig
from edgequant.calibrate.configs import OmniConfig
from edgequant.data import eval_windows
from edgequant.loading import load_model
from edgequant.methods import CalibOptions, get_method
from edgequant.models import family_for
from edgequant.schemes import get_scheme

OMNI = dict(epochs=2, lwc_lr=5e-2, lwc_init="search")
VARIANTS = {
    "fp": None,
    "rtn": ("rtn", None),
    "gptq": ("gptq", GPTQConfig()),
    "omni": ("omniquant", OmniConfig(**OMNI)),
    "omni-tokrel": ("omniquant", OmniConfig(**OMNI, loss="token_rel")),
    "omni-noqkup": ("omniquant", OmniConfig(**OMNI, clip_qk=False, clip_up=False)),
    "omni-paper": ("omniquant", OmniConfig(epochs=2, lwc_lr=1e-2, lwc_init=4.0)),
    "omni-paper-tokrel": ("omniquant", OmniConfig(epochs=2, lwc_lr=1e-2, lwc_init=4.0, loss="token_rel")),
    "omni-e6": ("omniquant", OmniConfig(**{**OMNI, "epochs": 6})),
    "omni-e10": ("omniquant", OmniConfig(**{**OMNI, "epochs": 10})),
    "omni-e0": ("omniquant", OmniConfig(epochs=0, lwc_init="search")),
    "omni-gptq": ("omniquant", OmniConfig(**OMNI, gptq=True)),
    "omni-gptq-tokrel": ("omniquant", OmniConfig(**OMNI, gptq=True, loss="token_rel")),
    "omni-gptq-paper": ("omniquant", OmniConfig(epochs=2, lwc_lr=1e-2, lwc_init=4.0, gptq=True)),
    "omni-e0-gptq": ("omniquant", OmniConfig(epochs=0, lwc_init="search", gptq=True)),
    "omni-lr1e2": ("omniquant", OmniConfig(**{**OMNI, "lwc_lr": 1e-2})),
    "omni-let": ("omniquant", OmniConfig(**OMNI, let=True)),
    "omni-e0-init6": ("omniquant", OmniConfig(epochs=0, lwc_init=6.0)),
    "omni-e0-init20": ("omniquant", OmniConfig(epochs=0, lwc_init=20.0)),
    "omni-init6": ("omniquant", OmniConfig(epochs=2, lwc_lr=5e-2, lwc_init=6.0)),
    # acc9: LWC at exactly no clipping + GPTQ rounding must equal plain GPTQ (same ranges, same H)
    "omni-e0-init20-gptq": ("omniquant", OmniConfig(epochs=0, lwc_init=20.0, gptq=True)),
    "omni-e0-gptq-noqkup": ("omniquant", OmniConfig(epochs=0, lwc_init="search", clip_qk=False, clip_up=False,
                                                    gptq=True)),
    "omni-local": ("omniquant", OmniConfig(**OMNI, block_target="local")),
    "omni-local-tokrel": ("omniquant", OmniConfig(**OMNI, block_target="local", loss="token_rel")),
    "omni-gptq-local": ("omniquant", OmniConfig(**OMNI, block_target="local", gptq=True)),
    "omni-init6-e6": ("omniquant", OmniConfig(epochs=6, lwc_lr=5e-2, lwc_init=6.0)),
    "omni-init6-e6-local": ("omniquant", OmniConfig(epochs=6, lwc_lr=5e-2, lwc_init=6.0, block_target="local")),
}
# variants with a patched search init: groups whose best ratio is 1 start exactly unclipped (logit 20: sigmoid is 1
# in fp32), instead of at sigmoid(6) = 0.9975
NONE20 = {"omni-e0-n20": "omni-e0", "omni-n20": "omni", "omni-gptq-n20": "omni-gptq"}


@torch.no_grad()
def nll_parts(model, windows):
    """Mean NLL of the token after position 0, of positions 1-511 and of 512 on, over `windows`."""
    parts = [[0.0, 0], [0.0, 0], [0.0, 0]]
    for w in windows:
        logits = model(w[None], use_cache=False).logits[0, :-1].float()
        nll = F.cross_entropy(logits, w[1:], reduction="none")
        for p, sl in zip(parts, (slice(0, 1), slice(1, 511), slice(511, None))):
            p[0] += float(nll[sl].sum())
            p[1] += nll[sl].numel()
    return [s / n for s, n in parts], sum(p[0] for p in parts) / sum(p[1] for p in parts)


def main():
    model_name, scheme_name, K, n, L, nwin = sys.argv[1:3] + [int(a) for a in sys.argv[3:7]]
    names = sys.argv[7].split(",")
    torch.set_num_threads(2)
    fp, tok = load_model(model_name)
    fp.eval()
    fam = family_for(fp.config.model_type)
    layers = fp.get_submodule(fam.layers_path)
    windows = eval_windows(tok, "../shared/data/wikitext-2-raw/wiki.test.raw", 2048, nwin)
    s = get_scheme(scheme_name)
    print(f"{model_name} {scheme_name}, blocks 0-{K - 1} quantized, calibration {n}x{L}, {nwin} eval windows",
          flush=True)
    for name in names:
        from edgequant.calibrate.omniquant import lwc as lwc_mod
        lwc_mod.search_clip_init.__wrapped__.__defaults__ = (*lwc_mod.search_clip_init.__wrapped__.__defaults__[:2],
                                                 20.0 if name in NONE20 else 6.0)
        if name == "fp":
            parts, mean = nll_parts(fp, windows)
            print(f"{name:18s} ppl {math.exp(mean):8.3f}  nll tok1 {parts[0]:.3f} 1-511 {parts[1]:.4f} "
                  f"512+ {parts[2]:.4f}", flush=True)
            continue
        method, cfg = VARIANTS[NONE20.get(name, name)]
        m = copy.deepcopy(fp)
        full = m.get_submodule(fam.layers_path)
        parent = m.get_submodule(fam.layers_path.rsplit(".", 1)[0])
        attr = fam.layers_path.rsplit(".", 1)[1]
        setattr(parent, attr, full[:K])
        m.config.num_hidden_layers = K
        t0 = time.time()
        res = get_method(method).run(m, tok, s, CalibOptions(calib="../shared/data/calibration", nsamples=n, seqlen=L,
                                                             config=cfg), progress=False)
        tq = time.time() - t0
        with torch.no_grad():   # RTN returns its integers without touching the model (GPTQ and OmniQuant write back)
            for lin, qw in res.quantized.items():
                m.get_submodule(lin).weight.copy_(qw.dequantize().to(m.get_submodule(lin).weight.dtype))
        for i in range(K):
            full[i] = getattr(parent, attr)[i]
        setattr(parent, attr, full)
        m.config.num_hidden_layers = len(full)
        parts, mean = nll_parts(m, windows)
        blocks = (res.calibration or {}).get("blocks") or []
        bl = " ".join(f"{b['block']}:{b['loss_before']:.3g}->{b['loss_after']:.3g}" for b in blocks)
        print(f"{name:18s} ppl {math.exp(mean):8.3f}  nll tok1 {parts[0]:.3f} 1-511 {parts[1]:.4f} "
              f"512+ {parts[2]:.4f}  ({tq:.0f} s) {bl}", flush=True)
        del m


if __name__ == "__main__":
    main()
