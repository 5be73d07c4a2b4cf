"""Why GPTQ's rounding inside clipped ranges loses on qwen2 (issue 11): for each linear of the first K blocks (fp
stream, N x L calibration windows, seed 0), GPTQ (act-order) inside min-max groups against GPTQ inside the ranges of
OmniQuant's activation-aware clip search (LWC's starting point; the trained ranges clip about as much), and round to
nearest inside each. Printed per linear: the relative output error on the calibration inputs tr(dW H dW^T) / tr(W H
W^T) and the share of codes GPTQ left at the ends of the grid (0 or 2^b - 1), where its updates were clamped; then
the same error on held-out inputs (the same number of calibration windows drawn with seed 1, passed through the same
fp blocks), which GPTQ never saw, and on each held-out window's first token alone (the attention sink: 1/L of H,
read by every later position).

    python benchmarks/gptq_clipped_ranges_cpu.py qwen2.5-coder-0.5b w3g128 4 16 256
"""
import sys

import torch

from edgequant.calibrate.blocks import BlockInputs, HessianCollector, capture_first_block_inputs, run_block
from edgequant.calibrate.configs import OmniConfig
from edgequant.calibrate.gptq import gptq_quantize
from edgequant.calibrate.metrics import output_error
from edgequant.calibrate.omniquant.fuse import OmniBlock, _key
from edgequant.data import calibration_samples
from edgequant.loading import load_model
from edgequant.models import family_for
from edgequant.quantizer import group_minmax, params_from_range, quantize_weight
from edgequant.schemes import get_scheme


def main():
    name, scheme_name, K, n, L = sys.argv[1:3] + [int(a) for a in sys.argv[3:6]]
    torch.set_num_threads(2)
    model, tok = load_model(name)
    fam = family_for(model.config.model_type)
    layers = model.get_submodule(fam.layers_path)
    s = get_scheme(scheme_name)
    samples = calibration_samples(tok, "../shared/data/calibration", n, L, 0)
    inp = capture_first_block_inputs(model, layers, samples)
    held = capture_first_block_inputs(model, layers, calibration_samples(tok, "../shared/data/calibration", n, L, 1))
    print(f"{name} {scheme_name}, blocks 0-{K - 1}, {n}x{L}: rel output error (share of codes at the grid's ends)")
    print(f"{'linear':22s} {'RTN minmax':>18s} {'RTN clipped':>18s} {'GPTQ minmax':>18s} {'GPTQ clipped':>18s}"
          f" | held-out: {'RTN mm':>7s} {'RTN cl':>7s} {'GPTQ mm':>7s} {'GPTQ cl':>7s} | its first tokens")
    tot = {k: 0.0 for k in ("rm", "rc", "gm", "gc")}
    toth = {k: 0.0 for k in tot}
    tot0 = {k: 0.0 for k in tot}
    for i in range(K):
        block = layers[i]
        kw = inp.use_layer(i)
        hs, hh, h0, sq = {}, {}, {}, {}
        for g in fam.groups:
            c = HessianCollector(block.get_submodule(g.names[0]))
            run_block(block, inp, batch_size=4, stop_at=block.get_submodule(g.names[-1]))
            H = c.remove()
            c = HessianCollector(block.get_submodule(g.names[0]), first_token=True)
            run_block(block, held, batch_size=4, stop_at=block.get_submodule(g.names[-1]))
            Hh = c.remove()
            for nm in g.names:
                hs[nm], hh[nm], h0[nm] = H, Hh, c.H_first
            sq[g.names[0]] = torch.diag(H) / 2
        ob = OmniBlock(block, model.config, s, OmniConfig(epochs=1, lwc_init="search"))
        ob.search_lwc_init({fam.stats_source(nm): sq[fam.stats_source(nm)] for nm in fam.linear_names})
        for nm in fam.linear_names:
            w = block.get_submodule(nm).weight.detach().float()
            H = hs[nm]
            mm = params_from_range(*group_minmax(w, s), s)
            cl = tuple(t.detach() for t in ob.lwc[_key(nm)].params(w))
            row = {}
            for tag, p in (("rm", mm), ("rc", cl), ("gm", mm), ("gc", cl)):
                qw = quantize_weight(w, s, *p) if tag[0] == "r" else gptq_quantize(w, H, s, act_order=True, params=p)[0]
                wh = qw.dequantize()
                row[tag] = (output_error(w, wh, H), float(((qw.q == 0) | (qw.q == s.maxq)).float().mean()),
                            output_error(w, wh, hh[nm]), output_error(w, wh, h0[nm]))
            for k in tot:
                tot[k] += row[k][0]
                toth[k] += row[k][2]
                tot0[k] += row[k][3]
            print(f"{i}.{nm:20s} " + " ".join(f"{row[k][0]:9.4f} ({row[k][1]:.3f})" for k in ("rm", "rc", "gm", "gc"))
                  + " | " + " ".join(f"{row[k][2]:7.4f}" for k in ("rm", "rc", "gm", "gc"))
                  + " | " + " ".join(f"{row[k][3]:7.4f}" for k in ("rm", "rc", "gm", "gc")), flush=True)
        inp = BlockInputs(run_block(block, inp, batch_size=4), inp.kwargs, inp.layer_kwargs)
        held = BlockInputs(run_block(block, held, batch_size=4), held.kwargs, held.layer_kwargs)
    print("sum of rel errors, calibration: " + " ".join(f"{k} {v:.4f}" for k, v in tot.items()))
    print("sum of rel errors, held-out:    " + " ".join(f"{k} {v:.4f}" for k, v in toth.items()))
    print("sum of rel errors, held-out first tokens: " + " ".join(f"{k} {v:.4f}" for k, v in tot0.items()))


if __name__ == "__main__":
    main()
