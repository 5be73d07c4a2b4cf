"""Group-wise uniform quantization math shared by every method (RTN, GPTQ, OmniQuant, OWQ).

`w_hat = (q - z) * s` per group of G consecutive inputs along K; q in [0, 2^b - 1]; s rounded to fp16 and z an integer
before use, so what a method computes is exactly what the checkpoint stores. The last group of a row may be shorter
than G (e.g. K = 576 with G = 128 leaves 64).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .schemes import QuantScheme

_MIN_SCALE = 1e-6


class _RoundSTE(torch.autograd.Function):
    """round() forward (bit-exact, unlike x + (round(x) - x).detach()), identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _Fp16STE(torch.autograd.Function):
    """Round to the nearest fp16 value (what the checkpoint stores), identity backward."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


round_ste = _RoundSTE.apply
fp16_ste = _Fp16STE.apply


def expand_groups(t: torch.Tensor, scheme: QuantScheme, k: int) -> torch.Tensor:
    """Repeat per-group values [N, n_groups] along K to [N, k] (ragged last group allowed)."""
    g = scheme.group_len(k)
    return torch.repeat_interleave(t, g, dim=1)[:, :k]


def params_from_range(wmin: torch.Tensor, wmax: torch.Tensor, scheme: QuantScheme):
    """Scale and zero point (both float tensors holding storable values) for ranges [wmin, wmax]. Differentiable:
    the roundings pass gradients straight through (OmniQuant's LWC learns its clipping through them)."""
    if scheme.sym:
        absmax = torch.maximum(wmin.abs(), wmax.abs())
        scale = 2 * absmax / scheme.maxq
        zero = torch.full_like(scale, float(scheme.sym_zero))
    else:
        wmin = torch.clamp(wmin, max=0)   # the grid must hold 0 exactly (zero point in range)
        wmax = torch.clamp(wmax, min=0)
        scale = (wmax - wmin) / scheme.maxq
        zero = None
    scale = fp16_ste(torch.clamp(scale, min=_MIN_SCALE))
    if zero is None:
        zero = torch.clamp(round_ste(-wmin / scale), 0, scheme.maxq)
    return scale, zero


def group_minmax(w: torch.Tensor, scheme: QuantScheme):
    """Per-group min and max of w [N, K] -> two [N, n_groups] tensors."""
    n, k = w.shape
    g = scheme.group_len(k)
    ng = scheme.groups(k)
    pad = ng * g - k
    if pad:  # pad the ragged group with its own first value so it changes neither min nor max
        w = torch.cat([w, w[:, (ng - 1) * g:(ng - 1) * g + 1].expand(n, pad)], dim=1)
    wg = w.reshape(n, ng, g)
    return wg.amin(-1), wg.amax(-1)


def quantize_int(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integers for w given scale/zero already expanded to w's shape."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


@dataclass
class QuantizedWeight:
    """Integer weights and their group parameters for one linear (before packing)."""
    q: torch.Tensor        # [N, K] integer-valued
    scale: torch.Tensor    # [N, n_groups] fp16-representable
    zero: torch.Tensor     # [N, n_groups] integer-valued
    scheme: QuantScheme
    outlier_idx: torch.Tensor | None = None      # [J] sorted input columns kept in fp16 (OWQ)
    outlier_weight: torch.Tensor | None = None   # [N, J]

    def dequantize(self) -> torch.Tensor:
        k = self.q.shape[1]
        w = (self.q.float() - expand_groups(self.zero.float(), self.scheme, k)) * \
            expand_groups(self.scale.float(), self.scheme, k)
        if self.outlier_idx is not None and len(self.outlier_idx):
            w[:, self.outlier_idx.long()] = self.outlier_weight.float()
        return w


def quantize_weight(w: torch.Tensor, scheme: QuantScheme, scale=None, zero=None) -> QuantizedWeight:
    """Round-to-nearest with min-max group parameters (or the given ones)."""
    w = w.float()
    if scale is None:
        scale, zero = params_from_range(*group_minmax(w, scheme), scheme)
    k = w.shape[1]
    q = quantize_int(w, expand_groups(scale, scheme, k), expand_groups(zero, scheme, k), scheme.maxq)
    return QuantizedWeight(q, scale, zero, scheme)


def mse_clip_params(w: torch.Tensor, scheme: QuantScheme, grid: int = 100, maxshrink: float = 0.8,
                    norm: float = 2.4, col_weight: torch.Tensor | None = None, protect: torch.Tensor | None = None):
    """Group parameters tuned by a clipping grid search (OWQ's and GPTQ's "mse" option): shrink each group's range
    by factors 1, 1 - 1/grid, ... down to 1 - maxshrink and keep, per group, the factor with the least |error|^norm.
    `col_weight` [K] weighs each input column's error (e.g. diag(H) = 2 E[x_j^2]: the output error a column's
    weight error causes, as AWQ's and GPTQ-style searches score it, instead of the raw weight error); [N, K] weighs
    each weight's (e.g. `owq.gated_product_weights`).
    `protect` [K] bool: input columns whose weights no factor may clip (a group keeps its range wide enough to hold
    them, up to rounding), e.g. the inputs that carry an attention sink (`owq.sink_columns`)."""
    w = w.float()
    n, k = w.shape
    g = scheme.group_len(k)
    ng = scheme.groups(k)
    wmin, wmax = group_minmax(w, scheme)
    best_s, best_z = params_from_range(wmin, wmax, scheme)
    best_err = torch.full_like(best_s, float("inf"))
    pad = ng * g - k
    wp = torch.cat([w, torch.zeros(n, pad, dtype=w.dtype, device=w.device)], 1) if pad else w
    valid = torch.ones(ng * g, device=w.device)
    if pad:
        valid[k:] = 0
    wg = wp.reshape(n, ng, g)
    if col_weight is not None:
        cw = col_weight.to(w.device).float()
        cw = torch.cat([cw, cw.new_zeros(*cw.shape[:-1], pad)], -1) if pad else cw
        valid = valid * cw
    vg = valid.reshape(-1, ng, g)
    lo = hi = None
    if protect is not None and bool(protect.any()):
        pg = torch.cat([protect.to(w.device, torch.bool), torch.zeros(pad, dtype=torch.bool, device=w.device)])
        pg = pg.reshape(1, ng, g)
        lo = torch.where(pg, wg, torch.inf).amin(-1)    # the range must reach down to lo and up to hi
        hi = torch.where(pg, wg, -torch.inf).amax(-1)
    for i in range(int(maxshrink * grid) + 1):
        p = 1 - i / grid
        s, z = params_from_range(wmin * p, wmax * p, scheme)
        q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, scheme.maxq)
        err = (((q - z[..., None]) * s[..., None] - wg).abs().pow(norm) * vg).sum(-1)
        better = err < best_err
        if lo is not None:
            better &= (wmin * p <= lo) & (wmax * p >= hi)
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z
