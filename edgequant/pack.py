"""Bit packing of quantized integers into uint32 words, LSB-first along K (MLC's `q_weight` NK layout).

`vpw = 32 // bits` values per word: 16 for 2-bit, 10 for 3-bit (the top 2 bits unused), 8 for 4-bit. Value k of a row
lives in word k // vpw at bit offset (k % vpw) * bits. K is padded with zeros up to a whole number of words.
"""
from __future__ import annotations

import numpy as np


def _as_uint32(q: np.ndarray) -> np.ndarray:
    if hasattr(q, "detach"):  # a torch tensor
        q = q.detach().cpu().numpy()
    return np.asarray(q).astype(np.uint32)


def pack(q, bits: int) -> np.ndarray:
    """Pack integers q [N, K] with values in [0, 2^bits) into uint32 [N, ceil(K / (32 // bits))]."""
    q = _as_uint32(q)
    if q.ndim != 2:
        raise ValueError(f"pack expects a 2-D array, got shape {q.shape}")
    if q.size and int(q.max()) >> bits:
        raise ValueError(f"values do not fit in {bits} bits (max {int(q.max())})")
    n, k = q.shape
    vpw = 32 // bits
    words = -(-k // vpw)
    padded = np.zeros((n, words * vpw), np.uint32)
    padded[:, :k] = q
    padded = padded.reshape(n, words, vpw)
    shifts = (np.arange(vpw, dtype=np.uint32) * np.uint32(bits))
    return np.bitwise_or.reduce(padded << shifts, axis=-1).astype(np.uint32)


def unpack(packed, bits: int, k: int) -> np.ndarray:
    """Inverse of `pack`: uint32 [N, W] -> uint8 [N, k]."""
    packed = _as_uint32(packed)
    vpw = 32 // bits
    if packed.ndim != 2 or packed.shape[1] * vpw < k:
        raise ValueError(f"packed shape {packed.shape} cannot hold {k} values of {bits} bits per row")
    shifts = np.arange(vpw, dtype=np.uint32) * np.uint32(bits)
    vals = (packed[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
    return vals.reshape(packed.shape[0], -1)[:, :k].astype(np.uint8)


def unpack_torch(packed, bits: int, k: int):
    """`unpack` for torch tensors on any device: uint32 (or int32) [N, W] -> int32 [N, k]. Used where the packed words
    stay in a model and are expanded at each call (the transformers integration)."""
    import torch
    words = packed.view(torch.int32) if packed.dtype == torch.uint32 else packed.to(torch.int32)
    vpw = 32 // bits
    shifts = torch.arange(vpw, dtype=torch.int32, device=words.device) * bits
    # int32 shifts are arithmetic: the mask drops the sign bits a top value of 2^31 and above would smear in
    vals = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(words.shape[0], -1)[:, :k]
