"""Reconstruction errors recorded per layer in `edgequant.json` and shown by `edgequant inspect`."""
from __future__ import annotations

import torch


def weight_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||W - W_hat||^2 / ||W||^2."""
    w = w.float()
    return float(((w - w_hat.float()) ** 2).sum() / (w ** 2).sum().clamp_min(1e-30))


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: tr(dW H dW^T) / tr(W H W^T), with H = 2/n sum x x^T."""
    w = w.float()
    d = w - w_hat.float()
    num = ((d @ H) * d).sum()
    den = ((w @ H) * w).sum().clamp_min(1e-30)
    return float(num / den)
