"""Where a bit budget across layers puts its widths (`edgequant/budget.py`): for a named model, the 2/3/4-bit choice
of every fused linear group at a few mean widths, per linear kind and block, with the Hessian-weighted RTN errors
it was chosen from, scored as measured ("output") or relative to each group's output energy ("relative"). With
--eval N, each allocation is also applied by round-to-nearest (min-max groups, no calibration) and scored by WikiText-2
perplexity on the first N windows of 2048 tokens, beside uniform W3 and W4: a cheap CPU proxy for which metric places
the widths better. Diagnoses budget rows that lose to the uniform width (issue 11, acc7: OWQ under --width-budget
3.15 was worse than OWQ 3.1 alone on both models).

    python benchmarks/budget_allocation.py smollm2-135m --targets 3.05,3.15,3.25 --nsamples 32 --seqlen 256
    python benchmarks/budget_allocation.py qwen2.5-coder-0.5b --rotate --targets 3.15,3.25
    python benchmarks/budget_allocation.py smollm2-135m --targets 3.25 --metrics output,relative --eval 2

The sensitivity pass runs once per model (CPU by default); the allocation at each target is the knapsack of
`budget.allocate`. Prints a table and writes it under benchmarks/results/ (--out).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a named model (smollm2-135m, qwen2.5-coder-0.5b) or a model folder")
    ap.add_argument("--targets", default="3.05,3.15,3.25", help="comma-separated mean widths")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--rotate", action="store_true")
    ap.add_argument("--calib", default=str(SHARED / "calibration"))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--metrics", default="output", help="comma-separated: output, relative")
    ap.add_argument("--eval", type=int, default=0, help="RTN perplexity of each allocation on this many windows")
    ap.add_argument("--data", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch
    from edgequant.budget import allocate, scored, sensitivity_pass
    from edgequant.data import calibration_samples
    from edgequant.loading import load_model
    from edgequant.methods import CalibOptions
    from edgequant.schemes import QuantScheme

    torch.manual_seed(args.seed)
    t0 = time.time()
    model, tok = load_model(args.model)
    if args.rotate:
        from edgequant.rotate import rotate_model
        rotate_model(model, args.seed)
    opts = CalibOptions(calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                        device=args.device)
    samples = calibration_samples(tok, args.calib, args.nsamples, args.seqlen, args.seed)
    scheme = QuantScheme(args.bits, args.group_size, False)
    raw, energy, sizes, member = sensitivity_pass(model, samples, scheme, opts, progress=False)
    took = time.time() - t0
    # a group name is "model.layers.N.<kind>"; kinds in the family's order
    def split(g):
        _, _, rest = g.partition("layers.")
        n, _, kind = rest.partition(".")
        return int(n), kind
    kinds = list(dict.fromkeys(split(g)[1] for g in sorted(raw, key=lambda g: split(g))))
    blocks = sorted({split(g)[0] for g in raw})
    targets = [float(t) for t in args.targets.split(",")]
    metrics = args.metrics.split(",")
    lines = [f"# Bit budget allocation: {args.model}{' rotated' if args.rotate else ''}, base W{args.bits} "
             f"g{args.group_size}\n",
             f"date {datetime.date.today()}, {platform.machine()}, load {os.getloadavg()[0]:.1f}, calibration "
             f"{os.path.relpath(args.calib, HERE.parent)} {args.nsamples} x {args.seqlen} seed {args.seed}, "
             f"sensitivity pass {took:.0f} s\n",
             f"command: python benchmarks/budget_allocation.py {args.model}{' --rotate' if args.rotate else ''} "
             f"--targets {args.targets} --metrics {args.metrics} --nsamples {args.nsamples} --seqlen {args.seqlen}"
             + (f" --eval {args.eval}" if args.eval else "") + "\n"]
    total = sum(sizes.values())
    evals = []
    rtn = _RTN(model, member, args.group_size, args.data, tok, args.eval, args.device) if args.eval else None
    for metric in metrics:
        errors = scored(raw, energy, metric)
        for t in targets:
            bits = allocate(errors, sizes, t)
            share = defaultdict(float)
            for g, b in bits.items():
                share[b] += sizes[g] / total
            lines.append(f"\n## {metric}, mean width {t}: share of weights at 2/3/4 bits "
                         + " / ".join(f"{share[b]:.3f}" for b in (2, 3, 4)) + "\n")
            lines.append("| block | " + " | ".join(kinds) + " |")
            lines.append("|---|" + "---|" * len(kinds))
            for n in blocks:
                cells = [str(bits[g]) for k in kinds for g in [next(g for g in bits if split(g) == (n, k))]]
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
            if rtn:
                evals.append((f"RTN, {metric} allocation, mean width {t}", rtn.ppl(bits)))
    if rtn:
        for b in (args.bits, args.bits + 1):
            evals.append((f"RTN, uniform W{b}", rtn.ppl({g: b for g in sizes})))
        lines.append(f"\n## RTN perplexity of each allocation, WikiText-2 test, first {args.eval} windows of 2048\n")
        lines.append("| setting | ppl |")
        lines.append("|---|---|")
        lines += [f"| {name} | {p:.2f} |" for name, p in evals]
    errors = raw
    lines.append("\n## Hessian-weighted RTN error tr(dW H dW^T) per group at 2 / 3 / 4 bits, summed over blocks\n")
    lines.append("| kind | weights per block | 2 bits | 3 bits | 4 bits | 2->3 saved per bit | 3->4 saved per bit |")
    lines.append("|---|---|---|---|---|---|---|")
    for k in kinds:
        gs = [g for g in errors if split(g)[1] == k]
        e = {b: sum(errors[g][b] for g in gs) for b in (2, 3, 4)}
        size = sizes[gs[0]]
        n = sum(sizes[g] for g in gs)
        lines.append(f"| {k} | {size} | {e[2]:.4g} | {e[3]:.4g} | {e[4]:.4g} | {(e[2] - e[3]) / n:.3g} | "
                     f"{(e[3] - e[4]) / n:.3g} |")
    text = "\n".join(lines) + "\n"
    print(text)
    tag = Path(args.model).name + ("-rot" if args.rotate else "")
    out = Path(args.out) if args.out else HERE / "results" / f"budget-allocation-issue11-acc7-{tag}.md"
    out.write_text(text)


class _RTN:
    """Round-to-nearest at per-group widths on a copy of the weights, restored after each evaluation."""

    def __init__(self, model, member, group_size, data, tok, windows, device):
        import torch
        from edgequant.data import eval_windows
        self.model, self.member, self.group_size, self.device = model, member, group_size, device
        self.windows = eval_windows(tok, data, 2048, windows)
        self.lin = {n: m for n, m in model.named_modules() if n in member}
        self.orig = {n: m.weight.detach().clone() for n, m in self.lin.items()}
        self.torch = torch

    def ppl(self, bits: dict) -> float:
        from edgequant.perplexity import evaluate
        from edgequant.quantizer import quantize_weight
        from edgequant.schemes import QuantScheme
        with self.torch.no_grad():
            for n, m in self.lin.items():
                s = QuantScheme(bits[self.member[n]], self.group_size, False)
                m.weight.copy_(quantize_weight(self.orig[n].float(), s).dequantize().to(m.weight.dtype))
            try:
                return evaluate(self.model, self.windows, device=self.device, progress=False).perplexity
            finally:
                for n, m in self.lin.items():
                    m.weight.copy_(self.orig[n])


if __name__ == "__main__":
    main()
