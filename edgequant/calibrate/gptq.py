"""GPTQ / OPTQ weight quantization (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv 2210.17323).

Columns are quantized one at a time; the error of each is spread over the not-yet-quantized columns through the
inverse Hessian's Cholesky factor (H = 2/n sum x x^T), processed in lazy blocks. Options: damping, act-order
(largest diag(H) first), and `keep` columns (OWQ's weak columns: not quantized, moved last so they absorb every
update, then stored in fp16). With act-order the group parameters are fixed up front from the original weights
("static groups"), because the checkpoint's groups are consecutive along K and act-order visits them out of order;
otherwise each group's parameters come from the already-updated weights of its (non-kept) columns when its first
column is reached, as in the paper.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import EdgequantError
from ..quantizer import QuantizedWeight, group_minmax, params_from_range
from ..schemes import QuantScheme


def _group_params(w: torch.Tensor, scheme: QuantScheme, clip_search=None, h_diag=None, protect=None):
    """Scale/zero of w's groups (of `scheme`), by min-max or by `clip_search(w, scheme, h_diag, protect)`."""
    if clip_search is not None:
        return clip_search(w, scheme, h_diag, protect)
    return params_from_range(*group_minmax(w, scheme), scheme)


@contextmanager
def one_cpu_thread(device: torch.device):
    """The column loop is thousands of tiny tensor ops: on a CPU, intra-op threads only add synchronisation, and on a
    busy machine their spinning made it 20x slower (10.5 s vs 0.44 s for a 1536 x 576 weight)."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, blocksize: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, keep: torch.Tensor | None = None,
                  clip_search=None, params: tuple | None = None,
                  protect: torch.Tensor | None = None,
                  search_weight: torch.Tensor | None = None) -> tuple[QuantizedWeight, float]:
    """Quantize `weight` [N, K] given the Hessian `H` [K, K] of its inputs. Returns (quantized, GPTQ loss).

    `keep`: indices of input columns to leave in full precision (stored as outlier columns).
    `clip_search(w, scheme, h_diag) -> (scale, zero)`: optional tuning of the groups of w (e.g. OWQ's MSE grid);
    `h_diag` is diag(H) of w's columns, for a search that weighs each column's error by its input's energy;
    `protect` [K] bool (or None), the columns whose weights the search must not clip, is passed on as its 4th argument.
    `search_weight` ([K] or [N, K]): given to `clip_search` instead of `h_diag` (e.g. `owq.gated_product_weights`).
    `params`: given (scale, zero) [N, n_groups] to round within (e.g. ranges LWC learned), instead of computing them.
    """
    with one_cpu_thread(weight.device):
        return _gptq(weight, H, scheme, blocksize, percdamp, act_order, keep, clip_search, params, protect,
                     search_weight)


def _gptq(weight, H, scheme, blocksize, percdamp, act_order, keep, clip_search, params=None, protect=None,
          search_weight=None):
    W = weight.detach().clone().float()
    N, K = W.shape
    H = H.detach().clone().float().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    h_diag = torch.diag(H).clone() if search_weight is None else search_weight.to(W.device, torch.float32)

    keep_mask = torch.zeros(K, dtype=torch.bool, device=W.device)
    if keep is not None and len(keep):
        keep_mask[keep.long()] = True
    G = scheme.group_len(K)
    ng = scheme.groups(K)
    static = act_order or params is not None
    scales = torch.zeros(N, ng, device=W.device)
    zeros = torch.zeros(N, ng, device=W.device)
    ready = torch.zeros(ng, dtype=torch.bool)
    if params is not None:
        scales, zeros = (t.to(W.device, torch.float32) for t in params)
        ready[:] = True
    elif static:
        # all groups at once (the per-group search is one batched grid, not ng small ones)
        scales, zeros = _group_params(W.masked_fill(keep_mask[None], 0), scheme, clip_search, h_diag, protect)
        ready[:] = True

    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=W.device)
    if keep_mask.any():
        order = torch.cat([order[~keep_mask[order]], order[keep_mask[order]]])
    W = W[:, order]
    H = H[order][:, order]
    kept_sorted = keep_mask[order]
    pos = torch.argsort(order)  # original column -> position in processing order

    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(K, device=W.device)
    try:
        L = torch.linalg.cholesky(H)
    except RuntimeError:  # not positive definite even after damping: add more
        H += 10 * damp * torch.eye(K, device=W.device)
        try:
            L = torch.linalg.cholesky(H)
        except RuntimeError:
            raise EdgequantError(f"GPTQ's damped Hessian is not positive definite with --percdamp {percdamp:g}; "
                                 "use a larger --percdamp (the default is 0.01) or more calibration data") from None
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    Qint = torch.zeros_like(W)
    loss = torch.zeros((), device=W.device)
    # host copies of the per-column facts the loop branches on: reading a device tensor in an `if` (or float())
    # waits for the device, once per column, which made the loop launch-bound on a GPU
    order_h, kept_h = order.tolist(), kept_sorted.tolist()
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = order_h[col]
            g = orig // G
            w = W1[:, i]
            d = Hinv1[i, i]
            if not ready[g] and not kept_h[col]:
                # every non-kept column of this group lies ahead in processing order: take their current values
                cols = torch.arange(g * G, min((g + 1) * G, K), device=W.device)
                cols = cols[~keep_mask[cols]]
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, pos[cols] - col]
                one = QuantScheme(scheme.bits, -1, scheme.sym)   # the slice is one group
                scales[:, g:g + 1], zeros[:, g:g + 1] = _group_params(ahead, one, clip_search, h_diag[..., cols],
                                                                      None if protect is None else protect[cols])
                ready[g] = True
            if kept_h[col]:
                Q1[:, i] = zeros[:, g]
                W[:, col] = w  # final full-precision value of a kept column (every update has reached it)
                continue
            s, z = scales[:, g], zeros[:, g]
            q = torch.clamp(torch.round(w / s) + z, 0, scheme.maxq)
            Q1[:, i] = q
            err = (w - (q - z) * s) / d
            loss += (err ** 2).sum() * d * d / 2
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None]
            Err1[:, i] = err
        Qint[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(order)
    Qint = Qint[:, inv]
    qw = QuantizedWeight(Qint, scales, zeros, scheme)
    if keep_mask.any():
        idx = torch.nonzero(keep_mask).flatten()
        qw.outlier_idx = idx
        qw.outlier_weight = W[:, inv][:, idx].clone()
    return qw, float(loss)
