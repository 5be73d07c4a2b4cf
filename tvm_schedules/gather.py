"""The quantized embedding lookup: gather the rows of the token ids from a quantized table [vocab, hidden] and
dequantize only those rows (`(q - z) * s` per group, the same expression as the dequantize kernel, `dequant.weight_te`),
so the table stays packed in memory and a step reads hidden * bits / 8 bytes per token instead of the whole table.

Token ids are clamped into [0, vocab) inside the kernel: a bad id reads the edge row instead of memory outside the
table (the same rule as the fp16 embedding's `take` in clip mode). One TE compute, scheduled like any injective
kernel (TVM's default loop nest on CPUs, dlight's Fallback on GPUs); `gather_dequantize_np` is its reference.
"""
from __future__ import annotations

import numpy as np

from .dequant import QuantSpec, dequantize_np, weight_te


def gather_dequantize_te(spec: QuantSpec):
    """A TE function (ids int32 [S], qweight, scales[, zeros]) -> fp16 [S, K] for `op.tensor_expr_op`."""
    from tvm import te, tirx

    def f(ids, qweight, scales, zeros=None):
        def row(i):
            return tirx.max(tirx.min(ids[i], tirx.const(spec.n - 1, ids.dtype)), tirx.const(0, ids.dtype))

        return te.compute((ids.shape[0], spec.k), lambda i, k: weight_te(spec, qweight, scales, zeros, row(i), k),
                          name="gather_dequantize")

    return f


def gather_dequantize_func(spec: QuantSpec):
    """Standalone prim func (ids [S] with symbolic S, qweight, scales, [zeros], out [S, K] fp16) for kernel tests."""
    from tvm import te, tirx
    ids = te.placeholder((tirx.Var("s", "int64"),), "int32", name="ids")
    params = [te.placeholder(shape, dtype, name=name) for name, (shape, dtype) in spec.param_shapes().items()]
    out = gather_dequantize_te(spec)(ids, *params)
    return te.create_prim_func([ids, *params, out]).with_attr("global_symbol", "main")


def gather_dequantize_np(spec: QuantSpec, ids, qweight, scales, zeros=None) -> np.ndarray:
    """fp16 rows of the dequantized table for `ids` (clamped into [0, N))."""
    rows = np.clip(np.asarray(ids, np.int64), 0, spec.n - 1)
    return dequantize_np(spec, qweight, scales, zeros)[rows].astype(np.float16)
