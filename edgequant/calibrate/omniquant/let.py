"""Learnable equivalent transformation (LET), OmniQuant section 3.3 (arXiv 2308.13137, eqs. 3-5), for the LLaMA family.

Between a producer and the linears that read its output, a per-channel scale s moves magnitude from activations to
weights without changing the block's function: producer output / s, consumer weight columns * s. Pairs handled here
(names relative to one decoder block):

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

from dataclasses import dataclass

import torch
from torch import nn

PAIRS = ("qkv", "fc1", "vo", "qk", "down")
# consumers of each pair's (shift) input
GROUP_LINEARS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "fc1": ("mlp.gate_proj", "mlp.up_proj"), "vo": ("self_attn.o_proj",), "down": ("mlp.down_proj",)}
LINEAR_GROUP = {lin: g for g, lins in GROUP_LINEARS.items() for lin in lins}
_EPS = 1e-5


@dataclass(frozen=True)
class BlockShape:
    hidden: int
    intermediate: int
    n_heads: int
    n_kv: int
    head_dim: int

    @classmethod
    def from_config(cls, c) -> "BlockShape":
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.hidden_size, c.intermediate_size, c.num_attention_heads,
                   getattr(c, "num_key_value_heads", None) or c.num_attention_heads, hd)

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv

    def kv_to_q(self, t: torch.Tensor) -> torch.Tensor:
        """Per-kv-channel values [n_kv * hd] -> per-query-channel values [n_heads * hd] (each query head gets its kv
        head's values, the grouping `repeat_kv` uses)."""
        return t.reshape(self.n_kv, 1, self.head_dim).expand(self.n_kv, self.n_rep, self.head_dim).reshape(-1)

    def q_to_kv_max(self, t: torch.Tensor) -> torch.Tensor:
        """Per-query-channel values -> per-kv-channel maximum over the query heads of each group."""
        return t.reshape(self.n_kv, self.n_rep, self.head_dim).amax(1).reshape(-1)


def _w(name):
    return f"{name}.weight"


def _b(name):
    return f"{name}.bias"


class LET(nn.Module):
    """The learnable scales (and shifts) of one decoder block; `transform` applies them to the block's tensors."""

    def __init__(self, shape: BlockShape, pairs=PAIRS, shift_groups=()):
        super().__init__()
        self.shape = shape
        sizes = {"qkv": shape.hidden, "fc1": shape.hidden, "vo": shape.n_kv * shape.head_dim,
                 "qk": shape.n_kv * shape.head_dim // 2, "down": shape.intermediate}
        self.log_scales = nn.ParameterDict({p: nn.Parameter(torch.zeros(sizes[p])) for p in pairs})
        in_width = {"qkv": shape.hidden, "fc1": shape.hidden, "vo": shape.n_heads * shape.head_dim,
                    "down": shape.intermediate}
        self.shifts = nn.ParameterDict({g: nn.Parameter(torch.zeros(in_width[g])) for g in shift_groups})

    # ---------------------------------------------------------------- scales
    def scale(self, pair: str) -> torch.Tensor | None:
        if pair not in self.log_scales:
            return None
        return torch.exp(self.log_scales[pair])

    def qk_full(self) -> torch.Tensor | None:
        """k-channel scales [n_kv * hd] with each RoPE pair (d, d + hd/2) sharing one value."""
        s = self.scale("qk")
        if s is None:
            return None
        s = s.reshape(self.shape.n_kv, self.shape.head_dim // 2)
        return torch.cat([s, s], dim=-1).reshape(-1)

    def input_scale(self, linear: str) -> torch.Tensor | None:
        """The scale multiplying a consumer's columns (its input channels), or None."""
        g = LINEAR_GROUP.get(linear)
        if g == "vo":
            s = self.scale("vo")
            return None if s is None else self.shape.kv_to_q(s)
        return self.scale(g) if g is not None else None

    # ---------------------------------------------------------------- the transformation
    def transform(self, p: dict) -> dict:
        """Block tensors {relative name: tensor} -> their transformed values (same keys). Without quantization the
        block computes exactly the same function with the result."""
        t = dict(p)
        sh = self.shape
        s = self.scale("qkv")
        if s is not None:
            t[_w("input_layernorm")] = t[_w("input_layernorm")] / s
            for n in GROUP_LINEARS["qkv"]:
                t[_w(n)] = t[_w(n)] * s
        s = self.scale("fc1")
        if s is not None:
            t[_w("post_attention_layernorm")] = t[_w("post_attention_layernorm")] / s
            for n in GROUP_LINEARS["fc1"]:
                t[_w(n)] = t[_w(n)] * s
        s = self.scale("vo")
        if s is not None:
            self._rows(t, "self_attn.v_proj", 1 / s)
            t[_w("self_attn.o_proj")] = t[_w("self_attn.o_proj")] * sh.kv_to_q(s)
        s = self.qk_full()
        if s is not None:
            self._rows(t, "self_attn.k_proj", 1 / s)
            self._rows(t, "self_attn.q_proj", sh.kv_to_q(s))
        s = self.scale("down")
        if s is not None:
            self._rows(t, "mlp.up_proj", 1 / s)
            t[_w("mlp.down_proj")] = t[_w("mlp.down_proj")] * s
        return t

    @staticmethod
    def _rows(t: dict, name: str, r: torch.Tensor):
        t[_w(name)] = t[_w(name)] * r[:, None]
        if t.get(_b(name)) is not None:
            t[_b(name)] = t[_b(name)] * r

    def shift(self, linear: str) -> torch.Tensor | None:
        g = LINEAR_GROUP.get(linear)
        return self.shifts[g] if g in self.shifts else None

    # ---------------------------------------------------------------- SmoothQuant-style initialisation
    @torch.no_grad()
    def init_from_stats(self, p: dict, act_absmax: dict, act_mean: dict, alpha: float):
        """`act_absmax[linear]` / `act_mean[linear]`: per-input-channel max |x| and mean x of the first linear of each
        group (q_proj, gate_proj, o_proj, down_proj) on the calibration data."""
        sh = self.shape

        def smooth(act, wcols):
            w = torch.stack([c.abs().amax(0) for c in wcols]).amax(0).clamp(min=_EPS)
            return (act.clamp(min=_EPS).pow(alpha) / w.pow(1 - alpha)).clamp(min=_EPS)

        if "qkv" in self.log_scales:
            s = smooth(act_absmax["self_attn.q_proj"], [p[_w(n)] for n in GROUP_LINEARS["qkv"]])
            self.log_scales["qkv"].copy_(s.log())
        if "fc1" in self.log_scales:
            s = smooth(act_absmax["mlp.gate_proj"], [p[_w(n)] for n in GROUP_LINEARS["fc1"]])
            self.log_scales["fc1"].copy_(s.log())
        if "vo" in self.log_scales:   # GQA: one scale per kv channel, from the largest of its query heads' channels
            act = sh.q_to_kv_max(act_absmax["self_attn.o_proj"])
            w = sh.q_to_kv_max(p[_w("self_attn.o_proj")].abs().amax(0))
            s = (act.clamp(min=_EPS).pow(alpha) / w.clamp(min=_EPS).pow(1 - alpha)).clamp(min=_EPS)
            self.log_scales["vo"].copy_(s.log())
        if "down" in self.log_scales:
            s = smooth(act_absmax["mlp.down_proj"], [p[_w("mlp.down_proj")]])
            self.log_scales["down"].copy_(s.log())
        if "qk" in self.log_scales:
            self.log_scales["qk"].zero_()
        first = {"qkv": "self_attn.q_proj", "fc1": "mlp.gate_proj", "vo": "self_attn.o_proj", "down": "mlp.down_proj"}
        for g in self.shifts:
            s = self.input_scale(first[g])
            m = act_mean[first[g]]
            self.shifts[g].copy_(m / s if s is not None else m)
