"""Low-bit dequantization as TE compute, the fused dequantize + matmul and outlier-column kernels built from it, and
their NumPy references.

The packed layout is the checkpoint's own (DESIGN.md): `qweight` uint32 [N, ceil(K/vpw)] with vpw = 32 // bits
values per word LSB-first along K (3-bit leaves the top 2 bits of each word unused). Group g covers inputs
[g*G, (g+1)*G); the last group may be ragged, and G = -1 means one group per row, so `k // G` (with G = K for
per-channel) picks a scale for every layout. Asymmetric schemes read a uint8 zero point per group; symmetric ones use
the constant 2^(b-1). Outlier columns are a separate small fp16 NT-matmul: the checkpoint already stores q == z at
those columns (they dequantize to 0), so `y = x @ dq(W)^T + x[:, idx] @ W_out^T` is exact.

The same TE function feeds two users: `export/quant_linear.py` wraps it in `op.tensor_expr_op` (the relax pipeline
then fuses it into the matmul), and `quant_matmul_func` below builds a standalone prim func for kernel tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantSpec:
    """Shape and scheme of one quantized weight [N, K]."""
    n: int
    k: int
    bits: int
    group_size: int          # -1: per channel
    sym: bool

    @property
    def vpw(self) -> int:
        return 32 // self.bits

    @property
    def group_len(self) -> int:
        return self.k if self.group_size == -1 else self.group_size

    @property
    def n_groups(self) -> int:
        return -(-self.k // self.group_len)

    @property
    def words(self) -> int:
        return -(-self.k // self.vpw)

    @property
    def sym_zero(self) -> int:
        return 1 << (self.bits - 1)

    def param_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Tensors the kernel reads, in call order: name -> (shape, dtype)."""
        out = {"qweight": ((self.n, self.words), "uint32"), "scales": ((self.n, self.n_groups), "float16")}
        if not self.sym:
            out["zeros"] = ((self.n, self.n_groups), "uint8")
        return out


# ------------------------------------------------------------------------------------------------ NumPy references
def unpack_np(qweight: np.ndarray, bits: int, k: int) -> np.ndarray:
    vpw = 32 // bits
    shifts = np.arange(vpw, dtype=np.uint32) * np.uint32(bits)
    vals = (qweight[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
    return vals.reshape(qweight.shape[0], -1)[:, :k]


def dequantize_np(spec: QuantSpec, qweight, scales, zeros=None) -> np.ndarray:
    """fp32 [N, K] weights, `(q - z) * s` per group."""
    q = unpack_np(qweight, spec.bits, spec.k).astype(np.float32)
    g = np.arange(spec.k) // spec.group_len
    s = scales.astype(np.float32)[:, g]
    z = np.float32(spec.sym_zero) if spec.sym else zeros.astype(np.float32)[:, g]
    return (q - z) * s


def quant_matmul_np(spec: QuantSpec, x, qweight, scales, zeros=None, outlier_idx=None, outlier_weight=None, bias=None):
    """fp32 reference of the whole quantized linear: x [M, K] -> [M, N]."""
    y = x.astype(np.float32) @ dequantize_np(spec, qweight, scales, zeros).T
    if outlier_idx is not None and len(outlier_idx):
        y = y + x[:, outlier_idx].astype(np.float32) @ outlier_weight.astype(np.float32).T
    if bias is not None:
        y = y + bias.astype(np.float32)
    return y


# ------------------------------------------------------------------------------------------------ TE / TIR
def dequantize_te(spec: QuantSpec):
    """A TE function (qweight, scales[, zeros]) -> W fp16 [N, K] for `op.tensor_expr_op`.

    The compute is named "dequantize": the pipeline's fusion pass and dlight's GEMV/LowBatchGEMV rules find the
    dequantize block by that name."""
    from tvm import te, tirx

    bits, vpw, g = spec.bits, spec.vpw, spec.group_len
    mask = tirx.const((1 << bits) - 1, "uint32")

    def f(qweight, scales, zeros=None):
        def w(n, k):
            word = qweight[n, k // vpw]
            q = tirx.Cast("float32", (word >> tirx.Cast("uint32", (k % vpw) * bits)) & mask)
            z = tirx.const(float(spec.sym_zero), "float32") if zeros is None else tirx.Cast("float32", zeros[n, k // g])
            # fp32 arithmetic, one rounding to fp16 at the end: the checkpoint's exact (q - z) * s, and on CPUs
            # without fp16 arithmetic it avoids emulating each fp16 operation
            return tirx.Cast("float16", (q - z) * tirx.Cast("float32", scales[n, k // g]))

        return te.compute((spec.n, spec.k), w, name="dequantize")

    return f


def quant_matmul_func(spec: QuantSpec, m: int | None = None, n_outliers: int = 0):
    """Standalone prim func of the fused kernel, `y = x @ dq(W)^T (+ xo @ W_out^T)`, in fp32 accumulation.

    Arguments in order: x [m, K] fp16, qweight, scales, [zeros], [xo [m, J] fp16, W_out [N, J] fp16], y [m, N] fp16.
    m None gives a symbolic row count (prefill) and an int gives static rows (decode uses 1). This is the shape the
    model's linears reach after the relax pipeline fuses the dequantize into the matmul; tests compare it to NumPy."""
    from tvm import te, tirx

    rows = tirx.Var("m", "int64") if m is None else m
    x = te.placeholder((rows, spec.k), "float16", name="x")
    params = [te.placeholder(shape, dtype, name=name) for name, (shape, dtype) in spec.param_shapes().items()]
    w = dequantize_te(spec)(*params)
    r = te.reduce_axis((0, spec.k), name="k")
    acc = te.compute((rows, spec.n), lambda i, j: te.sum(x[i, r].astype("float32") * w[j, r].astype("float32"),
                                                       axis=r), name="matmul")
    extra = []
    if n_outliers:
        xo = te.placeholder((rows, n_outliers), "float16", name="xo")
        wo = te.placeholder((spec.n, n_outliers), "float16", name="w_out")
        ro = te.reduce_axis((0, n_outliers), name="j")
        acc_o = te.compute((rows, spec.n), lambda i, j: te.sum(xo[i, ro].astype("float32") * wo[j, ro].astype("float32"),
                                                             axis=ro), name="outlier_matmul")
        y = te.compute((rows, spec.n), lambda i, j: (acc[i, j] + acc_o[i, j]).astype("float16"), name="cast")
        extra = [xo, wo]
    else:
        y = te.compute((rows, spec.n), lambda i, j: acc[i, j].astype("float16"), name="cast")
    return te.create_prim_func([x, *params, *extra, y]).with_attr("global_symbol", "main")
