"""Learnable weight clipping (LWC), OmniQuant section 3.2 (Shao et al., "OmniQuant: Omnidirectionally Calibrated
Quantization for Large Language Models", arXiv 2308.13137, eq. 2).

Per group of G consecutive inputs along K, two learnable strengths gamma (upper) and beta (lower) clip the group's
range before min-max quantization: `max' = sigmoid(gamma) * max(W_g)`, `min' = sigmoid(beta) * min(W_g)`,
`s = (max' - min') / (2^b - 1)`, `z = round(-min' / s)`, `q = clamp(round(W / s) + z, 0, 2^b - 1)`.
Symmetric schemes learn one strength on the group's absolute maximum and keep z = 2^(b-1).

The forward pass computes exactly what `edgequant.quantizer.quantize_weight(w, scheme, scale, zero)` computes with
the same scale and zero (same operations, same order), so a trained LWC folds into the checkpoint's integers with no
difference: the scale is rounded to fp16 and the zero point to an integer *inside* the forward pass, with
straight-through gradients for every rounding.
"""
from __future__ import annotations

import torch
from torch import nn

from ...quantizer import expand_groups, group_minmax, params_from_range, round_ste
from ...schemes import QuantScheme

DEFAULT_INIT = 4.0   # sigmoid(4) ~ 0.982: start close to plain min-max, as the paper's scripts do


class LWC(nn.Module):
    """Clipping strengths of one linear's weight [N, K] and its differentiable fake quantizer.

    `learn=False` fixes the clipping at none (sigmoid = 1): plain min-max round-to-nearest, for LET-only training.
    """

    def __init__(self, n: int, k: int, scheme: QuantScheme, init: float = DEFAULT_INIT, learn: bool = True):
        super().__init__()
        self.scheme, self.k, self.learn = scheme, k, learn
        ng = scheme.groups(k)
        if learn:
            self.upper = nn.Parameter(torch.full((n, ng), float(init)))
            # symmetric schemes clip |W| with one strength: a separate lower bound would make the grid asymmetric
            self.lower = None if scheme.sym else nn.Parameter(torch.full((n, ng), float(init)))

    def clip_factors(self):
        if not self.learn:
            return None, None
        up = torch.sigmoid(self.upper)
        return up, (torch.sigmoid(self.lower) if self.lower is not None else up)

    def params(self, w: torch.Tensor):
        """(scale, zero) [N, n_groups] of the clipped groups of w: `quantizer.params_from_range` of the clipped ranges
        (scale fp16-representable, zero an integer in [0, 2^b - 1], both with straight-through gradients)."""
        wmin, wmax = group_minmax(w, self.scheme)   # differentiable: LET's scales feel the clipping through it
        up, low = self.clip_factors()
        if up is not None:
            wmax, wmin = wmax * up, wmin * low
        return params_from_range(wmin, wmax, self.scheme)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The dequantized weight w_hat = (q - z) * s, differentiable (STE) w.r.t. w and the clipping strengths."""
        scale, zero = self.params(w)
        se = expand_groups(scale, self.scheme, self.k)
        ze = expand_groups(zero, self.scheme, self.k)
        q = torch.clamp(round_ste(w / se) + ze, 0, self.scheme.maxq)
        return (q - ze) * se


@torch.no_grad()
def search_clip_init(lwc: "LWC", w: torch.Tensor, col_weight: torch.Tensor | None = None,
                     grid=tuple(1 - 0.02 * i for i in range(21)), none_logit: float = 6.0):
    """Set `lwc`'s strengths from a per-group grid search of the clipping ratio that minimises the (input-weighted)
    squared weight error, sum_j E[x_j^2] (w_ij - w_hat_ij)^2: a cheap activation-aware starting point (as AWQ's and
    OWQ's clip searches) that a short CPU training run can refine. Not in the paper, whose init is a constant 4.0.
    A ratio of 1 (no clipping) maps to `none_logit` (sigmoid ~ 0.9975) so that training can still move it."""
    if not lwc.learn:
        return
    n, k = w.shape
    s = lwc.scheme
    cw = torch.ones(k, device=w.device) if col_weight is None else col_weight.to(w.device).float()
    best_err = torch.full((n, s.groups(k)), float("inf"), device=w.device)
    best = torch.ones_like(best_err)
    g = s.group_len(k)
    ng = s.groups(k)
    pad = ng * g - k
    for r in grid:
        lwc.upper.fill_(torch.logit(torch.tensor(min(r, 0.9999))).item())
        if lwc.lower is not None:
            lwc.lower.fill_(lwc.upper[0, 0].item())
        e = (w - lwc(w)) ** 2 * cw
        if pad:
            e = torch.cat([e, e.new_zeros(n, pad)], dim=1)
        e = e.reshape(n, ng, g).sum(-1)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    logit = torch.where(best >= 1, torch.full_like(best, none_logit), torch.logit(best.clamp(max=0.9999)))
    lwc.upper.copy_(logit)
    if lwc.lower is not None:
        lwc.lower.copy_(logit)
