"""Round-to-nearest with min-max group parameters: the data-free baseline."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..models import family_for
from ..quantizer import quantize_weight
from ..schemes import QuantScheme
from .metrics import weight_error


@torch.no_grad()
def quantize_rtn(model, scheme: QuantScheme, progress: bool = True):
    """Returns ({linear name: QuantizedWeight}, {linear name: error stats})."""
    family = family_for(model.config.model_type)
    layers = model.get_submodule(family.layers_path)
    out, stats = {}, {}
    for i in tqdm(range(len(layers)), desc="rtn", disable=not progress, unit="block"):
        for lin in family.linear_names:
            name = f"{family.layer_prefix(i)}.{lin}"
            w = model.get_submodule(name).weight
            qw = quantize_weight(w, scheme)
            out[name] = qw
            stats[name] = {"weight_rel_err": weight_error(w, qw.dequantize())}
    return out, stats
