"""Does clipping a few large weights of qwen2's early MLP break its attention sink? A CPU check for issue 11.

Only the linears of the given kinds (default gate/up) of blocks FIRST..LAST are quantized (RTN W3 g128), either with min-max groups or with
OWQ's range search (`mse_clip_params`, the paper's |dW|^2.4 grid); every other weight stays fp32. For each variant
it prints the first token's (the attention sink's) hidden state after every block: its largest channel and its
relative error against fp, and the WikiText NLL over positions 1-511 and 512-2047 of 2048-token windows, so the
cost of a damaged sink can be seen to grow with the context length that the calibration (512 tokens) never saw.

    python benchmarks/sink_clip_cpu.py qwen2.5-coder-0.5b 0 5 2      # model, first and last block, windows
    python benchmarks/sink_clip_cpu.py qwen2.5-coder-0.5b 0 5 2 gate_proj,up_proj fp,protect

The optional 6th argument picks variants (default fp,minmax,search; `search@down_proj` quantizes only that kind):
`protect` is the range search that clips no weight of an input where the first token is `owq.SINK_RATIO` times louder
than the rest (`--sink-protect`); `output` is the search weighted by each input's mean square (`--clip-metric
output`); `gated` scores gate's and up's candidates on the MLP product act(gate) * up (`owq.gated_product_weights`);
`hblock` scores each group by its output error dw^T H dw with H's block of the group (its inputs' correlations
included); all from 8 calibration windows of 512 tokens of the fp model (K divisible by 128 assumed for `hblock`).
"""
import sys
import time

import torch

from edgequant.calibrate.owq import gated_product_weights, sink_columns
from edgequant.data import calibration_samples, eval_windows
from edgequant.loading import load_model
from edgequant.models import family_for
from edgequant.quantizer import expand_groups, group_minmax, mse_clip_params, params_from_range, quantize_int
from edgequant.schemes import get_scheme

model_name, first, last, nwin = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
kinds = sys.argv[5].split(",") if len(sys.argv) > 5 else ["gate_proj", "up_proj"]
variants = sys.argv[6].split(",") if len(sys.argv) > 6 else ["fp", "minmax", "search"]
torch.set_num_threads(2)
fp, tok = load_model(model_name)
fp.eval()
fam = family_for(fp.config.model_type)
layers = fp.get_submodule(fam.layers_path)
ids = eval_windows(tok, "../shared/data/wikitext-2-raw/wiki.test.raw", 2048, nwin)
s = get_scheme("w3g128")
orig = {}
for i in range(first, last + 1):
    for n, m in layers[i].named_modules():
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in kinds:
            orig[(i, n)] = m.weight.detach().clone()
protect = {}
hess = {}
if "protect" in variants or "output" in variants or "hblock" in variants:
    sq = {}

    def stat(key):
        def hook(_m, args, _y):
            x = args[0].float()
            sq[key] = ((x[:, 0] ** 2).mean(0), (x[:, 1:] ** 2).reshape(-1, x.shape[-1]).mean(0))
            flat = x.reshape(-1, x.shape[-1])
            hess[key] = 2 * flat.T @ flat / len(flat)
        return hook
    hs = [layers[i].get_submodule(n).register_forward_hook(stat((i, n))) for (i, n) in orig]
    with torch.no_grad():
        fp(calibration_samples(tok, "../shared/data/calibration", 8, 512, 1), use_cache=False)
    for h in hs:
        h.remove()
    protect = {key: sink_columns(*v) for key, v in sq.items()}
    energy = {key: (f + 511 * r) / 512 for key, (f, r) in sq.items()}
    print("protected columns:", {f"{i}.{n}": int(m.sum()) for (i, n), m in protect.items() if m.any()})
gated = {}
if "gated" in variants:
    def gstat(i):
        def hook(mlp, args, _y):
            g, u = gated_product_weights(args[0], mlp.gate_proj.weight, mlp.up_proj.weight, mlp.act_fn)
            gated[(i, "mlp.gate_proj")], gated[(i, "mlp.up_proj")] = g, u
        return hook
    hs = [layers[i].mlp.register_forward_hook(gstat(i)) for i in range(first, last + 1)]
    with torch.no_grad():
        fp(calibration_samples(tok, "../shared/data/calibration", 8, 512, 1), use_cache=False)
    for h in hs:
        h.remove()


def hblock_clip_params(w, H, grid=100, maxshrink=0.8):
    """The range search's grid scored by each group's output error dw^T H_gg dw (H's block of the group: the
    correlations between its inputs included), instead of a sum over single weights."""
    n, k = w.shape
    g, ng = s.group_len(k), s.groups(k)
    wg = w.reshape(n, ng, g)
    idx = torch.arange(ng)
    hb = H.reshape(ng, g, ng, g)[idx, :, idx]
    wmin, wmax = group_minmax(w, s)
    best_s, best_z = params_from_range(wmin, wmax, s)
    best = torch.full_like(best_s, float("inf"))
    for i in range(int(maxshrink * grid) + 1):
        sc, z = params_from_range(wmin * (1 - i / grid), wmax * (1 - i / grid), s)
        d = (torch.clamp(torch.round(wg / sc[..., None]) + z[..., None], 0, s.maxq) - z[..., None]) * sc[..., None] - wg
        err = (torch.einsum("ngi,gij->ngj", d, hb) * d).sum(-1)
        better = err < best
        best, best_s, best_z = torch.where(better, err, best), torch.where(better, sc, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def quantized(w, search, key=None):
    if search == "protect":
        sc, z = mse_clip_params(w, s, protect=protect[key])
    elif search == "hblock":
        sc, z = hblock_clip_params(w, hess[key])
    elif search == "gated":
        sc, z = mse_clip_params(w, s, norm=2.0, col_weight=gated[key])
    elif search == "output":
        sc, z = mse_clip_params(w, s, norm=2.0, col_weight=energy[key])
    else:
        sc, z = mse_clip_params(w, s) if search else params_from_range(*group_minmax(w, s), s)
    se, ze = expand_groups(sc, s, w.shape[1]), expand_groups(z, s, w.shape[1])
    return (quantize_int(w, se, ze, s.maxq) - ze) * se


def run(tag, search, only=None):
    t0 = time.time()
    with torch.no_grad():
        for (i, n), w in orig.items():
            keep = search is None or (only is not None and not n.endswith(only))
            layers[i].get_submodule(n).weight.copy_(w if keep else quantized(w, search, (i, n)))
    sink = []
    hooks = [b.register_forward_hook(lambda _m, _a, y, i=i: sink.append((y[0] if isinstance(y, tuple) else y)[:, 0]
                                                                         .detach().clone()))
             for i, b in enumerate(layers)]
    nll = []
    with torch.no_grad():
        for j in range(len(ids)):
            lp = fp(ids[j:j + 1], use_cache=False).logits.float().log_softmax(-1)
            nll.append(-lp[0, :-1].gather(-1, ids[j, 1:, None]).squeeze(-1))
    for h in hooks:
        h.remove()
    nll = torch.stack(nll)
    per_block = torch.stack([torch.cat(sink[k::len(layers)]) for k in range(len(layers))])  # [blocks, windows, hidden]
    return tag, per_block, float(nll[:, :511].mean()), float(nll[:, 511:].mean()), time.time() - t0


where = f"{'+'.join(kinds)} of blocks {first}-{last}"
named = {"fp": ("fp", None), "minmax": (f"RTN W3 g128 min-max, {where}", False),
         "search": (f"RTN W3 g128 range search, {where}", True),
         "protect": (f"RTN W3 g128 range search, sink columns protected, {where}", "protect"),
         "output": (f"RTN W3 g128 range search weighted by E[x^2], {where}", "output"),
         "hblock": (f"RTN W3 g128 range search scored on dw^T H dw per group, {where}", "hblock"),
         "gated": (f"RTN W3 g128 range search scored on the MLP product, {where}", "gated")}


def variant(v):
    """`name` for every kind given, `name@kind` (e.g. search@down_proj) for that kind alone (one fp reference)."""
    name, _, only = v.partition("@")
    tag, search = named[name]
    return (tag.replace(where, f"{only} of blocks {first}-{last}") if only else tag), search, only or None


res = [run(*variant(v)) for v in ["fp"] + [v for v in variants if v != "fp"]]
ref = res[0][1]
print(f"# {model_name}: only {'+'.join(kinds)} of blocks {first}-{last} quantized; WikiText-2 test, {nwin} x 2048\n")
print("| variant | NLL pos 1-511 | NLL pos 512-2047 | sink max |h| after blocks 3 / 12 / last | sink rel. error after "
      "blocks 3 / 12 / last | s |")
print("|---|---|---|---|---|---|")
L = ref.shape[0] - 1
for tag, pb, a, b, t in res:
    mx = [float(pb[k].abs().amax(-1).mean()) for k in (3, 12, L)]
    er = [float(((pb[k] - ref[k]).pow(2).sum() / ref[k].pow(2).sum())) for k in (3, 12, L)]
    print(f"| {tag} | {a:.4f} | {b:.4f} | {' / '.join(f'{x:.0f}' for x in mx)} | {' / '.join(f'{x:.4f}' for x in er)} | {t:.0f} |")
