"""OWQ: outlier-aware weight quantization (Lee et al., "OWQ: Outlier-Aware Weight Quantization for Efficient
Fine-Tuning and Inference of Large Language Models", arXiv 2306.02272, AAAI 2024).

A few input columns of each linear are "weak": quantizing them hurts the output most. Their sensitivity is
H_jj * ||W[:, j] - Q(W)[:, j]||^2 with H = 2/n sum x x^T of the calibration inputs; the top-k stay in fp16 and GPTQ
quantizes the rest, its error compensation flowing into the weak columns before they are frozen. The number of weak
columns per linear follows the paper's budget rule: a target of b_t bits over a b-bit base gives each linear
round(K * r * ratio) columns (rounded up to even) with r = 12 / (16 - b) * (b_t - b) / (number of linear kinds), where
`ratio` is the family's per-kind share (LLaMA: 1 for q/k/v/o, 0.375 for gate/up/down). A linear stored fused (Phi-3's
qkv_proj) counts as its parts: its columns serve every part's rows, so it gets what each part would, and a fused
family spends the same budget as its unfused twin. Quantizer parameters are tuned by a clipping grid search (the
paper's "mse" tuning, or the same grid on the diag(H)-weighted error). This module is pure math; `methods.py` drives
it block by block.

The search (either metric) scores an error in which each window's first token, the attention sink of models without
a BOS token such as qwen2, is one token of `seqlen`. On Qwen2.5-Coder-0.5B it clipped the early MLP weights that
build the sink's massive activation: the sink's hidden state drifted 4x further from fp than with min-max groups,
and WikiText perplexity lost (W3 g128: 43.80 against 38.62 with min-max groups) although every linear's output
error fell (`benchmarks/results/quality-issue11-acc4.md`). `sink_guarded` keeps the searched ranges of a linear only where
they do not raise the first token's output error above min-max groups' (opt-in: on qwen's first blocks it reverted
only the down_proj that builds the massive activation; rotated qwen W3: 39.43 against 36.41 with min-max groups).
`sink_columns` + `mse_clip_params(protect=)` (`--sink-protect`) act inside the search instead: a group may shrink
its range only as far as it still holds every weight of an input that the sink owns (the first token's mean square
there `SINK_RATIO` times the other tokens'), so the search keeps its gain on the rest of the group and the model.
Measured (`benchmarks/results/quality-issue11-acc5-cuda.md`), it does not recover qwen's loss: OWQ 3.1 47.55 (43.80
unprotected), rotated 37.40 (min-max groups 36.41); on CPU it restored most of the sink's state but none of the NLL
that the search costs, so the sink is not where the search loses on qwen: its early up_proj is (searched alone
+0.063 NLL, min-max +0.002; `benchmarks/results/sink-clip-issue11-acc5-cpu.md`). Opt-in; its one gain is SmolLM2
W4 g128 rotated + tuned (22.39 against 22.46 unprotected).

up_proj's output is multiplied by act(gate) channel by channel, so a per-linear score cannot see which of its errors
pass. `clip_search("product")` with `gated_product_weights` scores gate's and up's candidates on the MLP's output
instead. On qwen's early up_proj (RTN) it recovers a third of the search's cost and so does a score with the
inputs' correlations (dW^T H dW per group), while min-max groups stay far ahead; at GPTQ level on qwen it is worse
than the paper's metric (OWQ 3.1: 45.57 vs 43.80). `--no-clip-up` (up min-max, the rest searched) recovers half of
qwen's loss (41.32; min-max everywhere 38.62) and costs SmolLM2 0.9 (31.52 vs 30.65), both opt-in
(`benchmarks/results/quality-issue11-acc6-cuda.md`). On CPU (RTN, qwen's first blocks one kind at a time) v's
search costs as much as up's, o's wins by far (`sink-clip-kinds-issue11-acc6-cpu.md`): `--no-clip-v`, opt-in.
"""
from __future__ import annotations

import torch

from ..errors import EdgequantError
from ..models import Family
from ..quantizer import expand_groups, mse_clip_params, params_from_range, group_minmax, quantize_int
from ..schemes import QuantScheme


def weak_column_counts(family: Family, in_features: dict[str, int], bits: int, target_bits: float,
                       option: str = "--target-bits") -> dict[str, int]:
    """k per linear kind (e.g. "self_attn.q_proj") for a target of `target_bits` bits per weight over `bits`."""
    if not bits < target_bits < 16:
        raise EdgequantError(f"{option} {target_bits} must lie between --bits {bits} and 16 (e.g. {bits}.01 "
                             f"or {bits}.1)")
    ratios = family.linear_ratio
    r = 12 / (16 - bits) * (target_bits - bits) / sum(len(lin.out) for lin in family.linears)
    out = {}
    for kind, ratio in ratios.items():
        k = round(in_features[kind] * r * ratio)
        k += k % 2   # even counts, as the paper's kernels want
        out[kind] = min(k, in_features[kind])
    return out


def column_sensitivity(weight: torch.Tensor, h_diag: torch.Tensor, scheme: QuantScheme, tuned: bool = True,
                       metric: str = "weight", protect: torch.Tensor | None = None,
                       search_weight: torch.Tensor | None = None):
    """H_jj * ||W[:, j] - Q(W)[:, j]||^2 for every input column j, Q the scheme's (MSE-tuned) quantizer on all of W
    (`protect`: columns the search may not clip, as `clip_search`'s; `search_weight`: its error weights where they
    are not diag(H), e.g. `gated_product_weights`)."""
    from .gptq import one_cpu_thread
    w = weight.float()
    k = w.shape[1]
    if tuned:
        with one_cpu_thread(w.device):
            s, z = clip_search(metric)(w, scheme, h_diag if search_weight is None else search_weight, protect)
    else:
        s, z = params_from_range(*group_minmax(w, scheme), scheme)
    se, ze = expand_groups(s, scheme, k), expand_groups(z, scheme, k)
    wq = (quantize_int(w, se, ze, scheme.maxq) - ze) * se
    return h_diag.float() * ((w - wq) ** 2).sum(0)


def select_weak_columns(weight: torch.Tensor, h_diag: torch.Tensor, scheme: QuantScheme, k: int,
                        tuned: bool = True, metric: str = "weight", protect: torch.Tensor | None = None,
                        search_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices of the k most sensitive input columns."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    sens = column_sensitivity(weight, h_diag, scheme, tuned, metric, protect, search_weight)
    return torch.sort(torch.topk(sens, k).indices).values.cpu()


def clip_search(metric: str):
    """The GPTQ `clip_search(w, scheme, h_diag, protect)` hook. "weight": the paper's grid on sum |w - q(w)|^2.4 of
    the raw weights. "output": squared errors weighted by diag(H), so a group's range follows the output error it
    causes (a clipped weight on a quiet input costs little, one on a loud input much). "product": squared errors
    weighted per weight by the third argument, [N, K] `gated_product_weights` (the caller passes them instead of
    diag(H), for a gated MLP's gate and up only). Either way no weight of a `protect`ed column is clipped
    (`sink_columns`)."""
    if metric == "weight":
        return lambda w, scheme, h_diag=None, protect=None: mse_clip_params(w, scheme, protect=protect)
    return lambda w, scheme, h_diag=None, protect=None: mse_clip_params(w, scheme, norm=2.0, col_weight=h_diag,
                                                                       protect=protect)


def gated_product_weights(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, act) -> tuple:
    """Sums over the tokens x [T, K] of a gated MLP act(x W_gate^T) * (x W_up^T): ([N, K] for gate, [N, K] for up),
    the weight each element's squared error carries in the product's output error under a diagonal approximation.
    An error dU_jk of up's weight moves output j by act(g_j) dU_jk x_k, so it weighs E[act(g_j)^2 x_k^2]; one of
    gate's, dG_jk, moves it by act'(g_j) u_j dG_jk x_k: E[(act'(g_j) u_j)^2 x_k^2]. The per-linear scores (raw |dW| or
    E[x_k^2]-weighted) miss that the gate decides, channel by channel and token by token, which errors pass."""
    x = x.reshape(-1, x.shape[-1]).float()
    with torch.enable_grad():
        g = (x @ w_gate.float().T).requires_grad_(True)
        a = act(g)
        (da,) = torch.autograd.grad(a.sum(), g)
    u = x @ w_up.float().T
    x2 = x ** 2
    return ((da * u) ** 2).T @ x2, (a.detach() ** 2).T @ x2


# A column is the sink's when each window's first token's mean square there is this many times the other tokens'.
# On Qwen2.5-Coder-0.5B (8 calibration windows of 512) residual channel 62 reaches 70-2000x in the inputs of blocks
# 2-5's q/gate/up projections and some down_proj inputs 1e3-1e9x, while most columns stay below 10x (o_proj's inputs,
# where the first token attends only to itself, reach 16-200x in a few dozen columns).
SINK_RATIO = 32.0


def sink_columns(first_sq: torch.Tensor, rest_sq: torch.Tensor, ratio: float = SINK_RATIO) -> torch.Tensor:
    """[K] bool: the inputs that carry the attention sink, from the mean square of each input over each window's
    first token (`first_sq`) and over the other tokens (`rest_sq`). Clipping their weights is cheap on the error the
    search scores (one token of `seqlen`) and costly to the model: qwen2's early gate projections clipped there
    moved the sink's state and lost 11% perplexity. `ratio` > 0."""
    return first_sq > ratio * rest_sq.clamp_min(torch.finfo(torch.float32).tiny)


def sink_guarded(weight: torch.Tensor, H: torch.Tensor, H_first: torch.Tensor, scheme: QuantScheme, searched: tuple,
                 **gptq_kw) -> tuple:
    """`searched` = (QuantizedWeight, loss) of GPTQ with searched ranges; returns (QuantizedWeight, loss, choice):
    those, or GPTQ with min-max groups (same `gptq_kw`: fp16 columns, act-order, damping) where the latter leaves
    the output error on H_first, the Hessian of each window's first token, lower."""
    from .gptq import gptq_quantize
    from .metrics import output_error
    minmax, loss = gptq_quantize(weight, H, scheme, **gptq_kw)
    if output_error(weight, minmax.dequantize(), H_first) < output_error(weight, searched[0].dequantize(), H_first):
        return minmax, loss, "min-max"
    return (*searched, "search")
