"""Perplexity (the GPTQ/OmniQuant WikiText-2 protocol: non-overlapping windows, mean token NLL, exp) and agreement
with a reference model (KL divergence of next-token distributions and top-1 agreement)."""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class EvalResult:
    perplexity: float
    windows: int
    seqlen: int
    tokens: int
    kl_divergence: float | None = None     # mean KL(reference || model) per token, nats
    top1_agreement: float | None = None    # share of positions where both argmaxes agree

    def to_dict(self):
        return asdict(self)


def _logits(model, ids):
    out = model(ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out).float()


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, reference=None, device="cpu", progress: bool = True,
             desc: str = "eval") -> EvalResult:
    """Perplexity of `model` on token windows [n, seqlen]; with `reference`, also KL and top-1 agreement."""
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    n, seqlen = windows.shape
    for w in tqdm(windows, desc=desc, disable=not progress, unit="window"):
        ids = w[None].to(device)
        logits = _logits(model, ids)[0, :-1]
        target = ids[0, 1:]
        nll += float(F.cross_entropy(logits, target, reduction="sum"))
        count += target.numel()
        if reference is not None:
            ref = _logits(reference, ids)[0, :-1]
            lp, lq = F.log_softmax(ref, -1), F.log_softmax(logits, -1)
            kl += float((lp.exp() * (lp - lq)).sum())
            agree += int((ref.argmax(-1) == logits.argmax(-1)).sum())
    ref = reference is not None
    return EvalResult(math.exp(nll / count), n, seqlen, count, kl / count if ref else None,
                      agree / count if ref else None)
