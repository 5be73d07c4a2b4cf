"""A bit budget across layers (`--method gptq --target-bits 3.25`): each linear gets 2, 3 or 4 bits so that the mean
bits per weight over the block linears stays within the budget and the summed sensitivity is smallest.

Sensitivity of a linear at b bits is the Hessian-weighted (output) error of rounding it to b bits,
tr(dW H dW^T) with dW = W - RTN_b(W) and H = 2/n sum x x^T over the calibration tokens (the GPTQ/OBQ objective,
arXiv 2210.17323; the same weighting that HAWQ-V2-style mixed-precision allocation uses, arXiv 1911.03852). H comes
from one layer-wise pass over the full-precision model (`calibrate_layerwise`, weights restored afterwards); GPTQ
then quantizes each linear at its chosen width. Linears that export fuses into one kernel (q/k/v, gate/up: the
family's `export_fusions`) are chosen together, since one kernel has one scheme. The choice is a multiple-choice
knapsack, solved greedily on each group's lower convex hull of (bits, error): start every group at the lowest
width and take upgrades in order of error saved per bit spent while the budget allows. The budget counts the integer
bits (b per weight; scales and zero points are the scheme's group overhead, shown by `edgequant inspect`).
`--budget-metric relative` divides each group's error by its output energy tr(W H W^T) first: the measured error
grows with the activations, which grow with depth, so it starved the first blocks, where an error travels through
every later block (SmolLM2, 3.25 bits: 2 bits on gate/up of blocks 0-3 and block 0's attention, 4 on most of the
last blocks; on rotated qwen2 every down_proj, whose input act(gate) * up is small, at 2 bits; RTN of SmolLM2's
choice was worse than uniform W3, the relative choice better; `benchmarks/budget_allocation.py`,
`benchmarks/results/budget-allocation-issue11-acc7-*.md`). The choice is recorded as per-module overrides in the
checkpoint (`quantization_config.overrides`). OWQ takes the same allocation under its fp16 columns (`--method owq
--width-budget 3.15 --target-bits 3.1`: a 3.25-bit budget, 0.1 of it spent on the columns, whose count per linear
kind follows OWQ's rule over the base --bits).
"""
from __future__ import annotations

from dataclasses import dataclass

from .calibrate.configs import BudgetOptions
from .errors import EdgequantError
from .options import opt

OPTIONS = (2, 3, 4)


@dataclass
class GPTQConfig(BudgetOptions):
    """GPTQ: an optional bit budget across layers. The command line shares `--target-bits` with OWQ (there: the fp16
    columns' share), so the help below speaks for both."""
    target_bits: float | None = opt(None, "bits per weight budget: GPTQ: mean width of the linears, 2 to 4 (e.g. "
                                          "3.25: each linear gets 2, 3 or 4 bits by its Hessian-weighted error; --bits "
                                          "then only names the checkpoint's base scheme, the width of the linears it "
                                          "does not list as overrides); OWQ: "
                                          "with its fp16 columns (e.g. 3.1).", "float", lo=0, lo_open=True)

    def __post_init__(self):
        super().__post_init__()
        check_width_budget(self.target_bits, "--target-bits", "--method gptq")
        self.refuse_unless(self.target_bits is not None, ("budget_metric",), "--target-bits")


def check_width_budget(target: float | None, option: str, method: str) -> None:
    """A mean width the allocation can meet: between the narrowest and the widest option."""
    if target is not None and not OPTIONS[0] <= target <= OPTIONS[-1]:
        raise EdgequantError(f"{option} {target} must lie between {OPTIONS[0]} and {OPTIONS[-1]} for {method} (each "
                             "linear takes 2, 3 or 4 bits)")


def allocate(errors: dict[str, dict[int, float]], sizes: dict[str, int], target: float) -> dict[str, int]:
    """Bits per group minimising sum(errors[g][bits]) subject to sum(sizes[g] * bits) <= target * sum(sizes)."""
    budget = target * sum(sizes.values())
    choice = {g: min(errors[g]) for g in errors}
    spent = sum(sizes[g] * b for g, b in choice.items())
    if spent > budget + 1e-9:
        raise EdgequantError(f"--target-bits {target} is below {min(OPTIONS)}, the narrowest width")
    while True:
        best = None
        for g, b in choice.items():
            for nb in (x for x in errors[g] if x > b):   # any wider option: skips non-convex points
                cost = sizes[g] * (nb - b)
                gain = (errors[g][b] - errors[g][nb]) / cost
                if spent + cost <= budget + 1e-9 and (best is None or gain > best[0]):
                    best = (gain, g, nb, cost)
        if best is None or best[0] <= 0:
            return choice
        _, g, nb, cost = best
        choice[g] = nb
        spent += cost


def sensitivities(model, samples, scheme, opts, progress: bool = True, metric: str = "output"):
    """({fusion group: {bits: Hessian-weighted RTN error}}, {group: weights}, {linear: group}) from one layer-wise
    pass; the model's weights are left as they were. `metric` "relative" divides each group's error by its output
    energy tr(W H W^T), so that groups of different depths, whose activations differ in scale, compare."""
    errors, energy, sizes, member = sensitivity_pass(model, samples, scheme, opts, progress)
    return scored(errors, energy, metric), sizes, member


def scored(errors: dict, energy: dict, metric: str) -> dict:
    """The errors the allocation minimises: as measured ("output") or relative to each group's output energy."""
    if metric == "output":
        return errors
    return {g: {b: e / max(energy[g], 1e-30) for b, e in per.items()} for g, per in errors.items()}


def sensitivity_pass(model, samples, scheme, opts, progress: bool = True):
    """The layer-wise pass: ({group: {bits: tr(dW H dW^T)}}, {group: tr(W H W^T)}, {group: weights},
    {linear: group})."""
    import torch

    from .calibrate.layerwise import calibrate_layerwise
    from .models import family_for
    from .quantizer import quantize_weight
    from .schemes import QuantScheme

    family = family_for(model.config.model_type)
    group_of = {m: e for e, ms in family.export_fusions.items() for m in ms} or {n: n for n in family.linear_names}
    orig = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    errors, sizes, member, energy = {}, {}, {}, {}

    def measure(name, lin, H):
        w = lin.weight.detach().float()
        rel = family.relative_name(name)
        g = name[: -len(rel)] + group_of[rel]
        member[name] = g
        sizes[g] = sizes.get(g, 0) + w.numel()
        out = errors.setdefault(g, {})
        for b in OPTIONS:
            d = w - quantize_weight(w, QuantScheme(b, scheme.group_size, scheme.sym)).dequantize()
            out[b] = out.get(b, 0.0) + float(((d @ H) * d).sum())
        energy[g] = energy.get(g, 0.0) + float(((w @ H) * w).sum())
        # later blocks see the full-precision outputs (an exact QuantizedWeight of this linear is not needed)
        return _Identity(lin.weight), {}

    try:
        calibrate_layerwise(model, samples, measure, opts.device, opts.batch_size, progress, desc="sensitivity",
                            skip_tokens=opts.skip_tokens)
    finally:
        with torch.no_grad():
            for n, m in model.named_modules():
                if n in orig:
                    m.weight.copy_(orig[n])
    return errors, energy, sizes, member


class _Identity:
    """Stands in for a QuantizedWeight in the sensitivity pass: dequantizes to the weight it was given."""

    def __init__(self, w):
        self.w = w.detach().clone()

    def dequantize(self):
        return self.w


def schemes_for_budget(model, samples, scheme, opts, target: float, progress: bool = True):
    """{linear name: QuantScheme} meeting the budget `target`, and a summary for the provenance."""
    from .schemes import QuantScheme
    errors, sizes, member = sensitivities(model, samples, scheme, opts, progress, opts.config.budget_metric)
    bits = allocate(errors, sizes, target)
    chosen = {name: QuantScheme(bits[g], scheme.group_size, scheme.sym) for name, g in member.items()}
    mean = sum(sizes[g] * b for g, b in bits.items()) / sum(sizes.values())
    counts = {b: sum(1 for s in chosen.values() if s.bits == b) for b in OPTIONS}
    return chosen, {"target_bits": target, "metric": opts.config.budget_metric, "mean_bits": round(mean, 4),
                    "linears_per_bits": counts,
                    "groups": {g: bits[g] for g in sorted(bits)}}
