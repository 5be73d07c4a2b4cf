"""Block-by-block orchestration shared by calibrated methods: capture the first decoder block's inputs on the
calibration samples, run one block over them in mini-batches, collect a linear's input statistics with hooks.

Only one block needs to be on the compute device at a time, so models larger than the device fit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import family_for


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    """Hidden states entering a block ([n, seqlen, hidden], kept on the host) and the keyword arguments the model
    passes every block (rotary embeddings, mask, positions), captured once for a batch of one. Where blocks get
    different ones (Gemma's sliding-window and global layers: their own mask, and Gemma 3 its own RoPE base),
    `layer_kwargs` holds each block's and `use_layer(i)` selects block i's."""
    hidden: torch.Tensor
    kwargs: dict
    layer_kwargs: list | None = None

    def use_layer(self, i: int) -> dict:
        if self.layer_kwargs is not None:
            self.kwargs = self.layer_kwargs[i]
        return self.kwargs


def _move(obj, device, memo=None):
    """`obj` with its tensors on `device`; `memo` lets objects shared between calls (one mask read by many
    layers) be moved once."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if torch.is_tensor(obj):
        out = obj.to(device)
    elif isinstance(obj, tuple):
        out = tuple(_move(o, device, memo) for o in obj)
    elif isinstance(obj, list):
        out = [_move(o, device, memo) for o in obj]
    elif isinstance(obj, dict):
        out = {k: _move(v, device, memo) for k, v in obj.items()}
    else:
        return obj
    memo[id(obj)] = out
    return out


_SKIP_KWARGS = ("hidden_states", "past_key_values", "past_key_value", "cache", "use_cache")


class _Recorder(torch.nn.Module):
    """Stands in for a block for one forward pass: records its keyword arguments, passes the hidden states on."""

    def __init__(self, seen: list, last: bool):
        super().__init__()
        self.seen, self.last = seen, last

    def forward(self, hidden_states, *args, **kwargs):
        self.seen.append({k: v for k, v in kwargs.items() if k not in _SKIP_KWARGS})
        if self.last:
            raise _Stop
        return hidden_states


def _per_layer_kwargs(model, layers, sample, device) -> list | None:
    """Every block's keyword arguments where the model gives blocks different ones (`config.layer_types` with more
    than one kind), else None. The blocks are swapped for recorders, so no block runs."""
    if len(set(getattr(model.config, "layer_types", None) or ())) < 2:
        return None
    seen, saved = [], list(layers)
    for i in range(len(layers)):
        layers[i] = _Recorder(seen, last=i == len(saved) - 1)
    try:
        model(sample[None].to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        for i, blk in enumerate(saved):
            layers[i] = blk
    memo = {}
    return [_move(kw, "cpu", memo) for kw in seen]


@torch.no_grad()
def capture_first_block_inputs(model, layers, samples: torch.Tensor, device="cpu") -> BlockInputs:
    """Run the embedding part of the model on each sample and record what enters block 0."""
    hidden, kwargs_seen = [], {}

    def hook(_mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        hidden.append(x.detach().to("cpu", torch.float32))
        if not kwargs_seen:
            kwargs_seen.update({k: v for k, v in kwargs.items() if k not in _SKIP_KWARGS})
        raise _Stop

    # everything before the blocks (embeddings, rotary) is small: put it on the device for this pass
    embed_parts = [model.get_submodule(n) for n in family_for(model.config.model_type).pre_block]
    for m in embed_parts:
        m.to(device)
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    layers[0].to(device)
    try:
        for s in samples:
            try:
                model(s[None].to(device), use_cache=False)
            except _Stop:
                pass
        per_layer = _per_layer_kwargs(model, layers, samples[0], device)
    finally:
        handle.remove()
        layers[0].to("cpu")
        for m in embed_parts:
            m.to("cpu")
    kwargs = {k: _move(v, "cpu") for k, v in kwargs_seen.items()}
    return BlockInputs(torch.cat(hidden), kwargs, per_layer)


@torch.no_grad()
def run_block(block, inputs: BlockInputs, device="cpu", batch_size: int = 4, stop_at=None) -> torch.Tensor | None:
    """Outputs of `block` for every input row (on the host). With `stop_at` (a module inside the block), the forward
    pass of each batch stops once that module has run (its hooks have seen its input): returns None."""
    kw = _move(inputs.kwargs, device)
    outs = []
    handle = None
    if stop_at is not None:
        def _raise(*_):
            raise _Stop
        handle = stop_at.register_forward_hook(_raise)
    try:
        for i in range(0, len(inputs.hidden), batch_size):
            x = inputs.hidden[i:i + batch_size].to(device)
            try:
                y = block(x, **kw)
            except _Stop:
                continue
            y = y[0] if isinstance(y, (tuple, list)) else y
            outs.append(y.to("cpu", torch.float32))
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat(outs) if outs else None


class HessianCollector:
    """Accumulates H = 2/n * sum x x^T over the inputs of a linear (x: its input rows), in float32 like the reference code."""

    def __init__(self, module: torch.nn.Linear, skip_tokens: int = 0, first_token: bool = False):
        k = module.in_features
        self.skip = skip_tokens
        self.H = torch.zeros(k, k, dtype=torch.float32, device=module.weight.device)
        self.n = 0
        # `first_token`: also H0 = 2/n sum x0 x0^T over each window's first token alone (the attention sink), whose
        # share of H is 1/seqlen however much the rest of the network depends on it
        self.H_first = torch.zeros_like(self.H) if first_token else None
        self.n_first = 0
        # and the mean square of each input over the other tokens (`first_token` only): which inputs the sink owns
        self.rest_sq = torch.zeros(k, dtype=torch.float32, device=module.weight.device) if first_token else None
        self.n_rest = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _mod, args, _out):
        x = args[0].detach()
        if self.H_first is not None and x.dim() == 3:
            x0 = x[:, 0].to(torch.float32)
            self.H_first *= self.n_first / (self.n_first + x0.shape[0])
            self.n_first += x0.shape[0]
            x0 = x0 * (2.0 / self.n_first) ** 0.5
            self.H_first += x0.T @ x0
            xr = x[:, 1:].reshape(-1, x.shape[-1]).to(torch.float32)
            self.rest_sq *= self.n_rest / max(self.n_rest + xr.shape[0], 1)
            self.n_rest += xr.shape[0]
            self.rest_sq += (xr ** 2).sum(0) / max(self.n_rest, 1)
        if self.skip and x.dim() == 3:
            x = x[:, self.skip:]
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x

    def first_token_sq(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean square of each input over each window's first token, over the other tokens); `first_token` only."""
        return torch.diag(self.H_first) / 2, self.rest_sq

    def remove(self) -> torch.Tensor:
        self.handle.remove()
        return self.H.to(torch.float32)


class GatedProductCollector:
    """Accumulates `owq.gated_product_weights` over the inputs of a gated MLP's gate (= up's input): per weight of gate
    and of up, the mean weight its squared error carries in the error of act(gate(x)) * up(x). Gate and up are read
    as they are when the input passes (the fp weights: the collector runs before their group is quantized)."""

    def __init__(self, gate: torch.nn.Linear, up: torch.nn.Linear, act, skip_tokens: int = 0):
        self.gate, self.up, self.act, self.skip = gate, up, act, skip_tokens
        self.sums = None
        self.n = 0
        self.handle = gate.register_forward_hook(self._hook)

    def _hook(self, _mod, args, _out):
        from .owq import gated_product_weights
        x = args[0].detach()
        if self.skip and x.dim() == 3:
            x = x[:, self.skip:]
        x = x.reshape(-1, x.shape[-1])
        g, u = gated_product_weights(x, self.gate.weight.detach(), self.up.weight.detach(), self.act)
        self.sums = (g, u) if self.sums is None else (self.sums[0] + g, self.sums[1] + u)
        self.n += x.shape[0]

    def remove(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate's, up's) [N, K] mean weights."""
        self.handle.remove()
        return self.sums[0] / max(self.n, 1), self.sums[1] / max(self.n, 1)
