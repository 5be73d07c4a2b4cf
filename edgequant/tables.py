"""Quantized vocabulary tables (`--embed-bits`): the token embedding and the output layer, each [vocab, hidden], as
one more quantized weight in the checkpoint's own layout (`qweight`/`scales`/`zeros` under the module's name, its scheme
recorded as a per-module override).

On SmolLM2-135M the tied 49152 x 576 table is half of the weights a decode step reads in fp16; at 8 bits it costs
little accuracy, at 4 bits with small groups a little more (benchmarks/results/embed-bits.md). Round to nearest with
min-max group parameters (`quantizer.quantize_weight`), per row of the table (the row is the embedding of one token
and, tied or not, the output weight of one logit), groups along the hidden dimension. A tied table is quantized
once and serves both ends; an untied model gets both tables quantized with the same scheme.
"""
from __future__ import annotations

from .errors import EdgequantError
from .models import family_for
from .quantizer import QuantizedWeight, quantize_weight
from .schemes import TABLE_BITS, QuantScheme

DEFAULT_GROUP = 32   # Q8_0 / Q4_0 blocks; the CPU int8 GEMV needs groups that are a multiple of 32


def table_scheme(bits: int, group_size: int = DEFAULT_GROUP) -> QuantScheme | None:
    """The scheme of `--embed-bits bits --embed-group-size group_size`; None for 16 (tables stay fp16)."""
    if bits == 16:
        return None
    if bits not in TABLE_BITS:
        raise EdgequantError(f"--embed-bits {bits} is not supported: use 16 (fp16), "
                             + " or ".join(map(str, TABLE_BITS)))
    return QuantScheme(bits, group_size)


def quantize_tables(model, scheme: QuantScheme) -> dict[str, QuantizedWeight]:
    """{module name: quantized table} for the embedding and, when untied, the output layer of `model`."""
    family = family_for(model.config.model_type)
    names = [family.embed] if getattr(model.config, "tie_word_embeddings", False) else [family.embed, family.head]
    out = {}
    for name in names:
        w = model.get_submodule(name).weight.detach()
        if scheme.group_size > w.shape[1]:
            raise EdgequantError(f"--embed-group-size {scheme.group_size} is wider than the table's rows "
                                 f"({w.shape[1]}); use at most {w.shape[1]}, or -1 for one group per row")
        out[name] = quantize_weight(w.float().cpu(), scheme)
    return out
