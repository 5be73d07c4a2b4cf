"""One decoder block's OmniQuant parameters, the block's effective tensors under them, and their fusion into a
parameter-free block (OmniQuant section 3.3, "after training, the learnable parameters are fused away").

`OmniBlock.effective()` gives the tensors the block computes with during training: LET applied to the original
full-precision tensors, LWC fake-quantizing every linear, shifts turned into bias corrections, and norms and biases
rounded to fp16 (straight-through) because the checkpoint stores them in fp16. `OmniBlock.fuse()` computes the same
values without gradients and returns them as checkpoint material: plain tensors (norm weights, biases) and a
`QuantizedWeight` per linear. Both use the same operations in the same order, so the fused block is bit-identical to
the trained one, and the checkpoint loads exactly like an RTN or GPTQ checkpoint.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ...models import family_for
from ...quantizer import QuantizedWeight, fp16_ste, quantize_weight
from ...schemes import QuantScheme
from .let import LET
from .lwc import LWC, search_clip_init


def _key(name: str) -> str:   # ModuleDict keys cannot hold dots
    return name.replace(".", "__")


class OmniBlock(nn.Module):
    """LWC strengths for every linear of a block and (optionally) its LET, over a frozen copy of the block's tensors.
    The block's linears, norms and LET pairs are its family's (`edgequant.models`)."""

    def __init__(self, block, config, scheme: QuantScheme, cfg, weak: dict | None = None):
        super().__init__()
        family = family_for(config.model_type)
        self.scheme = scheme
        self.linears, self.norms = family.linear_names, tuple(n.name for n in family.norms)
        self.stats_source = {n: family.stats_source(n) for n in self.linears}
        self.unsearched = ((() if getattr(cfg, "clip_qk", True) else family.attention_logit_linears)
                           + (() if getattr(cfg, "clip_up", True) else family.gated_mlp[1:2]))
        # OWQ weak columns {linear: sorted input indices}: kept in full precision (fp16 in the checkpoint), left out
        # of LWC's ranges and integers (zeroed there, so they quantize to the zero point and dequantize to 0)
        self.weak = {n: idx for n, idx in (weak or {}).items() if len(idx)}
        self.base = {}
        for n in self.norms:
            self.base[f"{n}.weight"] = block.get_submodule(n).weight.detach().clone().float()
        has_bias = {}
        for n in self.linears:
            lin = block.get_submodule(n)
            self.base[f"{n}.weight"] = lin.weight.detach().clone().float()
            has_bias[n] = lin.bias is not None
            if has_bias[n]:
                self.base[f"{n}.bias"] = lin.bias.detach().clone().float()
        init = cfg.lwc_init if isinstance(cfg.lwc_init, (int, float)) else 4.0   # "search": set later from data
        self.lwc = nn.ModuleDict({_key(n): LWC(*self.base[f"{n}.weight"].shape, scheme, init, learn=cfg.lwc)
                                  for n in self.linears})
        self.let = None
        if cfg.let:
            # a shift needs a bias in every linear that reads the shifted input (see let.py)
            shift_groups = [p.name for p in family.let_pairs
                            if p.scales_input and all(has_bias[n] for n in p.consumers)]
            self.let = LET(family, family.dims(config), tuple(cfg.let_pairs), shift_groups)
        dev = self.base[f"{self.linears[0]}.weight"].device
        self.to(dev)

    @torch.no_grad()
    def search_lwc_init(self, act_sqmean: dict, product_w: dict | None = None):
        """Activation-aware clip search as LWC's starting point (`lwc.search_clip_init`), on the LET-transformed
        weights, each input column weighted by E[x^2] of its (transformed) input, or for the linears in `product_w`
        (a gated MLP's gate/up, `--lwc-init-metric product`) each weight by its [N, K] weight in the MLP product's
        error (`owq.gated_product_weights`)."""
        t = self._transformed()
        for n in self.linears:
            if n in self.unsearched:   # q/k, up start unclipped (OmniConfig.clip_qk/clip_up); training may clip them
                search_clip_init(self.lwc[_key(n)], self.base[f"{n}.weight"], grid=(1.0,))
                continue
            m2 = (product_w or {}).get(n, act_sqmean[self.stats_source[n]])
            s = self.let.input_scale(n) if self.let is not None else None
            if s is not None:
                m2 = m2 / s ** 2
            search_clip_init(self.lwc[_key(n)], self._split(n, t[f"{n}.weight"])[0], m2)

    def lwc_params(self):
        return [p for p in self.lwc.parameters()]

    def let_params(self):
        return [] if self.let is None else list(self.let.parameters())

    def _split(self, n: str, w: torch.Tensor):
        """(w with the weak columns zeroed, w's weak columns or None)."""
        idx = self.weak.get(n)
        if idx is None:
            return w, None
        idx = idx.to(w.device)
        return w.index_fill(1, idx, 0.0), w[:, idx]

    def _transformed(self):
        return self.let.transform(self.base) if self.let is not None else dict(self.base)

    def effective(self, quant: bool = True, fp16_plain: bool = True) -> dict:
        """{block-relative parameter name: tensor} to substitute into the block (differentiable)."""
        t = self._transformed()
        out = {}
        for n in self.linears:
            w = t[f"{n}.weight"]
            w_q, w_weak = self._split(n, w)
            w_hat = self.lwc[_key(n)](w_q) if quant else w_q
            if w_weak is not None:   # the fp16 columns, as the checkpoint will hold them
                w_hat = w_hat.index_add(1, self.weak[n].to(w.device), fp16_ste(w_weak) if fp16_plain else w_weak)
            out[f"{n}.weight"] = w_hat
            b = t.get(f"{n}.bias")
            if b is not None:
                d = self.let.shift(n) if self.let is not None else None
                if d is not None:   # shift of the input, folded: Q(W')(x - d) + W' d + b = Q(W') x + b + (W' - Q(W')) d
                    b = b + (w - w_hat) @ d
                out[f"{n}.bias"] = fp16_ste(b) if fp16_plain else b
        for n in self.norms:
            w = t[f"{n}.weight"]
            out[f"{n}.weight"] = fp16_ste(w) if fp16_plain else w
        return out

    @torch.no_grad()
    def fuse(self):
        """(plain {name: tensor} for norms and biases, {linear: QuantizedWeight} on the host, {linear: stats})."""
        t = self._transformed()
        plain, qws, stats = {}, {}, {}
        for n in self.linears:
            w = t[f"{n}.weight"]
            w_q, w_weak = self._split(n, w)
            lwc = self.lwc[_key(n)]
            scale, zero = lwc.params(w_q)
            qw = quantize_weight(w_q, self.scheme, scale, zero)
            if w_weak is not None:
                qw.outlier_idx = self.weak[n].to(w.device)
                qw.outlier_weight = fp16_ste(w_weak)
            w_hat = qw.dequantize()
            b = t.get(f"{n}.bias")
            if b is not None:
                d = self.let.shift(n) if self.let is not None else None
                if d is not None:
                    b = b + (w - w_hat) @ d
                plain[f"{n}.bias"] = fp16_ste(b).cpu()
            up, low = lwc.clip_factors()
            st = {"weight_rel_err": float(((w - w_hat) ** 2).sum() / (w ** 2).sum().clamp_min(1e-30))}
            if up is not None:
                st["clip_upper_mean"] = float(up.mean())
                st["clip_lower_mean"] = float(low.mean())
            stats[n] = st
            qws[n] = QuantizedWeight(qw.q.to(torch.uint8).cpu(), qw.scale.cpu(), qw.zero.cpu(), self.scheme,
                                     *(None if t_ is None else t_.cpu() for t_ in (qw.outlier_idx, qw.outlier_weight)))
            if w_weak is not None:
                st["weak_columns"] = int(len(qw.outlier_idx))
        for n in self.norms:
            plain[f"{n}.weight"] = fp16_ste(t[f"{n}.weight"]).cpu()
        return plain, qws, stats

    @staticmethod
    def detached_copy(ob: "OmniBlock") -> "OmniBlock":
        """A host copy with frozen parameters (the live, unfused model of the tests)."""
        c = copy.deepcopy(ob).to("cpu")
        c.base = {k: v.detach().cpu() for k, v in ob.base.items()}
        c.requires_grad_(False)
        return c


@torch.no_grad()
def apply_fused(block, plain: dict, qws: dict):
    """Write fused tensors into a block in place: linear weights dequantized from their integers, norms and biases."""
    for n, qw in qws.items():
        lin = block.get_submodule(n)
        lin.weight.copy_(qw.dequantize().to(lin.weight.device, lin.weight.dtype))
    for name, t in plain.items():
        p = block.get_parameter(name)
        p.copy_(t.to(p.device, p.dtype))


class LiveBlock(nn.Module):
    """A block computing with an OmniBlock's live (unfused) tensors: the reference the fused checkpoint must match."""

    def __init__(self, block, ob: OmniBlock):
        super().__init__()
        self.block, self.ob = block, ob

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.block, self.ob.effective(), args, kwargs, strict=False)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)
