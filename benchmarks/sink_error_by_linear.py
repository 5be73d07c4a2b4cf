"""Each linear's output error on the first token of a window (the attention sink) and on the rest, for RTN W3 g128
with min-max groups against OWQ's range search (`mse_clip_params`, the paper's |dW|^2.4 grid), in the first K blocks
of a model, every other weight fp32 (inputs: 16 x 64 calibration windows, seed 0). A CPU check for issue 11.

    python benchmarks/sink_error_by_linear.py qwen2.5-coder-0.5b 6      # model, K
"""
import sys

import torch

from edgequant.loading import load_model
from edgequant.data import calibration_samples
from edgequant.quantizer import expand_groups, group_minmax, mse_clip_params, params_from_range, quantize_int
from edgequant.schemes import get_scheme
torch.set_num_threads(1)
name = sys.argv[1]; K = int(sys.argv[2])
fp, tok = load_model(name); fp.eval()
layers = fp.model.layers
ids = calibration_samples(tok, "../shared/data/calibration", 16, 64, 0)
s = get_scheme("w3g128")
X = {}
hooks = []
for i in range(K):
    for n, m in layers[i].named_modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(lambda _m, a, y, key=(i, n): X.setdefault(key, []).append(a[0].detach())))
with torch.no_grad():
    fp.model.layers = layers[:K]
    fp.model(ids, use_cache=False)
def q(w, search):
    sc, z = mse_clip_params(w, s) if search else params_from_range(*group_minmax(w, s), s)
    se, ze = expand_groups(sc, s, w.shape[1]), expand_groups(z, s, w.shape[1])
    return (quantize_int(w, se, ze, s.maxq) - ze) * se
for (i, n), xs in sorted(X.items()):
    x = torch.cat(xs).float()
    w = layers[i].get_submodule(n).weight.detach().float()
    y0 = x[:, 0] @ w.T; yr = x[:, 1:].reshape(-1, x.shape[-1]) @ w.T
    out = []
    for search in (False, True):
        wq = q(w, search)
        e0 = float(((x[:, 0] @ wq.T - y0) ** 2).sum() / (y0 ** 2).sum())
        er = float(((x[:, 1:].reshape(-1, x.shape[-1]) @ wq.T - yr) ** 2).sum() / (yr ** 2).sum())
        out.append((e0, er))
    print(f"{i} {n:22s} sink minmax {out[0][0]:.4g} search {out[1][0]:.4g} (x{out[1][0]/out[0][0]:.2f}) | rest minmax {out[0][1]:.4g} search {out[1][1]:.4g} (x{out[1][1]/out[0][1]:.2f}) | max|y0| {float(y0.abs().max()):.1f} max|w| {float(w.abs().max()):.3f}", flush=True)
