"""End-to-end tuning after any method (`--e2e-epochs N`): with every linear's integer codes and zero points fixed,
learn the floating-point values a checkpoint stores (group scales, OWQ's fp16 columns, biases, norm weights) of the
whole model at once, so that its next-token distribution matches the full-precision model's on the calibration
windows (the KL divergence from the fp model's distribution to the quantized one's, per token).

EfficientQAT's second phase (Chen et al., arXiv 2407.11062, "E2E-QP": only the quantization step sizes trained end
to end, codes frozen), with the fp model as the teacher instead of next-token labels (knowledge distillation, Hinton
et al., arXiv 1503.02531): a calibration set of ~100k tokens carries far more signal in the teacher's full
distributions than in one label per token. Block-wise methods (GPTQ, OmniQuant, `--tune-epochs`) each minimise one
block's output error; this step minimises the error perplexity measures, across blocks, and can trade one block's
error against another's. The checkpoint format is unchanged (`blocktune.Tunable`: scales rounded to fp16 in the
forward pass, straight-through gradients; relative offsets, so one learning rate fits every parameter). The start
and every epoch are scored on the last `heldout` windows, never trained on, and the best is kept: the step never
leaves the model further from the fp model on them than the method left it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..options import training_windows
from ..quantizer import QuantizedWeight
from .blocktune import Tunable


def kl_to_teacher(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), both [..., vocab] logits."""
    v = logits.shape[-1]
    log_q = logits.float().reshape(-1, v).log_softmax(-1)
    return F.kl_div(log_q, teacher_logits.float().reshape(-1, v).log_softmax(-1), log_target=True, reduction="batchmean")


def _logits(model, params, ids):
    return torch.func.functional_call(model, params, (ids,), {"use_cache": False}).logits


@torch.no_grad()
def _score(model, teacher, tun: Tunable, windows: torch.Tensor, device, batch_size: int) -> float:
    params = tun.params()
    total = 0.0
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size].to(device)
        total += float(kl_to_teacher(_logits(model, params, ids), teacher(ids, use_cache=False).logits)) * len(ids)
    return total / len(windows)


def tune_end_to_end(model: torch.nn.Module, teacher: torch.nn.Module, quantized: dict[str, QuantizedWeight],
                    windows: torch.Tensor, epochs: int, lr: float, heldout: int, device="cpu", batch_size: int = 4,
                    seed: int = 0, progress: bool = True) -> dict:
    """Tune `model` (its linears named in `quantized` already hold their dequantized weights) toward `teacher` (the
    fp model before quantization, same architecture) on `windows` [n, seqlen] of token ids, the last `heldout` of
    them only scored. Updates the QuantizedWeights' scales and fp16 columns, the linears' weights and the model's
    norm weights and biases in place. Returns {"kl": [start, each epoch] on the scored windows, "kept": the index
    kept (0 = the method's result), "heldout": heldout}."""
    n_train = training_windows("--e2e-heldout", heldout, len(windows), 1)
    # the student's own linear weights are never read (functional_call takes them from `tun`): they stay on the host
    # and an empty stand-in goes to the device, which then holds the teacher, one byte per code and the activations
    host = {n: model.get_submodule(n).weight.data for n in quantized}
    saved_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    bar = tqdm(total=epochs * -(-n_train // batch_size), desc="e2e", disable=not progress, unit="step")
    try:
        for n in quantized:
            model.get_submodule(n).weight.data = torch.empty(0)
        model.to(device).eval()   # eval: no dropout; the gradients still flow
        teacher.to(device).eval().requires_grad_(False)
        model.requires_grad_(False)
        tun = Tunable(model, quantized, device, vectors_only=True)
        opt = torch.optim.Adam(list(tun.offsets.values()), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        train, scored = windows[:n_train], windows[n_train:]
        losses = [_score(model, teacher, tun, scored, device, batch_size)]
        best, best_i = tun.snapshot(), 0
        for _ in range(epochs):
            perm = torch.randperm(n_train, generator=gen)
            for i in range(0, n_train, batch_size):
                ids = train[perm[i:i + batch_size]].to(device)
                with torch.no_grad():
                    target = teacher(ids, use_cache=False).logits
                with torch.enable_grad():
                    loss = kl_to_teacher(_logits(model, tun.params(), ids), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update()
                bar.set_postfix(kl=f"{loss.item():.4f}", heldout_kl=f"{losses[-1]:.4f}")
            losses.append(_score(model, teacher, tun, scored, device, batch_size))
            if losses[-1] < losses[best_i]:
                best, best_i = tun.snapshot(), len(losses) - 1
    finally:
        bar.close()
        for n, w in host.items():
            model.get_submodule(n).weight.data = w
        for n, p in model.named_parameters():
            p.requires_grad_(saved_grad[n])
    tun.restore(best)
    tun.write_back(model)
    model.to("cpu")
    teacher.to("cpu")
    return {"kl": losses, "kept": best_i, "heldout": heldout}
