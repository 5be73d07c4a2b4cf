"""Block-output reconstruction after GPTQ/OWQ (`--tune-epochs N`): with every linear of a block quantized and its
integer codes and zero points fixed, learn the group scales, OWQ's fp16 columns, the biases and the block's norm
weights so that the quantized block, fed the quantized stream, reproduces the full-precision block's output on the
full-precision stream.

This is OmniQuant's block-wise objective (Shao et al., arXiv 2308.13137: MSE of the block output against the fp
model's, quantized inputs, one block at a time; BRECQ, Li et al., arXiv 2102.05426, for block reconstruction) applied
to the parameters a checkpoint stores in floating point, as PEQA (Kim et al., arXiv 2305.14152) tunes only the scales
of fixed integer weights. It starts from GPTQ's codes instead of OmniQuant's round-to-nearest, and since the target
is the fp stream, a block also corrects the error its quantized predecessors left in its inputs. The checkpoint
format is unchanged: scales stay fp16 values (rounded inside the forward pass, straight-through gradients), codes
and zero points integers. Every parameter is learned as a unit-free offset (scale = s0 * (1 + a); others
p = p0 + a * rms(p0)), so one learning rate fits all. The start and every epoch are scored on all windows and the
best is kept, so a block never ends worse than GPTQ left it (on the training windows). With `heldout` windows, the
last ones are never trained on and the start and every epoch are scored on them alone (an early stop): more epochs
lowered every block's loss on the training windows and still raised WikiText perplexity (SmolLM2 W4 + rotate: 22.68
after 3 epochs, 22.91 after 6; qwen W3 + rotate 36.62 -> 37.46). `token_rel` is the
OmniQuant module's per-token relative loss (attention-sink tokens would otherwise make up the whole MSE).
"""
from __future__ import annotations

import torch

from ..options import training_windows
from ..quantizer import QuantizedWeight, expand_groups, fp16_ste
from .blocks import BlockInputs, _move
from .omniquant.trainer import block_loss


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.float().pow(2).mean().sqrt().clamp_min(1e-8)


class Tunable:
    """The learnable offsets of a module's floating-point checkpoint values (its quantized linears' scales and fp16
    columns, its other parameters) and the parameter dict `functional_call` runs it with. `vectors_only`: of the
    other parameters only the 1-D ones (norm weights, biases), for a whole model whose embedding and output layer
    stay as they are."""

    def __init__(self, block: torch.nn.Module, linears: dict[str, QuantizedWeight], device,
                 vectors_only: bool = False):
        self.linears = linears
        quant = {f"{n}.weight" for n in linears}
        self.offsets: dict[str, torch.Tensor] = {}
        self.fixed: dict[str, tuple] = {}
        for n, qw in linears.items():
            k = qw.q.shape[1]
            # q - z, the small integer a group's scale multiplies (|q - z| <= 2^bits - 1), in one byte per weight
            # up to 7 bits: a whole model's copy (`e2e.py`) costs a quarter of its fp32 weights
            centered = qw.q.to(device, torch.int16) - expand_groups(qw.zero.to(device, torch.int16), qw.scheme, k)
            small = torch.int8 if qw.scheme.maxq <= 127 else torch.int16
            self.fixed[n] = (centered.to(small), qw.scale.float().to(device))
            self.offsets[f"{n}.scale"] = torch.zeros_like(qw.scale, dtype=torch.float32, device=device)
            if qw.outlier_idx is not None and len(qw.outlier_idx):
                self.offsets[f"{n}.outliers"] = torch.zeros_like(qw.outlier_weight, dtype=torch.float32, device=device)
        # biases and norm weights: every other floating parameter of the block
        self.plain = {n: p.detach().float().to(device) for n, p in block.named_parameters()
                      if n not in quant and p.is_floating_point() and (p.ndim == 1 or not vectors_only)}
        for n in self.plain:
            self.offsets[n] = torch.zeros_like(self.plain[n])
        for t in self.offsets.values():
            t.requires_grad_(True)

    def scale(self, n: str) -> torch.Tensor:
        return fp16_ste(self.fixed[n][1] * (1 + self.offsets[f"{n}.scale"]))

    def outliers(self, n: str) -> torch.Tensor | None:
        qw = self.linears[n]
        if f"{n}.outliers" not in self.offsets:
            return None
        o = qw.outlier_weight.float().to(self.offsets[f"{n}.outliers"].device)
        return o + self.offsets[f"{n}.outliers"] * _rms(o)

    def params(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, qw in self.linears.items():
            centered = self.fixed[n][0]
            w = centered.float() * expand_groups(self.scale(n), qw.scheme, centered.shape[1])
            o = self.outliers(n)
            if o is not None:
                idx = qw.outlier_idx.long().to(w.device)
                w = w.index_copy(1, idx, o)
            out[f"{n}.weight"] = w
        for n, p0 in self.plain.items():
            out[n] = p0 + self.offsets[n] * _rms(p0)
        return out

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.offsets.items()}

    def restore(self, snap: dict[str, torch.Tensor]):
        with torch.no_grad():
            for k, v in snap.items():
                self.offsets[k].copy_(v)

    @torch.no_grad()
    def write_back(self, block: torch.nn.Module):
        """Store the current offsets: the QuantizedWeights' scales and fp16 columns, the linears' weights (their
        dequantized values) and the other tuned parameters of `block`."""
        params = self.params()
        for n, qw in self.linears.items():
            qw.scale = self.scale(n).detach().to(qw.scale.device, qw.scale.dtype)
            o = self.outliers(n)
            if o is not None:
                qw.outlier_weight = o.detach().to(qw.outlier_weight.device, qw.outlier_weight.dtype)
            lin = block.get_submodule(n)
            lin.weight.copy_(qw.dequantize().to(lin.weight.device, lin.weight.dtype))
        for n, p in block.named_parameters():
            if n in self.plain:
                p.copy_(params[n].to(p.dtype))


def _forward(block, params, x, kw):
    y = torch.func.functional_call(block, params, (x,), kw)
    return y[0] if isinstance(y, (tuple, list)) else y


@torch.no_grad()
def _score(block, tun: Tunable, inputs: BlockInputs, targets: torch.Tensor, kw, device, batch_size, loss,
           first: int = 0) -> float:
    """The loss over windows first.. (all by default); no gradients, so 4 training batches at a time (fewer launches
    on a GPU)."""
    params = tun.params()
    batch_size *= 4
    total = 0.0
    for i in range(first, len(targets), batch_size):
        j = min(i + batch_size, len(targets))
        y = _forward(block, params, inputs.hidden[i:j].to(device), kw)
        total += float(block_loss(y, targets[i:j].to(device), loss)) * len(y)
    return total / (len(targets) - first)


def tune_block(block: torch.nn.Module, linears: dict[str, QuantizedWeight], inputs: BlockInputs,
               targets: torch.Tensor, epochs: int, lr: float, device="cpu", batch_size: int = 4,
               seed: int = 0, loss: str = "mse", heldout: int = 0) -> dict:
    """Tune `block` (its linears named relative to it in `linears`, their weights already quantized) on the quantized
    stream `inputs` toward `targets`, the fp block's outputs on the fp stream. Updates the QuantizedWeights' scales
    and fp16 columns and the block's other parameters in place, and the linears' weights to match. Returns the
    losses: start, each epoch, and the index kept (0 = the start). `heldout`: the last windows, scored but never
    trained on (0: train and score on all)."""
    n_train = training_windows("--tune-heldout", heldout, len(targets))
    first = n_train if heldout else 0
    kw = _move(inputs.kwargs, device)
    saved_grad = {n: p.requires_grad for n, p in block.named_parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    tun = Tunable(block, linears, device)
    opt = torch.optim.Adam(list(tun.offsets.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = [_score(block, tun, inputs, targets, kw, device, batch_size, loss, first)]
    best, best_i = tun.snapshot(), 0
    try:
        for _ in range(epochs):
            perm = torch.randperm(n_train, generator=gen)
            for i in range(0, len(perm), batch_size):
                idx = perm[i:i + batch_size]
                with torch.enable_grad():
                    y = _forward(block, tun.params(), inputs.hidden[idx].to(device), kw)
                    step_loss = block_loss(y, targets[idx].to(device), loss)
                opt.zero_grad(set_to_none=True)
                step_loss.backward()
                opt.step()
            losses.append(_score(block, tun, inputs, targets, kw, device, batch_size, loss, first))
            if losses[-1] < losses[best_i]:
                best, best_i = tun.snapshot(), len(losses) - 1
    finally:
        for n, p in block.named_parameters():
            p.requires_grad_(saved_grad[n])
    tun.restore(best)
    tun.write_back(block)
    return {"losses": losses, "kept": best_i}
