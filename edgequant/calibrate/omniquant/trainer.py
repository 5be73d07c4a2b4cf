"""Block-wise error minimisation, OmniQuant section 3.1 (arXiv 2308.13137, eq. 1 and Algorithm 1).

Capture the inputs of the first decoder block on the calibration samples; for each block in turn: compute its
full-precision output on the full-precision stream (the target), train the block's LWC strengths and LET scales/shifts
so that the quantized block fed the *quantized* stream matches that target (MSE; with `aug_loss` also the full-precision
block fed the quantized stream, as the published scripts do for W2), fold everything learned into norms, biases,
integers, scales and zero points (see `fuse.py`), and pass the fused block's outputs on as the next block's inputs.
With `block_target="local"` the target is the full-precision block fed the quantized stream instead: the paper's target
also holds the error the earlier blocks passed on through the residual, which this block's clipping cannot undo, and
on qwen2 that inherited error (the attention sink's massive channels) is nearly all of each later block's loss.

Training is stochastic (mini-batches of a few windows, AdamW at a fixed rate), and a block's loss can end higher than it
started (SmolLM2's block 28 went 188.8 -> 195.8 with the CPU-reduced settings). The block loss over every calibration
window is therefore measured before training and after each epoch, and the block keeps the parameters that scored
best (`keep_best`, on by default; the initial point is a candidate, so a block never ends worse than its start).
With `heldout` windows (the last ones of the calibration set) the training never sees them and the start and every
epoch are scored on them alone: on qwen2 more epochs lowered the training windows' loss and raised WikiText
perplexity (W4 g128 rotated, 32 x 256: 2 epochs 31.59, 6 epochs 32.45; benchmarks/results/quality-issue11-lead13-cuda.md).

Only the block being trained sits on the device; the two hidden-state streams stay on the host and travel in mini-batches.
After each block its fused tensors and the two streams are saved under `state_dir` (safetensors + JSON, see `state.py`),
so an interrupted run continues from the next block and, training being deterministic given its inputs and a per-block
seed, writes the same checkpoint byte for byte.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ...errors import EdgequantError
from ...options import training_windows
from ...models import family_for
from ...quantizer import QuantizedWeight
from ...schemes import QuantScheme
from ..configs import OmniConfig
from ..blocks import BlockInputs, GatedProductCollector, _move, capture_first_block_inputs
from .fuse import OmniBlock, apply_fused
from .state import ResumeState, fingerprint


@dataclass
class BlockSummary:
    block: int
    loss_before: float
    loss_after: float
    time_s: float
    steps: int
    resumed: bool = False
    extra: dict = field(default_factory=dict)


def block_loss(y: torch.Tensor, t: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """The block objective. "mse": the paper's mean squared error. "token_rel": each token's error divided by its
    target's mean square, so that a few tokens with massive activations (the first token of every window grows to
    ~1e6 mean square in SmolLM2's middle blocks, against ~30 for the others) do not make up the whole loss."""
    y, t = y.float(), t.float()
    if kind == "mse":
        return torch.nn.functional.mse_loss(y, t)
    w = 1.0 / t.pow(2).mean(-1, keepdim=True).clamp_min(1e-6)
    return ((y - t).pow(2) * w).mean()


def _block_forward(block, params: dict, x, kw):
    y = torch.func.functional_call(block, params, (x,), kw, strict=False)
    return y[0] if isinstance(y, (tuple, list)) else y


class _Stats:
    """Per-input-channel max |x| and mean x of some linears of a block (for LET's initialisation)."""

    def __init__(self, block, names):
        self.absmax, self.sum, self.sq, self.n, self.handles = {}, {}, {}, {}, []
        for n in names:
            self.handles.append(block.get_submodule(n).register_forward_hook(self._hook(n)))

    def _hook(self, name):
        def h(_m, args, _o):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            am, s, sq = x.abs().amax(0), x.sum(0), (x * x).sum(0)
            if name in self.absmax:
                self.absmax[name] = torch.maximum(self.absmax[name], am)
                self.sum[name] += s
                self.sq[name] += sq
                self.n[name] += x.shape[0]
            else:
                self.absmax[name], self.sum[name], self.sq[name], self.n[name] = am, s, sq, x.shape[0]
        return h

    def remove(self):
        for h in self.handles:
            h.remove()
        return (self.absmax, {k: v / self.n[k] for k, v in self.sum.items()},
                {k: v / self.n[k] for k, v in self.sq.items()})


@torch.no_grad()
def _run(block, params, hidden, kw, device, bs, target=None, loss="mse"):
    """Outputs of the block (with `params` substituted) for every row of `hidden` (host), and the loss to `target`."""
    outs, tot, cnt = [], 0.0, 0
    for i in range(0, len(hidden), bs):
        y = _block_forward(block, params, hidden[i:i + bs].to(device), kw).float()
        if target is not None:
            tot += float(block_loss(y, target[i:i + bs].to(device), loss)) * len(y)
            cnt += len(y)
        outs.append(y.to("cpu"))
    return torch.cat(outs), (tot / cnt if cnt else None)


# a hook for tests (simulated interruption) and callers that want to watch blocks finish
def _after_block(i: int):
    pass


def calibrate_omniquant(model, samples: torch.Tensor, scheme: QuantScheme, cfg: OmniConfig, device="cpu",
                        progress: bool = True, state_dir=None, keep_live: bool = False):
    """Train and fuse every decoder block of `model` in place. Returns (quantized {linear name: QuantizedWeight},
    per-linear stats, per-block summaries, live OmniBlocks (before fusion, on the host) if `keep_live` else None)."""
    family = family_for(model.config.model_type)
    layers = model.get_submodule(family.layers_path)
    state = ResumeState(state_dir, fingerprint(model, samples, scheme, cfg),
                        notify=lambda m: tqdm.write(m, file=sys.stderr))
    inputs: BlockInputs = capture_first_block_inputs(model, layers, samples, device)
    moved = {}   # layers that share a mask or RoPE table share one copy on the device
    q_hidden, fp_hidden = inputs.hidden, inputs.hidden.clone()
    start = 0
    plain_names = [f"{n.name}.weight" for n in family.norms] + [f"{n}.bias" for n in family.linear_names]
    resumed = None if keep_live else state.load(layers, scheme, family.linear_names, plain_names)
    quantized, stats, summaries, live = {}, {}, [], []
    if resumed is not None:   # finished blocks: put their fused tensors back into the model
        start, q_hidden, fp_hidden, blocks = resumed
        for i, (plain, qws, rec) in enumerate(blocks):
            apply_fused(layers[i], plain, qws)
            for rel, qw in qws.items():
                quantized[f"{family.layer_prefix(i)}.{rel}"] = qw
            stats.update(rec["stats"])
            known = {k: rec["summary"][k] for k in ("loss_before", "loss_after", "time_s", "steps")
                     if k in rec["summary"]}
            summaries.append(BlockSummary(i, **known, resumed=True))

    n_blocks = len(layers)
    weak_counts = _weak_counts(family, layers[0], scheme, cfg)
    for i in range(start, n_blocks):
        t0 = time.time()
        block = layers[i].to(device)
        block.requires_grad_(False)
        kw = _move(inputs.use_layer(i), device, moved)
        bs = cfg.batch_size

        # targets: the full-precision block on the full-precision stream (+ LET statistics on the way)
        st = _Stats(block, [g.names[0] for g in family.groups])   # the others read the same input
        gm = family.gated_mlp if cfg.lwc and cfg.lwc_init == "search" and cfg.lwc_init_metric == "product" else ()
        prod = (GatedProductCollector(*(block.get_submodule(n) for n in gm)) if gm else None)
        fp_out, _ = _run(block, {}, fp_hidden, kw, device, bs)
        act_absmax, act_mean, act_sqmean = st.remove()
        product_w = dict(zip(gm[:2], prod.remove())) if prod is not None else {}
        weak = _weak_columns(family, block, scheme, weak_counts, act_sqmean) if weak_counts else None
        ob = OmniBlock(block, model.config, scheme, cfg, weak).to(device)
        # the fp block on the quantized stream: the aug loss's target, or the only one with `block_target="local"`
        q_ref = _run(block, {}, q_hidden, kw, device, bs)[0] if cfg.aug_loss or cfg.block_target == "local" else None
        target = q_ref if cfg.block_target == "local" else fp_out
        aug_out = q_ref if cfg.aug_loss else None
        if ob.let is not None:
            ob.let.init_from_stats(ob.base, act_absmax, act_mean, cfg.let_alpha)
        if cfg.lwc and cfg.lwc_init == "search":
            ob.search_lwc_init(act_sqmean, product_w)
        with torch.no_grad():
            _, loss_before = _run(block, ob.effective(), q_hidden, kw, device, bs, target, cfg.loss)

        steps, epoch_losses = _train(block, ob, q_hidden, target, aug_out, kw, cfg, device, i, n_blocks, progress,
                                     loss_before)

        if keep_live:
            live.append(OmniBlock.detached_copy(ob))
        plain, qws, lin_stats = ob.fuse()
        apply_fused(block, plain, qws)
        if cfg.gptq:
            _gptq_rounding(family, block, ob, plain, qws, lin_stats, BlockInputs(q_hidden, kw), device, bs, cfg)
        q_next, loss_after = _run(block, {}, q_hidden, kw, device, bs, target, cfg.loss)
        layers[i] = block.to("cpu")
        prefix = family.layer_prefix(i)
        block_stats = {f"{prefix}.{rel}": s for rel, s in lin_stats.items()}
        for rel, qw in qws.items():
            quantized[f"{prefix}.{rel}"] = qw
        stats.update(block_stats)
        summ = BlockSummary(i, loss_before, loss_after, round(time.time() - t0, 2), steps,
                            extra={"epoch_losses": epoch_losses} if epoch_losses else {})
        summaries.append(summ)
        q_hidden, fp_hidden = q_next, fp_out
        del aug_out, q_ref, target
        state.save(i, plain, qws, {"stats": block_stats,
                                   "summary": {k: v for k, v in asdict(summ).items() if k != "resumed"}},
                   q_hidden, fp_hidden)
        if progress:
            tqdm.write(f"block {i}: loss {loss_before:.4g} -> {loss_after:.4g} ({summ.time_s:.1f} s)")
        _after_block(i)
    return quantized, stats, summaries, (live if keep_live else None)


@torch.no_grad()
def _gptq_rounding(family, block, ob, plain: dict, qws: dict, lin_stats: dict, inputs: BlockInputs, device, bs,
                   cfg: OmniConfig):
    """LWC then GPTQ: keep the learned ranges (each group's scale and zero point) and replace round-to-nearest by
    GPTQ's error-compensating rounding (arXiv 2210.17323) within them, linear group by linear group on the block's
    quantized input stream, earlier groups already rounded (as `layerwise.py` does). OWQ's fp16 columns stay kept
    columns that absorb GPTQ's updates. Updates `plain`, `qws`, `lin_stats` and the block in place."""
    from ..blocks import HessianCollector, run_block
    from ..gptq import gptq_quantize
    from ..metrics import output_error
    t = ob._transformed()
    for group in family.groups:
        mods = [block.get_submodule(n) for n in group.names]
        coll = HessianCollector(mods[0])
        try:
            run_block(block, inputs, device, bs, stop_at=mods[-1])
        finally:
            H = coll.remove()
        for n, lin in zip(group.names, mods):
            w, old = t[f"{n}.weight"].to(device), qws[n]
            keep = None if old.outlier_idx is None else old.outlier_idx.to(device)
            qw, loss = gptq_quantize(w, H, ob.scheme, percdamp=cfg.percdamp, act_order=cfg.act_order, keep=keep,
                                     params=(old.scale.to(device), old.zero.to(device)))
            w_hat = qw.dequantize()
            d = ob.let.shift(n) if ob.let is not None and f"{n}.bias" in t else None
            if d is not None:   # the LET shift's bias correction depends on the rounded weight (see OmniBlock.fuse)
                plain[f"{n}.bias"] = (t[f"{n}.bias"] + (w - w_hat) @ d).to(torch.float16).float().cpu()
                lin.bias.copy_(plain[f"{n}.bias"].to(lin.bias.device, lin.bias.dtype))
            lin.weight.copy_(w_hat.to(lin.weight.dtype))
            qws[n] = QuantizedWeight(qw.q.to(torch.uint8).cpu(), qw.scale.cpu(), qw.zero.cpu(), ob.scheme,
                                     *(None if x is None else x.cpu() for x in (qw.outlier_idx, qw.outlier_weight)))
            lin_stats[n].update({"gptq_loss": loss, "output_rel_err": output_error(w, w_hat, H),
                                 "weight_rel_err": float(((w - w_hat) ** 2).sum() / (w ** 2).sum().clamp_min(1e-30))})


def _weak_counts(family, block0, scheme: QuantScheme, cfg: OmniConfig):
    """OWQ's weak columns per linear kind for `owq_target_bits` (None when not combining with OWQ)."""
    if cfg.owq_target_bits is None:
        return None
    from ..owq import weak_column_counts
    in_features = {n: block0.get_submodule(n).in_features for n in family.linear_names}
    return weak_column_counts(family, in_features, scheme.bits, cfg.owq_target_bits, option="--owq-target-bits")


def _weak_columns(family, block, scheme: QuantScheme, counts: dict, act_sqmean: dict) -> dict:
    """OWQ's selection on the block's original weights, H_jj = 2 E[x_j^2] from the full-precision stream."""
    from ..owq import select_weak_columns
    return {n: select_weak_columns(block.get_submodule(n).weight.detach().float(),
                                   2 * act_sqmean[family.stats_source(n)], scheme, counts[n])
            for n in family.linear_names}


def _train(block, ob, q_hidden, fp_out, aug_out, kw, cfg: OmniConfig, device, i, n_blocks, progress,
           loss_start: float) -> tuple[int, list]:
    """Train `ob` in place toward `fp_out` (the block's target); returns (optimizer steps, block loss after each epoch
    if `keep_best`, else []: on the held-out windows where `cfg.heldout`)."""
    groups = []
    if ob.lwc_params():
        groups.append({"params": ob.lwc_params(), "lr": cfg.lwc_lr})
    if ob.let_params():
        groups.append({"params": ob.let_params(), "lr": cfg.let_lr})
    if cfg.epochs == 0 or not groups:
        return 0, []
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    n = training_windows("--heldout", cfg.heldout, len(q_hidden))   # the held-out windows follow them
    scored = slice(n, None) if cfg.heldout else slice(None)

    def score() -> float:
        with torch.no_grad():
            return _run(block, ob.effective(), q_hidden[scored], kw, device, cfg.batch_size, fp_out[scored],
                        cfg.loss)[1]
    if cfg.heldout:   # the caller's start loss covers every window
        loss_start = score()
    bs = min(cfg.batch_size, n)
    per_epoch = math.ceil(n / bs)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)   # per block: a resumed run draws the same batches
    bar = tqdm(total=cfg.epochs * per_epoch, desc=f"omniquant block {i + 1}/{n_blocks}", disable=not progress,
               leave=False, unit="step")
    steps = 0
    best_loss, best_state, epoch_losses = loss_start, _snapshot(ob), []
    try:
        for ep in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            tot = 0.0
            for j in range(0, n, bs):
                idx = perm[j:j + bs]
                x = q_hidden[idx].to(device)
                y = _block_forward(block, ob.effective(), x, kw)
                loss = block_loss(y, fp_out[idx].to(device), cfg.loss)
                if aug_out is not None:
                    loss = loss + block_loss(y, aug_out[idx].to(device), cfg.loss)
                if not torch.isfinite(loss):
                    # detached: float() of a tensor that needs grad printed torch's warning above the line (L10)
                    raise EdgequantError(f"OmniQuant loss became {float(loss.detach())} in block {i}; lower "
                                         "--lwc-lr/--let-lr or turn --let off")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                tot += float(loss.detach())
                bar.update(1)
                bar.set_postfix(epoch=ep + 1, loss=f"{tot / (j // bs + 1):.4g}")
            if cfg.keep_best:
                ep_loss = score()
                epoch_losses.append(ep_loss)
                if ep_loss < best_loss:
                    best_loss, best_state = ep_loss, _snapshot(ob)
    finally:
        bar.close()
    if cfg.keep_best:
        ob.load_state_dict(best_state)
    return steps, epoch_losses


def _snapshot(ob) -> dict:
    return {k: v.detach().clone() for k, v in ob.state_dict().items()}
