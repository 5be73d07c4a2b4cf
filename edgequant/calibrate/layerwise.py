"""Layer-wise calibration driver for Hessian-based methods (GPTQ, OWQ): block by block, linear group by linear group.

For each block: for each group of linears that share an input (q/k/v, o, gate/up, down) in the order the block
computes them, collect the Hessian of that input from the block *with the earlier groups already quantized*
("true sequential"), quantize the group, and write the dequantized weights back; finally run the quantized block to
produce the next block's inputs. Blocks move to the device one at a time. With `tune` (block-output reconstruction,
`blocktune.py`), the fp stream is carried beside the quantized one and each quantized block is tuned toward the fp
block's outputs before it produces the next block's inputs.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..models import family_for
from .blocks import BlockInputs, GatedProductCollector, HessianCollector, capture_first_block_inputs, run_block

# quantize_fn(name, linear, H) -> (QuantizedWeight, stats dict)
QuantizeFn = Callable[[str, torch.nn.Linear, torch.Tensor], tuple]
# tune(block index, block, {relative name: QuantizedWeight}, quantized-stream inputs, fp targets)
TuneFn = Callable[[int, torch.nn.Module, dict, object, torch.Tensor], None]


@torch.no_grad()
def calibrate_layerwise(model, samples: torch.Tensor, quantize_fn: QuantizeFn, device="cpu", batch_size: int = 4,
                        progress: bool = True, desc: str = "calibrate", skip_tokens: int = 0, tune: TuneFn | None = None,
                        first_token_hessian: bool = False, product_weights: bool = False):
    """`skip_tokens`: leave the first tokens of every window out of the Hessians (their attention-sink activations
    can be orders of magnitude larger than the rest and would dominate H). `first_token_hessian`: also collect the
    Hessian of each window's first token alone and pass it as `quantize_fn(..., H_first=)`, with the mean squares of
    each input over the first and over the other tokens as `first_sq=` (the attention sink's inputs).
    `product_weights`: for the gate and up of a gated MLP (`Family.gated_mlp`), also pass `product_w=`, the [N, K]
    weights of their errors in the MLP product's (`GatedProductCollector`)."""
    family = family_for(model.config.model_type)
    layers = model.get_submodule(family.layers_path)
    inputs = capture_first_block_inputs(model, layers, samples, device)
    quantized, stats = {}, {}
    fp_hidden = inputs.hidden.clone() if tune is not None else None
    bar = tqdm(range(len(layers)), desc=desc, disable=not progress, unit="block")
    for i in bar:
        t0 = time.time()
        block = layers[i].to(device)
        kw = inputs.use_layer(i)
        targets = None
        if tune is not None:   # the fp block on the fp stream: the tuning target, and the next fp stream
            targets = run_block(block, BlockInputs(fp_hidden, kw), device, batch_size)
        mine = {}
        for group in family.groups:
            mods = [block.get_submodule(n) for n in group.names]
            coll = HessianCollector(mods[0], skip_tokens, first_token=first_token_hessian)
            gated = family.gated_mlp if product_weights and set(family.gated_mlp[:2]) <= set(group.names) else ()
            prod = (GatedProductCollector(block.get_submodule(gated[0]), block.get_submodule(gated[1]),
                                          block.get_submodule(gated[2]), skip_tokens) if gated else None)
            try:
                run_block(block, inputs, device, batch_size, stop_at=mods[-1])
            finally:
                H = coll.remove()
                pw = dict(zip(gated[:2], prod.remove())) if prod is not None else {}
            extra = {"H_first": coll.H_first, "first_sq": coll.first_token_sq()} if first_token_hessian else {}
            for n, lin in zip(group.names, mods):
                name = f"{family.layer_prefix(i)}.{n}"
                qw, st = quantize_fn(name, lin, H, **extra, **({"product_w": pw[n]} if n in pw else {}))
                lin.weight.copy_(qw.dequantize().to(lin.weight.dtype))
                quantized[name] = qw
                stats[name] = st
                mine[n] = qw
        if tune is not None:
            tune(i, block, mine, inputs, targets)
            fp_hidden = targets
        inputs.hidden = run_block(block, inputs, device, batch_size)
        layers[i] = block.to("cpu")
        bar.set_postfix(block_s=f"{time.time() - t0:.1f}")
    return quantized, stats
