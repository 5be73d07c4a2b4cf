"""Weak-column tuning (WCT) from OWQ (arXiv 2306.02272, section on task adaptation): fine-tune only the fp16 weak
columns of an OWQ checkpoint with a causal-LM loss on task text, while the low-bit part stays frozen as integers and
is dequantized on the fly. The trainable state is tiny (J columns per linear), so it fits where full fine-tuning
(weights + gradients + two Adam moments for every parameter) would not.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..quantizer import expand_groups


class WeakColumnLinear(nn.Module):
    """y = x @ dequant(q)^T + x[..., idx] @ weak^T (+ bias); only `weak` is trainable."""

    def __init__(self, qw, bias: torch.Tensor | None):
        super().__init__()
        k = qw.q.shape[1]
        self.register_buffer("q", qw.q.to(torch.uint8))
        self.register_buffer("group_scale", qw.scale.float())
        self.register_buffer("group_zero", qw.zero.float())
        self.register_buffer("idx", qw.outlier_idx.long())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.weak = nn.Parameter(qw.outlier_weight.detach().float().clone())
        self.scheme = qw.scheme
        self.in_features, self.out_features = k, qw.q.shape[0]

    def base_weight(self) -> torch.Tensor:
        k = self.in_features
        s = expand_groups(self.group_scale, self.scheme, k)
        z = expand_groups(self.group_zero, self.scheme, k)
        return (self.q.float() - z) * s   # zero at the weak columns (q == z there)

    def forward(self, x):
        y = F.linear(x, self.base_weight().to(x.dtype), self.bias)
        return y + F.linear(x[..., self.idx], self.weak.to(x.dtype))


def attach_weak_columns(model, quantized: dict) -> dict[str, WeakColumnLinear]:
    """Swap each linear that has weak columns for a WeakColumnLinear; freeze everything else."""
    model.requires_grad_(False)
    swapped = {}
    for name, qw in quantized.items():
        if qw.outlier_idx is None or not len(qw.outlier_idx):
            continue
        old = model.get_submodule(name)
        new = WeakColumnLinear(qw, old.bias)
        model.set_submodule(name, new)
        swapped[name] = new
    return swapped


@torch.no_grad()
def lm_loss(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    tot, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size]
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        tot += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        n += ids[:, 1:].numel()
    return tot / n


def train_weak_columns(model, modules: dict[str, WeakColumnLinear], train: torch.Tensor, epochs: int = 1,
                       lr: float = 1e-4, batch_size: int = 4, seed: int = 0, progress: bool = True) -> list[float]:
    """AdamW on the weak columns only; returns the mean training loss of each epoch."""
    params = [m.weak for m in modules.values()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    history = []
    steps = math.ceil(len(train) / batch_size)
    for ep in range(epochs):
        order = torch.randperm(len(train), generator=g)
        total = 0.0
        bar = tqdm(range(steps), desc=f"wct epoch {ep + 1}/{epochs}", disable=not progress, unit="step")
        for s in bar:
            ids = train[order[s * batch_size:(s + 1) * batch_size]]
            logits = model(ids, use_cache=False).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        history.append(total / steps)
    for p in params:
        p.requires_grad_(False)
    return history
