"""Where quantization error grows: the hidden state after every block of each checkpoint against the full-precision
model's, on calibration windows drawn with another seed than the calibration's (held out), plus the final
next-token KL divergence. A linear's own output error (`edgequant.json`) is measured on its own inputs; this follows
the error through the network, block by block, as the evaluation sees it.

    python benchmarks/error_by_block.py --model qwen2.5-coder-0.5b --checkpoints GPTQ_DIR,OWQ_DIR
    python benchmarks/error_by_block.py ... --swap OWQ_DIR:GPTQ_DIR:q_proj,k_proj   # OWQ with GPTQ's q/k linears

Per block and checkpoint it prints the relative error ||h_q - h||^2 / ||h||^2 of the stream over every token but
each window's first (the attention sink, whose massive activation would own the sum), the same for the first token
alone, and the "local" error: the checkpoint's block fed the fp stream, i.e. what that block adds by itself.
`--swap A:B:kinds[:first-last]` adds a hybrid: checkpoint A with the named linears (relative names' last parts, or
`all`) taken from B, in every block or only in blocks first..last (e.g. `OWQ:GPTQ:all:12-23`), to find the blocks and
linears where A's choices lose.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"


def block_outputs(model, layers, ids, batch_size, device="cpu"):
    """[n_blocks] list of the stream after each block, [n, L, hidden] each (host, fp32), and the logits."""
    import torch
    outs = [[] for _ in layers]
    hooks = [blk.register_forward_hook(lambda _m, _a, y, i=i: outs[i].append(
        (y[0] if isinstance(y, (tuple, list)) else y).detach().float().cpu())) for i, blk in enumerate(layers)]
    logits = []
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch_size):
                logits.append(model(ids[i:i + batch_size].to(device), use_cache=False).logits.float().log_softmax(-1))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(o) for o in outs], torch.cat(logits)


def local_errors(model, layers, fp_states, first_inputs, kwargs_of, batch_size, device="cpu"):
    """Each block of `model` fed the fp stream: the relative error it adds by itself (all but the first token)."""
    import torch
    from edgequant.calibrate.blocks import _move
    errs = []
    with torch.no_grad():
        for i, blk in enumerate(layers):
            x = first_inputs if i == 0 else fp_states[i - 1]
            ys = []
            for j in range(0, len(x), batch_size):
                y = blk(x[j:j + batch_size].to(device), **_move(kwargs_of(i), device))
                ys.append((y[0] if isinstance(y, (tuple, list)) else y).float().cpu())
            errs.append(rel(torch.cat(ys), fp_states[i])[0])
    return errs


def rel(a, b):
    """(relative squared error over tokens 1.., the same for token 0)."""
    d = (a - b).pow(2)
    r = b.pow(2)
    return float(d[:, 1:].sum() / r[:, 1:].sum()), float(d[:, :1].sum() / r[:, :1].sum())


def parse_swap(spec: str):
    """`A:B:kinds[:first-last]` -> (A, B, [kinds], list of block indices or None for every block)."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or not all(parts[:3]):
        raise SystemExit(f"error: --swap {spec!r}: use A:B:kind,kind or A:B:kind,kind:first-last (e.g. OWQ:GPTQ:all:0-11)")
    blocks = None
    if len(parts) == 4:
        lo, _, hi = parts[3].partition("-")
        if not (lo.isdigit() and (hi or lo).isdigit() and int(lo) <= int(hi or lo)):
            raise SystemExit(f"error: --swap {spec!r}: blocks must be first-last, e.g. 12-23")
        blocks = list(range(int(lo), int(hi or lo) + 1))
    return parts[0], parts[1], parts[2].split(","), blocks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the full-precision model (named model or folder)")
    ap.add_argument("--checkpoints", required=True, help="comma-separated checkpoint folders")
    ap.add_argument("--swap", action="append", default=[], help="A:B:kind,kind[:first-last] hybrid (repeatable)")
    ap.add_argument("--calib", default=str(SHARED / "calibration"))
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1, help="window seed; the calibration used 0")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--local", action="store_true", help="also each block's own error on the fp stream")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = ap.parse_args(argv)

    import torch
    from edgequant.artifact import load_quantized_model
    from edgequant.data import calibration_samples
    from edgequant.loading import load_model
    from edgequant.models import family_for

    fp, tok = load_model(args.model)
    fp.eval().to(args.device)
    family = family_for(fp.config.model_type)
    ids = calibration_samples(tok, args.calib, args.nsamples, args.seqlen, args.seed)
    fp_layers = fp.get_submodule(family.layers_path)
    fp_states, fp_logp = block_outputs(fp, fp_layers, ids, args.batch_size, args.device)

    cks = [c for c in args.checkpoints.split(",") if c]
    models = {}
    for c in cks:
        models[Path(c).name] = load_quantized_model(c, device=args.device)[0].eval()
    donors = {}
    for spec in args.swap:
        a, b, kinds, blocks = parse_swap(spec)
        m = load_quantized_model(a, device=args.device)[0].eval()
        if b not in donors:   # one copy of each donor, however many hybrids take from it
            donors[b] = load_quantized_model(b, device=args.device)[0]
        donor = donors[b]
        layers = m.get_submodule(family.layers_path)
        if blocks and blocks[-1] >= len(layers):
            raise SystemExit(f"error: --swap {spec!r}: the model has blocks 0-{len(layers) - 1}")
        with torch.no_grad():
            for i in blocks or range(len(layers)):
                for name, mod in layers[i].named_modules():
                    if isinstance(mod, torch.nn.Linear) and (kinds == ["all"] or name.rsplit(".", 1)[-1] in kinds):
                        mod.weight.copy_(donor.get_submodule(family.layers_path)[i].get_submodule(name).weight)
        where = "" if blocks is None else f" in blocks {blocks[0]}-{blocks[-1]}"
        models[f"{Path(a).name} with {Path(b).name}'s {'+'.join(kinds)}{where}"] = m

    donors.clear()
    first_inputs, kwargs_of = None, None
    if args.local:
        from edgequant.calibrate.blocks import capture_first_block_inputs
        inp = capture_first_block_inputs(fp, fp_layers, ids, args.device)
        first_inputs = inp.hidden
        kwargs_of = inp.use_layer

    rows = []
    for tag, m in models.items():
        layers = m.get_submodule(family.layers_path)
        states, logp = block_outputs(m, layers, ids, args.batch_size, args.device)
        kl = float(torch.nn.functional.kl_div(logp, fp_logp, log_target=True, reduction="sum") / logp[..., 0].numel())
        nll = float(-logp[:, :-1].gather(-1, ids[:, 1:, None].to(logp.device)).mean())
        loc = local_errors(m, layers, fp_states, first_inputs, kwargs_of, args.batch_size, args.device) if args.local else None
        for i, (s, f) in enumerate(zip(states, fp_states)):
            e, e0 = rel(s, f)
            rows.append((tag, i, e, e0, loc[i] if loc else None))
        rows.append((tag, "KL / NLL", kl, nll, None))
        del m

    fp_nll = float(-fp_logp[:, :-1].gather(-1, ids[:, 1:, None].to(logp.device)).mean())
    lines = [f"# Error by block: {args.model}, {args.nsamples} x {args.seqlen} calibration windows, seed {args.seed}",
             "", f"fp NLL {fp_nll:.4f}; command: python benchmarks/error_by_block.py {' '.join(argv or sys.argv[1:])}",
             "", "| checkpoint | block | rel. error, tokens 1.. | rel. error, token 0 | local (own) error |",
             "|---|---|---|---|---|"]
    for tag, i, e, e0, lo in rows:
        lines.append(f"| {tag} | {i} | {e:.4g} | {e0:.4g} | {'-' if lo is None else f'{lo:.4g}'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
