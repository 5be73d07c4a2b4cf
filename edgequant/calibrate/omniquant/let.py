"""Learnable equivalent transformation (LET), OmniQuant section 3.3 (arXiv 2308.13137, eqs. 3-5).

Between a producer and the linears that read its output, a per-channel scale s moves magnitude from activations to
weights without changing the block's function: producer output / s, consumer weight columns * s. The family
(`edgequant.models`) declares its pairs and their kinds; the LLaMA family's, as examples of each kind:

- `qkv`:  input_layernorm -> q/k/v_proj. Norm weight / s, q/k/v columns * s.
- `fc1`:  post_attention_layernorm -> gate/up_proj. Norm weight / s, gate/up columns * s.
- `vo`:   v_proj -> o_proj. v rows (and bias) / s, o columns * s. Attention mixes tokens, never channels, so a scale on
          v's channels passes through softmax(QK^T)V unchanged. With grouped-query attention several query heads read
          one kv head: the scale lives on the kv channels (n_kv * head_dim values) and o's columns of every query head
          in the group get the scale of the kv channel they read (the published code lacks this, its issue #75).
- `qk`:   q/k_proj. q rows * s, k rows / s leaves q.k unchanged. RoPE rotates channel d together with d + head_dim/2
          (HF's rotate_half layout); a rotation commutes with a scaling only if both channels of the pair share the
          scale, so the parameter has n_kv * head_dim/2 values, each used for both channels of a pair, and (GQA) each
          kv head's scales serve all its query heads.
- `down`: up_proj -> down_proj. up rows / s, down columns * s: exact because the MLP is silu(gate) * up, linear in up.
  (Not in the paper's LLaMA recipe; it is exact and cheap, so we offer it.)

Shifts (eq. 3's delta). For weight-only quantization a shift of a linear's input is exactly a bias correction:
`Q(W')(x - d) + W' d + b == Q(W') x + [b + (W' - Q(W')) d]`, where d lives in the (scaled) input domain of the linear. The
norm itself needs no bias, so a shift can be learned for any group whose every consumer has a bias; the fused bias then
carries it. LLaMA/Mistral/SmolLM have no linear biases, so they learn no shifts (the paper also turns shifts off for LLaMA);
Qwen2 learns a shift for q/k/v (shared by the three, as they read the same input). We do not invent new bias tensors:
the checkpoint stays loadable by any reader of the model's own config.

Scales are stored as log-scales so they stay positive whatever the optimizer does; initialisation is SmoothQuant's
`s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)` from activation statistics of the calibration data (qk starts at 1, as in
the paper); shifts start at the per-channel mean of the (scaled) input, the choice that minimises E||(W - Q(W))(x - d)||.
"""
from __future__ import annotations

import torch
from torch import nn

from ...models import Dims, Family

_EPS = 1e-5


def kv_to_q(d: Dims, t: torch.Tensor) -> torch.Tensor:
    """Per-kv-channel values [n_kv * hd] -> per-query-channel values [n_heads * hd] (each query head gets its kv
    head's values, the grouping `repeat_kv` uses)."""
    return t.reshape(d.kv_heads, 1, d.head_dim).expand(d.kv_heads, d.n_rep, d.head_dim).reshape(-1)


def q_to_kv_max(d: Dims, t: torch.Tensor) -> torch.Tensor:
    """Per-query-channel values -> per-kv-channel maximum over the query heads of each group."""
    return t.reshape(d.kv_heads, d.n_rep, d.head_dim).amax(1).reshape(-1)


def _w(name):
    return f"{name}.weight"


def _b(name):
    return f"{name}.bias"


class LET(nn.Module):
    """The learnable scales (and shifts) of one decoder block; `transform` applies them to the block's tensors.

    `pairs`: names of the family's pairs to learn (None: all of them); a name the family does not declare is skipped,
    since its algebra does not hold there. `shift_groups`: pairs whose consumers' input gets a learned shift."""

    def __init__(self, family: Family, dims: Dims, pairs=None, shift_groups=()):
        super().__init__()
        self.dims = dims
        self.norm_offset = family.norm_weight_offset
        known = {p.name: p for p in family.let_pairs}
        wanted = list(known) if pairs is None else [p for p in pairs if p in known]
        self.pairs = [p for p in family.let_pairs if p.name in wanted]   # the family's order: transform's order
        # the pair that scales each linear's input (whether or not it is learned: a shift may be)
        self.input_pair = {lin: p for p in family.let_pairs if p.scales_input for lin in p.consumers}
        self.first_consumer = {p.name: p.consumers[0] for p in family.let_pairs}
        shapes = family.linear_shapes(dims)

        def size(p):   # norm: the consumers' K; otherwise the producer's N (rope_qk: one value per RoPE pair)
            n = shapes[p.consumers[0]][1] if p.kind == "norm" else shapes[p.producer][0]
            return n // 2 if p.kind == "rope_qk" else n

        self.log_scales = nn.ParameterDict({p: nn.Parameter(torch.zeros(size(known[p]))) for p in wanted})
        self.shifts = nn.ParameterDict({g: nn.Parameter(torch.zeros(shapes[known[g].consumers[0]][1]))
                                        for g in shift_groups})

    # ---------------------------------------------------------------- scales
    def scale(self, pair: str) -> torch.Tensor | None:
        if pair not in self.log_scales:
            return None
        return torch.exp(self.log_scales[pair])

    def qk_full(self, pair: str = "qk") -> torch.Tensor | None:
        """k-channel scales [n_kv * hd] with each RoPE pair (d, d + hd/2) sharing one value."""
        s = self.scale(pair)
        if s is None:
            return None
        s = s.reshape(self.dims.kv_heads, self.dims.head_dim // 2)
        return torch.cat([s, s], dim=-1).reshape(-1)

    def input_scale(self, linear: str) -> torch.Tensor | None:
        """The scale multiplying a consumer's columns (its input channels), or None."""
        p = self.input_pair.get(linear)
        s = None if p is None else self.scale(p.name)
        if s is not None and p.kind == "attn_v":
            return kv_to_q(self.dims, s)
        return s

    # ---------------------------------------------------------------- the transformation
    def transform(self, p: dict) -> dict:
        """Block tensors {relative name: tensor} -> their transformed values (same keys). Without quantization the
        block computes exactly the same function with the result."""
        t = dict(p)
        for pair in self.pairs:
            s = self.qk_full(pair.name) if pair.kind == "rope_qk" else self.scale(pair.name)
            if s is None:
                continue
            if pair.kind == "norm":
                w, off = t[_w(pair.producer)], self.norm_offset
                # a (1 + w) norm scales by 1 + w: its stored weight becomes (1 + w) / s - 1
                t[_w(pair.producer)] = (w + off) / s - off if off else w / s
            else:
                self._rows(t, pair.producer, 1 / s)
            for n in pair.consumers:
                if pair.kind == "rope_qk":
                    self._rows(t, n, kv_to_q(self.dims, s))
                else:
                    t[_w(n)] = t[_w(n)] * (kv_to_q(self.dims, s) if pair.kind == "attn_v" else s)
        return t

    @staticmethod
    def _rows(t: dict, name: str, r: torch.Tensor):
        t[_w(name)] = t[_w(name)] * r[:, None]
        if t.get(_b(name)) is not None:
            t[_b(name)] = t[_b(name)] * r

    def shift(self, linear: str) -> torch.Tensor | None:
        p = self.input_pair.get(linear)
        return self.shifts[p.name] if p is not None and p.name in self.shifts else None

    # ---------------------------------------------------------------- SmoothQuant-style initialisation
    @torch.no_grad()
    def init_from_stats(self, p: dict, act_absmax: dict, act_mean: dict, alpha: float):
        """`act_absmax[linear]` / `act_mean[linear]`: per-input-channel max |x| and mean x of the first linear of each
        calibration group, on the calibration data."""
        d = self.dims

        for pair in self.pairs:
            if pair.kind == "rope_qk":
                self.log_scales[pair.name].zero_()
                continue
            act = act_absmax[pair.consumers[0]]
            w = torch.stack([p[_w(n)].abs().amax(0) for n in pair.consumers]).amax(0)   # max |W| per input channel
            if pair.kind == "attn_v":   # GQA: one scale per kv channel, from the largest of its query heads' channels
                act, w = q_to_kv_max(d, act), q_to_kv_max(d, w)
            s = (act.clamp(min=_EPS).pow(alpha) / w.clamp(min=_EPS).pow(1 - alpha)).clamp(min=_EPS)
            self.log_scales[pair.name].copy_(s.log())
        for g in self.shifts:
            first = self.first_consumer[g]
            s = self.input_scale(first)
            m = act_mean[first]
            self.shifts[g].copy_(m / s if s is not None else m)
